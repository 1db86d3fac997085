"""A registered version is an MLflow Model: it takes Kaggle's test file as pandas reads it, pyfunc predict
equals `infer`, and `mlflow models serve` answers concurrent requests, refuses bad ones, and fails at start
when its engine cannot open."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import PANDALM, RECIPE, TINY

from arenaflow.stages import evaluate, infer, registry
from arenaflow.calibration import Calibrator
from arenaflow.data import load_rows
from arenaflow.recipe import load_recipe
from arenaflow.servable import log_model
from arenaflow.stages.runs import stage_run
from arenaflow.stages.ui import free_port, stop_group

CHAMPION = "models:/arenaflow@champion"
PROBS = ["winner_model_a", "winner_model_b", "winner_tie"]


def kaggle_rows(n: int) -> pd.DataFrame:
    """The Kaggle test columns as `pd.read_csv` gives them: integer ids."""
    rows = pd.read_csv(PANDALM)[["id", "prompt", "response_a", "response_b"]].head(n)
    assert rows["id"].dtype == np.int64
    return rows


def test_pyfunc_takes_the_kaggle_file_as_pandas_reads_it_and_equals_infer(champion, tmp_path):
    kaggle_rows(12).to_csv(tmp_path / "test.csv", index=False)
    rows = pd.read_csv(tmp_path / "test.csv")  # no dtype: what a user writes
    submission = pd.read_csv(infer.run(load_recipe(RECIPE, TINY), str(tmp_path / "test.csv"),
                                            str(tmp_path / "submission.csv")))
    model = mlflow.pyfunc.load_model(CHAMPION)
    predicted = model.predict(rows)
    assert list(predicted.columns) == list(submission.columns)
    assert predicted["id"].dtype == np.int64 and list(predicted["id"]) == list(rows["id"])  # as given, so a
    assert list(predicted["id"]) == list(submission["id"])  # submission's ids match the test file's
    np.testing.assert_allclose(predicted[PROBS].to_numpy(), submission[PROBS].to_numpy(), atol=1e-5, rtol=0)
    as_text = model.predict(rows.astype({"id": str}))
    assert list(as_text["id"]) == [str(i) for i in rows["id"]]  # string ids stay strings
    np.testing.assert_allclose(as_text[PROBS].to_numpy(), predicted[PROBS].to_numpy(), atol=1e-12, rtol=0)
    info = mlflow.models.get_model_info(CHAMPION)
    assert [(c.name, repr(c.type)) for c in info.signature.inputs.inputs] == [
        ("id", "Any"), ("prompt", "string"), ("response_a", "string"), ("response_b", "string")]
    assert info.saved_input_example_info is not None
    model.unwrap_python_model().close()


@pytest.fixture(scope="module")
def calibrated(champion, tiny_checkpoint):
    """The champion's checkpoint registered again with a stored calibrator (not promoted): its version."""
    recipe = load_recipe(RECIPE, TINY)
    calibrator = Calibrator("vector", temperature=0.5, bias=[0.4, -0.1, -0.3])  # sharpens: visibly different
    with stage_run(recipe, "quantize", model="tiny:llama"):
        version = registry.register_model(tiny_checkpoint, recipe.registry.model_name, recipe,
                                          load_rows(PANDALM).head(3), tags={"quantization": "none"},
                                          calibrator=calibrator)
    return str(version.version), calibrator


def test_a_version_with_a_calibrator_is_calibrated_by_evaluate_infer_and_pyfunc(champion, calibrated, tmp_path,
                                                                                   tiny_checkpoint):
    version, calibrator = calibrated
    recipe, uri = load_recipe(RECIPE, TINY), f"models:/arenaflow/{version}"
    labelled = pd.read_csv(PANDALM).head(12)
    labelled.to_csv(tmp_path / "labelled.csv", index=False)
    plain = evaluate.run(recipe, input=str(tmp_path / "labelled.csv"), model=CHAMPION)
    figures = evaluate.run(recipe, input=str(tmp_path / "labelled.csv"), model=uri)
    # the same checkpoint under its own calibrator (the test champion carries a stacker): the same raw figure
    assert figures["log_loss_uncalibrated"] == pytest.approx(plain["log_loss_uncalibrated"], abs=1e-9)
    assert figures["log_loss"] != pytest.approx(plain["log_loss"], abs=1e-3)

    raw = pd.read_csv(infer.run(recipe, str(tmp_path / "labelled.csv"), str(tmp_path / "raw.csv"),
                                model=str(tiny_checkpoint)))  # the version's checkpoint, no calibrator
    expected = calibrator.apply(raw[PROBS].to_numpy())
    assert np.abs(expected - raw[PROBS].to_numpy()).max() > 0.01  # the calibrator moves these rows
    from sklearn.metrics import log_loss

    assert figures["log_loss"] == pytest.approx(log_loss(labelled[PROBS].to_numpy().argmax(axis=1), expected,
                                                         labels=[0, 1, 2]), abs=1e-5)
    served = pd.read_csv(infer.run(recipe, str(tmp_path / "labelled.csv"), str(tmp_path / "cal.csv"), model=uri))
    np.testing.assert_allclose(served[PROBS].to_numpy(), expected, atol=1e-6, rtol=0)
    model = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(model.predict(labelled[["id", "prompt", "response_a", "response_b"]])[PROBS].to_numpy(),
                               expected, atol=1e-5, rtol=0)
    model.unwrap_python_model().close()


# ---------------------------------------------------------------------------------------------
# `mlflow models serve`: one server per module, started once

