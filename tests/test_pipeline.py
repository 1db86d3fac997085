"""The stages end to end on the tiny model (transformers engine: fast) in a throwaway MLflow store."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import MTBENCH, PANDALM, RECIPE, ROOT, TINY

from arenaflow import cli
from arenaflow.calibration import CHOICE_RULE, METHODS
from arenaflow.data import load_rows
from arenaflow.stages import evaluate, finetune, infer, quantize, registry
from arenaflow.stages.datasets import fetch_artifacts
from arenaflow.recipe import load_recipe
from arenaflow.stages.runs import stage_run

TINY_SET = [arg for override in TINY for arg in ("--set", override)]

@pytest.fixture
def recipe():
    return load_recipe(RECIPE, TINY)


def run_datagen(files: str = f"{MTBENCH},{PANDALM}") -> str:
    assert cli.main(["datagen", "--recipe", RECIPE, "--set", f"data.files={files}"]) == 0
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("cpu-smollm2").experiment_id],
                                      order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id


def test_datagen_logs_datasets_and_keeps_every_row(store):
    run = MlflowClient().get_run(run_datagen())
    metrics = run.data.metrics
    assert metrics["rows_in"] == 2688 == metrics["rows_train"] + metrics["rows_valid"]
    assert metrics["rows_train_augmented"] == 2 * metrics["rows_train"]
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "validation"}
    assert contexts["validation"].digest == run.data.tags["valid_digest"]
    assert json.loads(contexts["training"].profile)["num_rows"] == metrics["rows_train_augmented"]
    assert run.data.params["data.swap_augment"] == "True" and run.data.tags["stage"] == "datagen"
    folder = fetch_artifacts(f"runs:/{run.info.run_id}/data")
    assert len(pd.read_parquet(folder / "valid.parquet")) == metrics["rows_valid"]


def test_stages_read_a_datagen_output(store, recipe):
    """A datagen output of one file (mtbench) against a recipe of two: evaluate scores the output's rows."""
    data = f"runs:/{run_datagen(str(MTBENCH))}/data"
    figures = evaluate.run(recipe, input=data, model="tiny:llama")
    assert figures["rows"] == 16 and not any(k.startswith("log_loss.") for k in figures)  # one source, not two
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                       filter_string="tags.stage = 'evaluate'")
    scored = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/predictions.csv"), dtype=str)
    valid = pd.read_parquet(fetch_artifacts(data) / "valid.parquet")
    assert set(scored["id"]) <= set(valid["id"]) and set(scored["source"]) == {MTBENCH.name}


def test_evaluate_refuses_an_unlabelled_file_before_any_model_loads(store, tmp_path, capsys, monkeypatch):
    frame = pd.read_csv(PANDALM).head(5)[["id", "prompt", "response_a", "response_b"]]
    frame.to_csv(tmp_path / "test.csv", index=False)
    monkeypatch.setattr(evaluate, "resolve_model_ref", lambda *a: pytest.fail("a model was resolved"))
    assert cli.main(["evaluate", "--recipe", RECIPE, *TINY_SET, "--input", str(tmp_path / "test.csv")]) == 2
    assert f"{tmp_path / 'test.csv'}: evaluate needs labelled rows" in capsys.readouterr().err


def test_promote_latest_from_the_cli_takes_the_highest_version(store, tiny_checkpoint, recipe):
    for _ in range(3):
        with stage_run(recipe, "quantize", model="tiny:llama"):
            registry.register_model(tiny_checkpoint, "arenaflow", recipe, load_rows(PANDALM).head(2), tags={})
    assert cli.main(["promote", "--recipe", RECIPE, *TINY_SET, "--version", "latest"]) == 0
    assert registry.alias_version("arenaflow") == "3"  # no champion yet: the latest takes it
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                       filter_string="tags.stage = 'promote'")
    assert run.data.tags["candidate_version"] == "3"


def test_plan_cli_prints_the_plan_and_refuses_an_unknown_card(capsys):
    assert cli.main(["plan", "--recipe", str(ROOT / "experiments" / "kaggle-2xt4-34b.yaml"), "--rows", "25000",
                     "--gpu", "T4", "--count", "2"]) == 0
    table = capsys.readouterr().out
    assert "on 2x T4, tensor parallel 2" in table and "-> FITS" in table and "time: 25000 rows" in table
    assert cli.main(["plan", "--recipe", str(ROOT / "experiments" / "kaggle-2xt4-34b.yaml"), "--count", "1"]) == 2
    assert "needs 2 GPUs, 1 given" in capsys.readouterr().err  # the recipe's tensor parallel 2
    assert cli.main(["plan", "--recipe", RECIPE, "--gpu", "V100"]) == 2
    assert "V100" in capsys.readouterr().err


