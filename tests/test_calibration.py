"""Calibration: fitted on some rows, judged on others; an overconfident model gets better, a calibrated one no worse."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from arenaflow.calibration import CalibrationError, Calibrator, cross_fit, fit, folds_of


def synthetic(n: int = 1200, sharpen: float = 1.0, seed: int = 0, sources: int = 2):
    """Rows whose true label probabilities are known; the 'model' reports them raised to `sharpen`."""
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet([2.0, 2.0, 1.0], size=n)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    model = truth ** sharpen
    model /= model.sum(axis=1, keepdims=True)
    words = rng.integers(1, 400, size=(n, 2))
    rows = pd.DataFrame({"source": [f"s{i % sources}" for i in range(n)], "group": [f"g{i}" for i in range(n)],
                         "response_a": [["x" * int(k)] for k in words[:, 0]],
                         "response_b": [["y" * int(k)] for k in words[:, 1]]})
    return model, labels, rows


@pytest.mark.parametrize("method", ["temperature", "vector", "stacker"])
def test_overconfident_model_gets_better_on_rows_it_never_saw(method):
    probs, labels, rows = synthetic(sharpen=3.0)
    calibrator, oof, kind = cross_fit(method, probs, labels, rows)
    raw, held_out = log_loss(labels, probs, labels=[0, 1, 2]), log_loss(labels, oof, labels=[0, 1, 2])
    assert kind == "source" and held_out < raw - 0.05, (raw, held_out)
    if method != "stacker":
        assert calibrator.temperature > 2.0  # it undoes the sharpening (truth = model ** (1/3))


@pytest.mark.parametrize("method", ["temperature", "vector"])
def test_calibrated_model_is_no_worse(method):
    probs, labels, rows = synthetic(sharpen=1.0, seed=1)
    raw = log_loss(labels, probs, labels=[0, 1, 2])
    calibrator, oof, _ = cross_fit(method, probs, labels, rows)
    assert log_loss(labels, oof, labels=[0, 1, 2]) <= raw + 0.005  # on rows each fold never saw
    assert abs(calibrator.temperature - 1.0) < 0.15 and np.abs(calibrator.bias).max() < 0.15  # ~ the identity


def test_one_source_folds_by_prompt_group_and_round_trip():
    probs, labels, rows = synthetic(n=300, sources=1)
    fold, kind = folds_of(rows, 5, seed=0)
    assert kind == "group" and len(np.unique(fold)) == 5
    calibrator = fit("vector", probs, labels)
    again = Calibrator.from_dict(calibrator.to_dict())
    np.testing.assert_allclose(again.apply(probs), calibrator.apply(probs), rtol=0, atol=1e-12)
    assert calibrator.params()["calibrator.method"] == "vector"


def test_vector_bias_restores_the_ties_a_model_underpredicts():
    probs, labels, rows = synthetic(n=1500, seed=2)
    shy = probs * [1.0, 1.0, 0.3]  # the model gives ties 0.3 of their share
    shy /= shy.sum(axis=1, keepdims=True)
    calibrator, oof, _ = cross_fit("vector", shy, labels, rows)
    assert calibrator.bias[2] > max(calibrator.bias[:2]) + 0.5  # log(1/0.3) = 1.2 back on the tie class
    assert oof[:, 2].mean() > shy[:, 2].mean() + 0.05 and abs(oof[:, 2].mean() - probs[:, 2].mean()) < 0.05


def test_bad_methods_are_refused():
    probs, labels, rows = synthetic(n=30)
    with pytest.raises(CalibrationError, match="known"):
        fit("platt", probs, labels)
    with pytest.raises(CalibrationError, match="known"):
        Calibrator.from_dict({"method": "platt"})
    stacker = fit("stacker", probs, labels, rows, probs_swapped=probs)
    with pytest.raises(CalibrationError, match="swap_tta"):
        stacker.apply(probs, rows)
