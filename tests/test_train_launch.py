"""finetune past one process: train.processes=2 runs under `accelerate launch` (gloo on CPU), rank 0 logs."""

from __future__ import annotations

import mlflow
import pytest
from conftest import RECIPE, TINY
from mlflow import MlflowClient

from arenaflow.stages import finetune
from arenaflow.recipe import load_recipe


@pytest.mark.slow
def test_two_processes_train_log_once_and_save_one_adapter(store):
    recipe = load_recipe(RECIPE, TINY + ["train.processes=2", "train.load_in_4bit=false", "train.max_train_rows=16",
                                         "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.epochs=1"])
    run_id = finetune.run(recipe)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"  # the worker left the caller's run to the caller
    history = MlflowClient().get_metric_history(run_id, "train_loss")
    steps = [m.step for m in history]
    # 16 rows over 2 processes x 2 rows: 4 optimizer steps (one process alone would take 8), each logged
    # once (rank 0), plus the final figure the caller logs at step 0
    assert sorted(steps) == [0, 1, 2, 3, 4]
    assert run.data.metrics["rows_trained"] == 16 and "log_loss" in run.data.metrics
    adapter = {a.path for a in MlflowClient().list_artifacts(run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    assert mlflow.active_run() is None