def test_malformed_input_fails_with_file_row_column(store, tmp_path, capsys):
    frame = pd.read_csv(MTBENCH, dtype=str, keep_default_na=False).head(10)
    frame.loc[3, "response_b"] = "[broken"
    frame.to_csv(tmp_path / "broken.csv", index=False)
    assert cli.main(["datagen", "--recipe", RECIPE, "--input", str(tmp_path / "broken.csv")]) == 2
    assert "broken.csv, row 4 (id=3), column 'response_b'" in capsys.readouterr().err


def test_refused_quant_and_train_settings_stop_the_cli_with_the_reason(store, capsys):
    assert cli.main(["quantize", "--recipe", RECIPE, "--adapter", "runs:/0/adapter", "--set", "quant.method=autoawq"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("arenaflow quantize: error: quant.method=autoawq is not supported") and "archived" in error
    assert cli.main(["finetune", "--recipe", RECIPE, "--set", "train.head=regression"]) == 2
    assert "train.head: 'regression' is not one of lm, classifier" in capsys.readouterr().err


def test_infer_without_champion_says_how_to_make_one(store, capsys):
    assert cli.main(["infer", "--recipe", RECIPE, "--input", str(PANDALM), "--output", "out.csv"]) == 2
    error = capsys.readouterr().err
    assert "arenaflow@champion" in error and "mlflow run . -e main" in error


def test_evaluate_logs_figures_on_the_version_model_and_dataset(champion, recipe):
    name = recipe.registry.model_name
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                       filter_string="tags.stage = 'evaluate'")
    model_id = MlflowClient().get_model_version(name, champion).source.removeprefix("models:/")
    on_model = {m.key: m for m in mlflow.get_logged_model(model_id).metrics}
    assert on_model["log_loss"].value == run.data.metrics["log_loss"]  # the run's figure, on the model too
    assert on_model["log_loss"].dataset_digest == run.data.tags["eval_dataset_digest"]
    assert {"log_loss.mtbench_human_turn1", "log_loss.pandalm_test"} <= set(run.data.metrics)  # per source
    for key in ("log_loss", "accuracy", "samples_per_s", "tokens_per_s", "length_baseline_log_loss",
                "class_prior_log_loss", "mean_p_tie"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/calibration.png", "plots/confusion_matrix.png"}
    assert run.info.run_name == f"evaluate {name}-v{champion} cpu-smollm2 float32"


def test_evaluate_with_swap_tta_also_reports_the_one_order_figure(store, tiny_checkpoint):
    plain = evaluate.run(load_recipe(RECIPE, TINY), model=str(tiny_checkpoint))
    tta = evaluate.run(load_recipe(RECIPE, [*TINY, "engine.swap_tta=true"]), model=str(tiny_checkpoint))
    assert "log_loss_without_tta" not in plain
    assert tta["log_loss_without_tta"] == pytest.approx(plain["log_loss"], abs=1e-9)
    assert tta["log_loss"] != pytest.approx(plain["log_loss"], abs=1e-6)  # the swapped order was averaged in


def kaggle_test_file(tmp_path: Path, n: int = 20) -> Path:
    """Unlabelled rows in a shuffled id order, like Kaggle's test.csv."""
    frame = pd.read_csv(PANDALM, dtype=str, keep_default_na=False).sample(n, random_state=1)
    frame = frame[["id", "prompt", "response_a", "response_b"]]
    path = tmp_path / "test.csv"
    frame.to_csv(path, index=False)
    return path


def test_infer_writes_a_valid_submission_in_input_order(champion, recipe, tmp_path):
    test = kaggle_test_file(tmp_path)
    out = infer.run(recipe, str(test), str(tmp_path / "submission.csv"))
    submission = pd.read_csv(out, dtype={"id": str})
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert list(submission["id"]) == list(pd.read_csv(test, dtype=str)["id"])
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)
    assert not (tmp_path / "submission.csv.shards").exists()
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                     filter_string="tags.stage = 'infer'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.metrics["rows"] == 20 and run.data.metrics["projected_hours_25k_rows"] > 0


def last_infer_run(recipe):
    return MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                      filter_string="tags.stage = 'infer'", order_by=["attributes.start_time DESC"])[0]


@pytest.mark.slow
def test_infer_killed_by_a_signal_resumes_to_the_identical_file(champion, recipe, tmp_path):
    test = kaggle_test_file(tmp_path, n=160)  # 20 shards of 8 rows
    clean = infer.run(recipe, str(test), str(tmp_path / "clean.csv")).read_bytes()
    shards = tmp_path / "resumed.csv.shards"
    proc = subprocess.Popen([sys.executable, "-m", "arenaflow.cli", "infer", "--recipe", RECIPE, *TINY_SET,
                             "--input", str(test), "--output", str(tmp_path / "resumed.csv")])
    try:
        deadline = time.time() + 300
        while len(list(shards.rglob("shard_*.json"))) < 2:
            assert proc.poll() is None and time.time() < deadline, "infer ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = len(list(shards.rglob("shard_*.json")))
    assert 2 <= saved < 20 and not (tmp_path / "resumed.csv").exists()
    resumed = infer.run(recipe, str(test), str(tmp_path / "resumed.csv"))
    assert resumed.read_bytes() == clean
    metrics = last_infer_run(recipe).data.metrics
    assert metrics["rows_resumed"] == 8 * saved and metrics["rows_scored_this_run"] == 160 - 8 * saved