def start_server(model_uri: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
                            start_new_session=True)  # the venv's bin: serve runs `uvicorn` from PATH
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def wait_until_answering(proc: subprocess.Popen, url: str, log_path: Path, seconds: float = 180) -> bool:
    """True once /ping answers; False if the server exits first."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return True
        except OSError:
            if proc.poll() is not None:
                return False
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def split(rows: pd.DataFrame) -> dict:
    return {"dataframe_split": {"columns": list(rows.columns), "data": rows.to_numpy().tolist()}}


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`mlflow models serve` of the champion on loopback: its URL."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(CHAMPION, log_path)
    try:
        assert wait_until_answering(proc, url, log_path), log_path.read_text()[-3000:]
        yield url
    finally:
        stop_group(proc)


@pytest.mark.slow
def test_serve_answers_ids_as_given_and_refuses_bad_rows(server):
    rows = kaggle_rows(3)
    status, body = post(server, split(rows))  # ids as JSON numbers
    assert status == 200, body
    answer = pd.DataFrame(body["predictions"])
    assert answer["id"].tolist() == rows["id"].tolist() and all(type(i) is int for i in answer["id"])
    np.testing.assert_allclose(answer[PROBS].sum(axis=1), 1.0, atol=1e-9)
    # the served model is the pyfunc one, stored stacker applied (test_stored_calibration checks pyfunc's)
    in_process = mlflow.pyfunc.load_model(CHAMPION).predict(rows)
    np.testing.assert_allclose(answer[PROBS].to_numpy(), in_process[PROBS].to_numpy(), atol=1e-5, rtol=0)
    status, body = post(server, split(rows.astype({"id": str})))
    assert status == 200 and pd.DataFrame(body["predictions"])["id"].tolist() == [str(i) for i in rows["id"]], body

    status, body = post(server, split(rows.drop(columns=["response_b"])))
    assert status == 400 and "response_b" in body["message"], body
    not_a_list = rows.copy()
    not_a_list.loc[1, "prompt"] = "plain text, not a JSON list"
    status, body = post(server, split(not_a_list))
    assert status == 400 and "row 2" in body["message"] and "prompt" in body["message"], body
    twice = rows.assign(id=[7, 8, 7])
    status, body = post(server, split(twice))
    assert status == 400 and "duplicate id '7'" in body["message"] and "'id'" in body["message"], body
    status, _ = post(server, split(rows))
    assert status == 200  # still serving


@pytest.mark.slow
def test_serve_answers_an_empty_frame_and_ignores_extra_and_label_columns(server):
    rows = kaggle_rows(3)
    status, body = post(server, split(rows.head(0)))
    assert status == 200 and body["predictions"] == [], body
    _, plain = post(server, split(rows))
    labelled = pd.read_csv(PANDALM).head(3)  # winner_*, soft_*, model_a/b and more beside the four
    assert set(labelled.columns) > set(rows.columns) | set(PROBS)
    status, body = post(server, split(labelled))
    assert status == 200, body
    assert pd.DataFrame(body["predictions"]).equals(pd.DataFrame(plain["predictions"]))


@pytest.mark.slow
def test_serve_answers_its_own_input_example(server, champion):
    """What MLflow's log-time check would have done (servable.log_model skips it: an engine start)."""
    example = mlflow.models.get_model_info(CHAMPION).saved_input_example_info["serving_input_path"]
    payload = json.loads(Path(mlflow.artifacts.download_artifacts(f"{CHAMPION}/{example}")).read_text())
    status, body = post(server, payload)
    assert status == 200 and len(body["predictions"]) == 3, body


@pytest.mark.slow
def test_serve_holds_under_concurrent_requests(server):
    """60 requests of 2 rows, 8 at a time, every tenth without a column: each valid one gets its own rows."""
    pool = kaggle_rows(40)
    model = mlflow.pyfunc.load_model(CHAMPION)
    reference = model.predict(pool)[PROBS].to_numpy()  # one request at a time, in this process
    model.unwrap_python_model().close()

    def request(i: int):
        picked = [(2 * i) % len(pool), (2 * i + 1) % len(pool)]
        rows = pool.iloc[picked].assign(id=[1000 + 2 * i, 1001 + 2 * i])
        if i % 2:
            rows = rows.astype({"id": str})
        if i % 10 == 9:
            rows = rows.drop(columns=["response_a"])
        return i, picked, rows, post(server, split(rows))

    with ThreadPoolExecutor(max_workers=8) as clients:
        answers = list(clients.map(request, range(60)))
    for i, picked, rows, (status, body) in answers:
        if i % 10 == 9:
            assert status == 400 and "response_a" in body["message"], (i, body)
            continue
        assert status == 200, (i, body)
        answer = pd.DataFrame(body["predictions"])
        assert answer["id"].tolist() == rows["id"].tolist(), i
        np.testing.assert_allclose(answer[PROBS].sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose(answer[PROBS].to_numpy(), reference[picked], atol=1e-5, rtol=0)
    assert post(server, split(pool.head(2)))[0] == 200  # and it still answers


@pytest.mark.slow
def test_serve_fails_at_start_when_the_engine_cannot_open(champion, tiny_checkpoint, tmp_path):
    recipe = load_recipe(RECIPE, TINY)
    broken = dataclasses.replace(recipe, engine=dataclasses.replace(recipe.engine, backend="no-such-engine"))
    with stage_run(recipe, "quantize", model="tiny:llama"):
        info = log_model(tiny_checkpoint, broken, load_rows(PANDALM).head(3))
    proc, url = start_server(info.model_uri, tmp_path / "serve.log")
    try:
        assert not wait_until_answering(proc, url, tmp_path / "serve.log")  # it exits instead
        assert proc.returncode != 0 and "no-such-engine" in (tmp_path / "serve.log").read_text()
    finally:
        stop_group(proc)
