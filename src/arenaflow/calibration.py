"""Calibration of a model's N x 3 probabilities, fitted on validation rows and stored with its version.

Methods (recipe `calibration.method`):
  none         the model's probabilities as they are;
  temperature  softmax(log p / T): one parameter, keeps the ranking;
  vector       softmax(log p / T + b): temperature and a per-class bias (b_A, b_B, b_tie; b sums to 0),
               which also moves the share of ties a model predicts;
  stacker      a multinomial logistic regression on [log p, log p of the swapped A/B order (when the
               recipe scores both), the response-length features of metrics.length_features].
Every method is fitted by minimising log-loss (scipy L-BFGS / sklearn). `cross_fit` reports what a
calibrator does on rows it never saw: out-of-fold probabilities, the folds being whole sources when the
rows come from two or more (what transfers to a user's data is what holds across sources), else grouped
folds of prompts. The calibrator stored is the one fitted on all rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .errors import ArenaflowError
from .metrics import length_features
from .recipe import CALIBRATION_METHODS

EPS = 1e-12


class CalibrationError(ArenaflowError, ValueError):
    """A calibration method or stored calibrator that cannot be used."""


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0))


@dataclass
class Calibrator:
    method: str = "none"
    temperature: float = 1.0
    bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    coef: list[list[float]] = field(default_factory=list)  # stacker: 3 x features
    intercept: list[float] = field(default_factory=list)  # stacker: 3
    swapped: bool = False  # stacker: fitted with the swapped-order scores as features too
    dataset_digest: str = ""  # the MLflow dataset it was fitted on (figures on those rows must be cross-fitted)

    def features(self, probs: np.ndarray, rows: pd.DataFrame | None, probs_swapped: np.ndarray | None) -> np.ndarray:
        parts = [_log(probs)]
        if probs_swapped is not None:
            parts.append(_log(probs_swapped))
        if rows is None:
            raise CalibrationError("the stacker needs the rows (response lengths) it scores")
        parts.append(length_features(rows))
        return np.column_stack(parts)

    def apply(self, probs: np.ndarray, rows: pd.DataFrame | None = None,
              probs_swapped: np.ndarray | None = None) -> np.ndarray:
        """Calibrated N x 3 probabilities. `probs_swapped`: the swapped-order scores with their A/B columns
        already exchanged back (the stacker uses them when it was fitted with them)."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.method == "none" or len(probs) == 0:
            return probs
        if self.method in ("temperature", "vector"):
            return _softmax(_log(probs) / self.temperature + np.asarray(self.bias))
        if self.method == "stacker":
            if self.swapped and probs_swapped is None:
                raise CalibrationError("this stacker reads both A/B orders: score with engine.swap_tta=true")
            x = self.features(probs, rows, probs_swapped if self.swapped else None)
            return _softmax(x @ np.asarray(self.coef).T + np.asarray(self.intercept))
        raise CalibrationError(f"calibration method {self.method!r}; known: {list(CALIBRATION_METHODS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Calibrator:
        values = dict(values or {})
        if values.get("method", "none") not in CALIBRATION_METHODS:
            raise CalibrationError(f"stored calibration method {values.get('method')!r}; known: {list(CALIBRATION_METHODS)}")
        return cls(**values)

    def params(self) -> dict[str, float | str]:
        """Flat MLflow params of what was fitted."""
        if self.method in ("temperature", "vector"):
            return {"calibrator.method": self.method, "calibrator.temperature": round(self.temperature, 6),
                    **{f"calibrator.bias_{c}": round(b, 6) for c, b in zip(("a", "b", "tie"), self.bias)}}
        return {"calibrator.method": self.method}


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(_log(probs[np.arange(len(labels)), labels])))


def fit(method: str, probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame | None = None,
        probs_swapped: np.ndarray | None = None) -> Calibrator:
    """A calibrator of `method` fitted on labelled rows (labels 0/1/2)."""
    from scipy.optimize import minimize

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"calibration.method={method!r}; known: {list(CALIBRATION_METHODS)}")
    if method == "none" or len(labels) == 0:
        return Calibrator()
    if method == "stacker":
        from sklearn.linear_model import LogisticRegression

        x = Calibrator("stacker").features(probs, rows, probs_swapped)
        if len(np.unique(labels)) < 3:
            raise CalibrationError("the stacker needs validation rows of all three labels")
        model = LogisticRegression(max_iter=2000).fit(x, labels)
        return Calibrator("stacker", coef=model.coef_.tolist(), intercept=model.intercept_.tolist(),
                          swapped=probs_swapped is not None)
    logp = _log(probs)

    def unpack(theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias = np.array([theta[1], theta[2], -theta[1] - theta[2]]) if method == "vector" else np.zeros(3)
        return float(np.exp(theta[0])), bias

    def loss(theta: np.ndarray) -> float:
        t, b = unpack(theta)
        return _nll(_softmax(logp / t + b), labels)

    start = np.zeros(3 if method == "vector" else 1)
    best = minimize(loss, start, method="L-BFGS-B")
    theta = best.x if best.fun <= loss(start) else start  # never worse than the identity on its own rows
    t, b = unpack(theta)
    return Calibrator(method, temperature=t, bias=b.tolist())


def folds_of(rows: pd.DataFrame, n_folds: int, seed: int) -> tuple[np.ndarray, str]:
    """Fold index per row, and what the folds are: whole sources when there are 2+, else prompt groups."""
    sources = rows["source"].astype(str).to_numpy()
    if len(set(sources)) >= 2:
        names = sorted(set(sources))
        return np.array([names.index(s) for s in sources]), "source"
    from sklearn.model_selection import GroupKFold

    groups = rows["group"].astype(str).to_numpy()
    k = max(2, min(n_folds, len(set(groups))))
    fold = np.zeros(len(rows), dtype=int)
    for i, (_, test) in enumerate(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, groups=groups)):
        fold[test] = i
    return fold, "group"


def cross_fit(method: str, probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame, n_folds: int = 5,
              seed: int = 0, probs_swapped: np.ndarray | None = None) -> tuple[Calibrator, np.ndarray, str]:
    """(calibrator fitted on every row, out-of-fold calibrated probabilities, what the folds are)."""
    probs = np.asarray(probs, dtype=np.float64)
    oof = probs.copy()
    fold, kind = folds_of(rows, n_folds, seed)
    for k in np.unique(fold):
        held, rest = fold == k, fold != k
        part = fit(method, probs[rest], labels[rest], rows[rest],
                   None if probs_swapped is None else probs_swapped[rest])
        oof[held] = part.apply(probs[held], rows[held], None if probs_swapped is None else probs_swapped[held])
    full = fit(method, probs, labels, rows, probs_swapped)
    return full, oof, kind