def test_infer_does_not_resume_shards_of_another_model_at_the_same_path(store, recipe, tiny_checkpoint, tmp_path,
                                                                       monkeypatch):
    from safetensors.torch import load_file, save_file

    model, test = tmp_path / "model", kaggle_test_file(tmp_path, n=30)  # 4 shards of 8 rows
    shutil.copytree(tiny_checkpoint, model)
    real_predict, calls = infer.predict, []

    def dies_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(infer, "predict", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        infer.run(recipe, str(test), str(tmp_path / "out.csv"), model=str(model))
    monkeypatch.setattr(infer, "predict", real_predict)
    weights = load_file(model / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    resumed = pd.read_csv(infer.run(recipe, str(test), str(tmp_path / "out.csv"), model=str(model)))
    assert last_infer_run(recipe).data.metrics["rows_resumed"] == 0  # the 2 saved shards were the old model's
    shutil.copytree(model, tmp_path / "elsewhere")
    fresh = pd.read_csv(infer.run(recipe, str(test), str(tmp_path / "fresh.csv"), model=str(tmp_path / "elsewhere")))
    pd.testing.assert_frame_equal(resumed, fresh)


def test_finetune_then_quantize_registers_a_tagged_version(store, recipe, tmp_path, monkeypatch):
    small = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml",
                        TINY + ["train.max_train_rows=8", "train.batch_size=4", "train.gradient_accumulation_steps=1",
                                "quant.method=rtn", "quant.scheme=W4A16", "quant.group_size=32", "train.load_in_4bit=false",
                                "engine.swap_tta=true", "quant.max_log_loss_delta=null", "calibration.method=auto"])
    real_score_rows, tta_per_call = quantize.score_rows, []

    def recording_score_rows(checkpoint, recipe, rows):
        tta_per_call.append(recipe.engine.swap_tta)
        return real_score_rows(checkpoint, recipe, rows)

    for stage in (finetune, quantize):  # both score with it
        monkeypatch.setattr(stage, "score_rows", recording_score_rows)
    finetune_run = finetune.run(small)
    metrics = MlflowClient().get_run(finetune_run).data.metrics
    assert {"base_log_loss", "log_loss", "train_loss", "length_baseline_log_loss", "class_prior_log_loss"} <= set(metrics)
    assert tta_per_call == [False]  # zero-shot in one A/B order, like the finetuned validation figure
    version = quantize.run(small, adapter=f"runs:/{finetune_run}/adapter")
    assert tta_per_call == [False, True, True]  # merged and quantized: both with the recipe's TTA
    mv = MlflowClient().get_model_version(small.registry.model_name, version)
    assert mv.tags["quantization"] == "W4A16" and "Valid log_loss" in mv.description
    on_model = {m.key for m in mlflow.get_logged_model(mv.source.removeprefix("models:/")).metrics}
    assert {"log_loss", "merged_log_loss", "quant_log_loss_delta", "calibrated_log_loss"} <= on_model
    # auto: every candidate cross-fitted both ways and logged; the stored one is the rule's choice
    ref = registry.resolve_model_ref(f"models:/{small.registry.model_name}/{version}", small)
    run = MlflowClient().get_run(mv.run_id)
    worse = {m: max(run.data.metrics[f"calibration.{m}.{kind}_log_loss"] for kind in ("grouped", "by_source"))
             for m in METHODS if f"calibration.{m}.grouped_log_loss" in run.data.metrics}
    assert set(worse) >= {"none", "temperature", "vector", "shrinkage"}
    assert ref.calibrator.method == min(worse, key=worse.get) == run.data.params["calibrator.method"]
    assert ref.calibrator.chosen_from == "auto" and run.data.tags["calibration_rule"] == CHOICE_RULE
    assert run.data.tags["calibration_choice"].startswith(f"{ref.calibrator.method} chosen")
    # evaluate on the very rows it was fitted on reports the same nested figure
    figures = evaluate.run(small, model=f"models:/{small.registry.model_name}/{version}")
    assert abs(figures["log_loss"] - run.data.metrics["calibrated_log_loss"]) < 1e-6
    config = json.loads((ref.checkpoint / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_evaluate_scores_every_row_of_an_explicit_file(store, recipe, tmp_path, tiny_checkpoint):
    """train.max_valid_rows (16 here) caps the recipe's own split, never a file the user names."""
    frame = pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(30)
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    figures = evaluate.run(recipe, input=str(tmp_path / "labelled.csv"), model=str(tiny_checkpoint))
    assert figures["rows"] == 30
    assert evaluate.run(recipe, model=str(tiny_checkpoint))["rows"] == 16
