"""A registered version is an MLflow Model: pyfunc predict equals `infer`, and `mlflow models serve` answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import PANDALM, RECIPE, TINY

from arenaflow import pipeline
from arenaflow.recipe import load_recipe
from arenaflow.ui import free_port, stop_group

CHAMPION = "models:/arenaflow@champion"


def kaggle_rows(n: int) -> pd.DataFrame:
    return pd.read_csv(PANDALM, dtype=str, keep_default_na=False)[["id", "prompt", "response_a", "response_b"]].head(n)


def test_pyfunc_predict_equals_infer(champion, tmp_path):
    rows = kaggle_rows(12)
    rows.to_csv(tmp_path / "test.csv", index=False)
    submission = pd.read_csv(pipeline.infer(load_recipe(RECIPE, TINY), str(tmp_path / "test.csv"),
                                            str(tmp_path / "submission.csv")), dtype={"id": str})
    model = mlflow.pyfunc.load_model(CHAMPION)
    predicted = model.predict(rows)
    assert list(predicted.columns) == list(submission.columns) and list(predicted["id"]) == list(rows["id"])
    np.testing.assert_allclose(predicted.iloc[:, 1:].to_numpy(), submission.iloc[:, 1:].to_numpy(), atol=1e-5, rtol=0)
    info = mlflow.models.get_model_info(CHAMPION)
    assert [c.name for c in info.signature.inputs.inputs] == ["id", "prompt", "response_a", "response_b"]
    assert info.saved_input_example_info is not None


def _post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_and_refuses_bad_rows(champion, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
                            start_new_session=True)  # the venv's bin: serve runs `uvicorn` from PATH
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        rows = kaggle_rows(3)
        status, body = _post(f"{url}/invocations", {"dataframe_split": rows.to_dict(orient="split", index=False)})
        assert status == 200, body
        answer = pd.DataFrame(body["predictions"])
        assert list(answer["id"]) == list(rows["id"])
        np.testing.assert_allclose(answer[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1), 1.0, atol=1e-9)
        # the served model is the pyfunc one, stored stacker applied (test_stored_calibration checks pyfunc's)
        in_process = mlflow.pyfunc.load_model(CHAMPION).predict(rows)
        np.testing.assert_allclose(answer.iloc[:, 1:].to_numpy(), in_process.iloc[:, 1:].to_numpy(), atol=1e-5, rtol=0)

        missing = rows.drop(columns=["response_b"]).to_dict(orient="split", index=False)
        status, body = _post(f"{url}/invocations", {"dataframe_split": missing})
        assert status == 400 and "response_b" in body["message"], body
        not_a_list = rows.copy()
        not_a_list.loc[1, "prompt"] = "plain text, not a JSON list"
        status, body = _post(f"{url}/invocations", {"dataframe_split": not_a_list.to_dict(orient="split", index=False)})
        assert status == 400 and "row 2" in body["message"] and "prompt" in body["message"], body
        status, _ = _post(f"{url}/invocations", {"dataframe_split": rows.to_dict(orient="split", index=False)})
        assert status == 200  # still serving
    finally:
        stop_group(proc)
        log.close()
