"""A version's stored calibrator (the champion's is a stacker) is what infer, pyfunc and evaluate score with."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from conftest import CHAMPION_STACKER, PANDALM, RECIPE, TINY
from mlflow import MlflowClient

from arenaflow.stages import evaluate, infer
from arenaflow.data import load_rows
from arenaflow.recipe import load_recipe
from arenaflow.scoring import score_rows

CHAMPION = "models:/arenaflow@champion"
COLUMNS = ["winner_model_a", "winner_model_b", "winner_tie"]


def test_infer_and_pyfunc_apply_the_stored_stacker(champion, tiny_checkpoint, tmp_path):
    recipe = load_recipe(RECIPE, TINY)
    frame = pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(12)
    frame[["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    rows = load_rows(tmp_path / "test.csv")
    raw = score_rows(tiny_checkpoint, recipe, rows).probs  # the checkpoint alone, no calibrator
    expected = CHAMPION_STACKER.apply(raw, rows)
    assert np.abs(expected - raw).max() > 0.05  # the stacker moves these rows: forgetting it would show

    submission = pd.read_csv(infer.run(recipe, str(tmp_path / "test.csv"), str(tmp_path / "out.csv")))
    np.testing.assert_allclose(submission[COLUMNS].to_numpy(), expected, atol=1e-5, rtol=0)
    predicted = mlflow.pyfunc.load_model(CHAMPION).predict(frame[["id", "prompt", "response_a", "response_b"]])
    np.testing.assert_allclose(predicted[COLUMNS].to_numpy(), expected, atol=1e-5, rtol=0)


def test_evaluate_applies_the_stored_stacker(champion, tiny_checkpoint, tmp_path):
    recipe = load_recipe(RECIPE, TINY)
    pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(20).to_csv(tmp_path / "labelled.csv", index=False)
    rows = load_rows(tmp_path / "labelled.csv")
    raw = score_rows(tiny_checkpoint, recipe, rows).probs
    figures = evaluate.run(recipe, input=str(tmp_path / "labelled.csv"), model=CHAMPION)
    labels = rows["label"].to_numpy()
    from sklearn.metrics import log_loss

    assert abs(figures["log_loss"] - log_loss(labels, CHAMPION_STACKER.apply(raw, rows), labels=[0, 1, 2])) < 1e-5
    assert abs(figures["log_loss_uncalibrated"] - log_loss(labels, raw, labels=[0, 1, 2])) < 1e-5
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name(recipe.name).experiment_id],
                                     filter_string="tags.stage = 'evaluate'", order_by=["attributes.start_time DESC"])[0]
    assert "calibration_figure" not in run.data.tags  # not the rows it was fitted on: applied as stored
