"""Calibration: fitted on some rows, judged on others; an overconfident model gets better, a calibrated one no
worse, and `auto` is never worse than knowing nothing on rows it did not fit on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import RECIPE
from sklearn.metrics import log_loss

from arenaflow.calibration import (CalibrationError, Calibrator, cross_fit, fit, grouped_folds, select,
                                   source_folds)
from arenaflow.recipe import RecipeError, load_recipe


def synthetic(n: int = 1200, sharpen: float = 1.0, seed: int = 0, sources: int = 2, length_signal: float = 0.0,
              model_noise: bool = False):
    """Rows whose true label probabilities are known; the 'model' reports them raised to `sharpen` (or, with
    `model_noise`, sharp probabilities unrelated to the truth). `length_signal` makes the longer response win."""
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 400, size=(n, 2))
    truth = rng.dirichlet([2.0, 2.0, 1.0], size=n)
    if length_signal:
        gap = np.log1p(words[:, 0]) - np.log1p(words[:, 1])
        logits = np.column_stack([length_signal * gap, -length_signal * gap, np.full(n, -0.7)])
        truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    model = rng.dirichlet([1.0, 1.0, 1.0], size=n) if model_noise else truth
    model = model ** sharpen
    model /= model.sum(axis=1, keepdims=True)
    rows = pd.DataFrame({"source": [f"s{i % sources}" for i in range(n)], "group": [f"g{i // 2}" for i in range(n)],
                         "response_a": [["x" * int(k)] for k in words[:, 0]],
                         "response_b": [["y" * int(k)] for k in words[:, 1]]})
    return model, labels, rows


def prior_log_loss(labels: np.ndarray) -> float:
    return log_loss(labels, np.tile(np.bincount(labels, minlength=3) / len(labels), (len(labels), 1)), labels=[0, 1, 2])


@pytest.mark.parametrize("method", ["temperature", "vector", "shrinkage", "stacker"])
def test_overconfident_model_gets_better_on_rows_it_never_saw(method):
    probs, labels, rows = synthetic(n=600, sharpen=3.0)
    fitted = cross_fit(method, probs, labels, rows)
    raw = log_loss(labels, probs, labels=[0, 1, 2])
    for held_out in (fitted.grouped, fitted.by_source):
        assert log_loss(labels, held_out, labels=[0, 1, 2]) < raw - 0.05
    assert fitted.selection.calibrator.method == method and set(fitted.selection.figures) == {"none", method}
    if method in ("temperature", "vector"):
        assert fitted.selection.calibrator.temperature > 2.0  # it undoes the sharpening (truth = model ** (1/3))


@pytest.mark.parametrize("method", ["temperature", "vector"])
def test_calibrated_model_is_no_worse(method):
    probs, labels, rows = synthetic(n=600, sharpen=1.0, seed=1)
    raw = log_loss(labels, probs, labels=[0, 1, 2])
    fitted = cross_fit(method, probs, labels, rows)
    assert log_loss(labels, fitted.grouped, labels=[0, 1, 2]) <= raw + 0.005  # on rows each fold never saw
    calibrator = fit(method, probs, labels)
    assert abs(calibrator.temperature - 1.0) < 0.15 and np.abs(calibrator.bias).max() < 0.15  # ~ the identity


def test_auto_leans_on_the_lengths_where_the_model_knows_nothing():
    probs, labels, rows = synthetic(n=300, sharpen=2.0, length_signal=1.5, model_noise=True)
    fitted = cross_fit("auto", probs, labels, rows)
    assert fitted.selection.calibrator.method == "stacker"
    assert fitted.selection.calibrator.chosen_from == "auto"
    figures = fitted.figures(labels)
    prior = prior_log_loss(labels)
    # nested: each fold's choice was made without its rows
    assert figures["calibrated_log_loss"] < prior - 0.05 and figures["calibrated_log_loss_by_source"] < prior - 0.05
    assert {f"calibration.{m}.{k}_log_loss" for m in ("none", "vector", "shrinkage", "stacker")
            for k in ("grouped", "by_source")} <= set(figures)


def test_auto_falls_back_towards_the_prior_where_nothing_is_known():
    probs, labels, rows = synthetic(n=200, sharpen=3.0, model_noise=True)  # sure, and unrelated to the labels
    fitted = cross_fit("auto", probs, labels, rows)
    assert log_loss(labels, probs, labels=[0, 1, 2]) > 1.5
    for held_out in (fitted.grouped, fitted.by_source):
        assert log_loss(labels, held_out, labels=[0, 1, 2]) < prior_log_loss(labels) + 0.03
    shrinkage = fit("shrinkage", probs, labels)
    assert shrinkage.prior_weight > 0.8 and abs(sum(shrinkage.prior) - 1) < 1e-9


def test_grouped_folds_keep_groups_whole_and_spread_every_source():
    _, _, rows = synthetic(n=300, sources=3)
    fold = grouped_folds(rows, 5, seed=0)
    assert len(np.unique(fold)) == 5
    assert (rows.assign(fold=fold).groupby("group")["fold"].nunique() == 1).all()
    assert (rows.assign(fold=fold).groupby("fold")["source"].nunique() == 3).all()
    assert source_folds(rows).max() == 2 and source_folds(rows.assign(source="one")) is None
    one_source = cross_fit("vector", *synthetic(n=100, sources=1, sharpen=2.0))
    assert one_source.by_source is None and set(one_source.selection.figures["vector"]) == {"grouped"}


def test_the_choice_is_the_lowest_worse_of_two_figure():
    probs, labels, rows = synthetic(n=300, sharpen=2.0, length_signal=1.0)
    chosen = select("auto", probs, labels, rows)
    worst = {m: max(kinds.values()) for m, kinds in chosen.figures.items()}
    assert chosen.calibrator.method == min(worst, key=worst.get)
    assert len({kinds["grouped"] for kinds in chosen.figures.values()}) == len(chosen.figures)  # really measured


@pytest.mark.parametrize("method", ["vector", "shrinkage", "stacker"])
def test_stored_calibrators_round_trip(method):
    probs, labels, rows = synthetic(n=300, sources=1, sharpen=2.0, length_signal=1.0)
    calibrator = fit(method, probs, labels, rows)
    again = Calibrator.from_dict(calibrator.to_dict())
    np.testing.assert_allclose(again.apply(probs, rows), calibrator.apply(probs, rows), rtol=0, atol=1e-12)
    assert np.abs(calibrator.apply(probs, rows) - probs).max() > 0.01
    assert calibrator.params()["calibrator.method"] == method


def test_stacker_folds_its_scaling_into_the_stored_coefficients():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from arenaflow.calibration import STACKER_C

    probs, labels, rows = synthetic(n=300, sharpen=2.0, length_signal=1.0)
    stacker = fit("stacker", probs, labels, rows)
    x = stacker.features(probs, rows, None)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=STACKER_C, max_iter=2000)).fit(x, labels)
    np.testing.assert_allclose(stacker.apply(probs, rows), reference.predict_proba(x), atol=1e-6, rtol=0)


def test_vector_bias_restores_the_ties_a_model_underpredicts():
    probs, labels, rows = synthetic(n=1500, seed=2)
    shy = probs * [1.0, 1.0, 0.3]  # the model gives ties 0.3 of their share
    shy /= shy.sum(axis=1, keepdims=True)
    fitted = cross_fit("vector", shy, labels, rows)
    calibrator, oof = fitted.selection.calibrator, fitted.grouped
    assert calibrator.method == "vector" and calibrator.bias[2] > max(calibrator.bias[:2]) + 0.5  # log(1/0.3) = 1.2
    assert oof[:, 2].mean() > shy[:, 2].mean() + 0.05 and abs(oof[:, 2].mean() - probs[:, 2].mean()) < 0.05


def test_bad_methods_are_refused():
    probs, labels, rows = synthetic(n=30)
    with pytest.raises(CalibrationError, match="known"):
        fit("platt", probs, labels)
    with pytest.raises(CalibrationError, match="known"):
        select("platt", probs, labels, rows)
    with pytest.raises(CalibrationError, match="known"):
        Calibrator.from_dict({"method": "auto"})  # a stored calibrator is a chosen one
    with pytest.raises(RecipeError, match="calibration.method: 'platt' is not one of auto"):  # before any work
        load_recipe(RECIPE, ["calibration.method=platt"])
    stacker = fit("stacker", probs, labels, rows, probs_swapped=probs)
    with pytest.raises(CalibrationError, match="swap_tta"):
        stacker.apply(probs, rows)
