"""The stages end to end on the tiny model (transformers engine: fast) in a throwaway MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import MTBENCH, PANDALM, RECIPE, ROOT, TINY

from arenaflow import cli, pipeline, registry
from arenaflow.recipe import load_recipe
from arenaflow.data import fetch_artifacts

@pytest.fixture
def recipe():
    return load_recipe(RECIPE, TINY)


def run_datagen() -> str:
    assert cli.main(["datagen", "--recipe", RECIPE,
                     "--set", f"data.files={MTBENCH},{PANDALM}"]) == 0
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cpu-smollm2").experiment_id])
    return run.info.run_id


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
    figures = pipeline.evaluate(recipe, input=f"runs:/{run_datagen()}/data", model="tiny:llama")
    assert figures["rows"] == 16


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
    plain = pipeline.evaluate(load_recipe(RECIPE, TINY), model=str(tiny_checkpoint))
    tta = pipeline.evaluate(load_recipe(RECIPE, [*TINY, "engine.swap_tta=true"]), model=str(tiny_checkpoint))
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
    out = pipeline.infer(recipe, str(test), str(tmp_path / "submission.csv"))
    submission = pd.read_csv(out, dtype={"id": str})
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert list(submission["id"]) == list(pd.read_csv(test, dtype=str)["id"])
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)
    assert not (tmp_path / "submission.csv.shards").exists()
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                     filter_string="tags.stage = 'infer'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.metrics["rows"] == 20 and run.data.metrics["projected_hours_25k_rows"] > 0


def test_killed_infer_resumes_to_the_identical_file(champion, recipe, tmp_path, monkeypatch):
    test = kaggle_test_file(tmp_path, n=30)  # 4 shards of 8 rows
    clean = pipeline.infer(recipe, str(test), str(tmp_path / "clean.csv")).read_bytes()

    real_predict, calls = pipeline.predict, []

    def dies_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(pipeline, "predict", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pipeline.infer(recipe, str(test), str(tmp_path / "resumed.csv"))
    assert len(list((tmp_path / "resumed.csv.shards").rglob("shard_*.json"))) == 2
    monkeypatch.setattr(pipeline, "predict", real_predict)
    resumed = pipeline.infer(recipe, str(test), str(tmp_path / "resumed.csv"))
    assert resumed.read_bytes() == clean
    last = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                      filter_string="tags.stage = 'infer'", order_by=["attributes.start_time DESC"])[0]
    assert last.data.metrics["rows_resumed"] == 16 and last.data.metrics["rows_scored_this_run"] == 14


def test_finetune_then_quantize_registers_a_tagged_version(store, recipe, tmp_path, monkeypatch):
    small = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml",
                        TINY + ["train.max_train_rows=8", "train.batch_size=4", "train.gradient_accumulation_steps=1",
                                "quant.method=rtn", "quant.scheme=W4A16", "quant.group_size=32", "train.load_in_4bit=false",
                                "engine.swap_tta=true", "quant.max_log_loss_delta=null", "calibration.method=vector"])
    real_score_rows, tta_per_call = pipeline.score_rows, []

    def recording_score_rows(checkpoint, recipe, rows):
        tta_per_call.append(recipe.engine.swap_tta)
        return real_score_rows(checkpoint, recipe, rows)

    monkeypatch.setattr(pipeline, "score_rows", recording_score_rows)
    finetune_run = pipeline.finetune(small)
    metrics = MlflowClient().get_run(finetune_run).data.metrics
    assert {"base_log_loss", "log_loss", "train_loss", "length_baseline_log_loss", "class_prior_log_loss"} <= set(metrics)
    assert tta_per_call == [False]  # zero-shot in one A/B order, like the finetuned validation figure
    version = pipeline.quantize(small, adapter=f"runs:/{finetune_run}/adapter")
    assert tta_per_call == [False, True, True]  # merged and quantized: both with the recipe's TTA
    mv = MlflowClient().get_model_version(small.registry.model_name, version)
    assert mv.tags["quantization"] == "W4A16" and "Valid log_loss" in mv.description
    on_model = {m.key for m in mlflow.get_logged_model(mv.source.removeprefix("models:/")).metrics}
    assert {"log_loss", "merged_log_loss", "quant_log_loss_delta", "calibrated_log_loss"} <= on_model
    # the calibrator travels with the version (evaluate and infer apply it), unless it made held-out rows worse
    ref = registry.resolve_model_ref(f"models:/{small.registry.model_name}/{version}", small)
    run = MlflowClient().get_run(mv.run_id)
    dropped = "calibration_dropped" in run.data.tags
    assert (run.data.metrics["calibrated_log_loss"] > run.data.metrics["log_loss"]) == dropped
    assert ref.calibrator.method == ("none" if dropped else "vector") == run.data.params["calibrator.method"]
    config = json.loads((ref.checkpoint / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_main_reuses_only_finished_runs_with_same_params_and_commit(store):
    client = MlflowClient()
    experiment = client.create_experiment("reuse")

    def run(params, commit="abc", status="FINISHED"):
        created = client.create_run(experiment, tags={"mlflow.project.entryPoint": "datagen",
                                                      "mlflow.source.git.commit": commit})
        for key, value in params.items():
            client.log_param(created.info.run_id, key, value)
        client.set_terminated(created.info.run_id, status=status)
        return created.info.run_id

    wanted = {"recipe": "experiments/cpu-smollm2.yaml", "overrides": ""}
    run(wanted, commit="old")
    run(wanted, status="FAILED")
    run({**wanted, "overrides": "train.epochs=2"})
    assert pipeline._finished_run("datagen", wanted, "abc", experiment) is None
    same = run(wanted)
    assert pipeline._finished_run("datagen", wanted, "abc", experiment).info.run_id == same


def test_evaluate_scores_every_row_of_an_explicit_file(store, recipe, tmp_path, tiny_checkpoint):
    """train.max_valid_rows (16 here) caps the recipe's own split, never a file the user names."""
    frame = pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(30)
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    figures = pipeline.evaluate(recipe, input=str(tmp_path / "labelled.csv"), model=str(tiny_checkpoint))
    assert figures["rows"] == 30
    assert pipeline.evaluate(recipe, model=str(tiny_checkpoint))["rows"] == 16
