"""Calibration of a model's N x 3 probabilities, fitted on validation rows and stored with its version.

Candidates (recipe `calibration.method` names one, or `auto` tries them all):
  none         the model's probabilities as they are;
  temperature  softmax(log p / T): one parameter, keeps the ranking;
  vector       softmax(log p / T + b): temperature and a per-class bias (b_A, b_B, b_tie; b sums to 0),
               which also moves the share of ties a model predicts;
  shrinkage    (1 - w) p + w prior: a mixture with the fitting rows' label shares, which falls back
               towards knowing nothing where the model is wrong and sure;
  stacker      a multinomial logistic regression on [log p, log p of the swapped A/B order (when the
               recipe scores both), the response-length features of metrics.length_features]: it can
               lean on the lengths where the model adds little.
Each is fitted by minimising log-loss (scipy / sklearn). Every candidate is judged on rows it was not
fitted on, by two cross-fits: grouped folds within sources (folds of prompt groups, each fold drawing
from every source: what an in-domain test sees) and leave-one-source-out (when the rows come from 2+
sources: what transfers). `CHOICE_RULE` picks one; a named method competes with `none` only. The
figure reported for the stored calibrator is nested: the whole choice is made again without the
rows it is measured on (`cross_fit`), so picking the best of several does not flatter it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .errors import ArenaflowError
from .metrics import length_features
from .recipe import CALIBRATION_METHODS

METHODS = CALIBRATION_METHODS  # simplest first: ties go to the earlier
CHOICES = ("auto", *METHODS)
CHOICE_RULE = ("the candidate with the lowest worse-of-two cross-fitted log-loss (grouped folds within "
               "sources; leave-one-source-out when the rows come from 2+ sources); ties go to the simpler")
STACKER_C = 0.1  # L2 strength on standardised features: ~50 rows per fold, 7-10 features
EPS = 1e-12


class CalibrationError(ArenaflowError, ValueError):
    """A calibration method or stored calibrator that cannot be used."""


def check_method(method: str) -> None:
    """Refuse an unknown `calibration.method` before any work."""
    if method not in CHOICES:
        raise CalibrationError(f"calibration.method={method!r}; known: {list(CHOICES)}")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0))


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(_log(probs[np.arange(len(labels)), labels])))


def _take(array: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    return None if array is None else array[mask]


@dataclass
class Calibrator:
    method: str = "none"
    temperature: float = 1.0
    bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    prior: list[float] = field(default_factory=list)  # shrinkage: the fitting rows' label shares
    prior_weight: float = 0.0  # shrinkage: w
    coef: list[list[float]] = field(default_factory=list)  # stacker: 3 x features
    intercept: list[float] = field(default_factory=list)  # stacker: 3
    swapped: bool = False  # stacker: fitted with the swapped-order scores as features too
    chosen_from: str = ""  # what calibration.method was (auto, or the one named): evaluate cross-fits that again
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
        if self.method == "shrinkage":
            return (1.0 - self.prior_weight) * probs + self.prior_weight * np.asarray(self.prior)
        if self.method == "stacker":
            if self.swapped and probs_swapped is None:
                raise CalibrationError("this stacker reads both A/B orders: score with engine.swap_tta=true")
            x = self.features(probs, rows, probs_swapped if self.swapped else None)
            return _softmax(x @ np.asarray(self.coef).T + np.asarray(self.intercept))
        raise CalibrationError(f"calibration method {self.method!r}; known: {list(METHODS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Calibrator:
        values = dict(values or {})
        if values.get("method", "none") not in METHODS:
            raise CalibrationError(f"stored calibration method {values.get('method')!r}; known: {list(METHODS)}")
        return cls(**values)

    def params(self) -> dict[str, float | str]:
        """Flat MLflow params of what was fitted."""
        if self.method in ("temperature", "vector"):
            return {"calibrator.method": self.method, "calibrator.temperature": round(self.temperature, 6),
                    **{f"calibrator.bias_{c}": round(b, 6) for c, b in zip(("a", "b", "tie"), self.bias)}}
        if self.method == "shrinkage":
            return {"calibrator.method": self.method, "calibrator.prior_weight": round(self.prior_weight, 6),
                    **{f"calibrator.prior_{c}": round(p, 6) for c, p in zip(("a", "b", "tie"), self.prior)}}
        if self.method == "stacker":
            return {"calibrator.method": self.method, "calibrator.features": len(self.coef[0]),
                    "calibrator.swapped": str(self.swapped)}
        return {"calibrator.method": self.method}


def _fit_stacker(probs, labels, rows, probs_swapped) -> Calibrator:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(labels)) < 3:
        raise CalibrationError("the stacker needs rows of all three labels")
    x = Calibrator("stacker").features(probs, rows, probs_swapped)
    # Standardised so that one L2 strength fits log-probabilities and lengths alike; the scaling is folded
    # into the stored coefficients, so applying it needs no scaler.
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    model = LogisticRegression(C=STACKER_C, max_iter=2000).fit((x - scaler.mean_) / scale, labels)
    coef = model.coef_ / scale
    return Calibrator("stacker", coef=coef.tolist(), intercept=(model.intercept_ - coef @ scaler.mean_).tolist(),
                      swapped=probs_swapped is not None)


def _fit_shrinkage(probs, labels) -> Calibrator:
    from scipy.optimize import minimize_scalar

    prior = np.bincount(labels, minlength=3) / len(labels)
    prior = np.clip(prior, 1e-3, None) / np.clip(prior, 1e-3, None).sum()  # a class absent here is not impossible
    best = minimize_scalar(lambda w: _nll((1 - w) * probs + w * prior, labels), bounds=(0.0, 1.0), method="bounded")
    return Calibrator("shrinkage", prior=prior.tolist(), prior_weight=float(best.x))


def fit(method: str, probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame | None = None,
        probs_swapped: np.ndarray | None = None) -> Calibrator:
    """A calibrator of one of METHODS fitted on labelled rows (labels 0/1/2)."""
    from scipy.optimize import minimize

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r}; known: {list(METHODS)}")
    if method == "none" or len(labels) == 0:
        return Calibrator()
    if method == "stacker":
        return _fit_stacker(probs, labels, rows, probs_swapped)
    if method == "shrinkage":
        return _fit_shrinkage(probs, labels)
    logp = _log(probs)
    onehot = np.eye(3)[labels]

    def unpack(theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias = np.array([theta[1], theta[2], -theta[1] - theta[2]]) if method == "vector" else np.zeros(3)
        return float(np.exp(theta[0])), bias

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean log-loss and its gradient in theta (analytic: a few evaluations instead of finite differences)."""
        t, b = unpack(theta)
        calibrated = _softmax(logp / t + b)
        dz = (calibrated - onehot) / len(labels)  # d loss / d logits
        grad = [-(dz * logp).sum() / t]  # through T = exp(theta_0)
        if method == "vector":
            grad += [(dz[:, 0] - dz[:, 2]).sum(), (dz[:, 1] - dz[:, 2]).sum()]
        return _nll(calibrated, labels), np.array(grad)

    start = np.zeros(3 if method == "vector" else 1)
    # log T bounded (T in [0.02, 55]): the line search must not try T = 0 or inf on a degenerate fold
    best = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(-4.0, 4.0)] + [(None, None)] * (len(start) - 1))
    theta = best.x if best.fun <= loss(start)[0] else start  # never worse than the identity on its own rows
    t, b = unpack(theta)
    return Calibrator(method, temperature=t, bias=b.tolist())


def grouped_folds(rows: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row: prompt groups never split, each source spread over the folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = rows["group"].astype(str).to_numpy()
    k = max(2, min(n_folds, len(set(groups))))
    fold = np.zeros(len(rows), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(rows, rows["source"].astype(str), groups=groups)):
        fold[test] = i
    return fold


def source_folds(rows: pd.DataFrame) -> np.ndarray | None:
    """One fold per source, or None when the rows come from one source."""
    sources = rows["source"].astype(str).to_numpy()
    names = sorted(set(sources))
    return np.array([names.index(s) for s in sources]) if len(names) >= 2 else None


@dataclass
class Selection:
    calibrator: Calibrator  # the chosen candidate, fitted on every row
    figures: dict[str, dict[str, float]]  # candidate -> {"grouped": ..., "by_source": ...} cross-fitted log-loss


def _out_of_fold(fit_on, probs, labels, rows, probs_swapped, fold) -> np.ndarray:
    """Out-of-fold probabilities: `fit_on(probs, labels, rows, probs_swapped)` fitted without each fold."""
    oof = np.empty_like(probs)
    for k in np.unique(fold):
        held, rest = fold == k, fold != k
        part = fit_on(probs[rest], labels[rest], rows[rest], _take(probs_swapped, rest))
        oof[held] = part.apply(probs[held], rows[held], _take(probs_swapped, held))
    return oof


def _worse(figures: dict[str, float]) -> float:
    return max(figures.values())


def select(method: str, probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame, n_folds: int = 5,
           seed: int = 0, probs_swapped: np.ndarray | None = None) -> Selection:
    """Cross-fit every candidate of `method` (auto: all of METHODS; a named one: it and none) and
    choose by CHOICE_RULE. A candidate that cannot be fitted on some fold (e.g. a label missing) loses."""
    check_method(method)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    candidates = METHODS if method == "auto" else tuple(dict.fromkeys(("none", method)))
    folds = {"grouped": grouped_folds(rows, n_folds, seed), "by_source": source_folds(rows)}
    figures: dict[str, dict[str, float]] = {}
    for candidate in candidates:
        def fit_on(p, y, r, s, candidate=candidate):
            return fit(candidate, p, y, r, s)

        figures[candidate] = {}
        for kind, fold in folds.items():
            if fold is None:
                continue
            try:
                figures[candidate][kind] = _nll(_out_of_fold(fit_on, probs, labels, rows, probs_swapped, fold), labels)
            except CalibrationError:
                figures[candidate][kind] = float("inf")
    best = min(candidates, key=lambda c: _worse(figures[c]))  # min keeps the first (simplest) of equals
    calibrator = fit(best, probs, labels, rows, probs_swapped)
    calibrator.chosen_from = method
    return Selection(calibrator, figures)


@dataclass
class CrossFit:
    selection: Selection  # what is stored: the choice made on every row
    grouped: np.ndarray  # out-of-fold probabilities of the whole choice, grouped folds within sources
    by_source: np.ndarray | None  # ... leave-one-source-out (None with one source)

    def figures(self, labels: np.ndarray) -> dict[str, float]:
        """MLflow metrics: the stored choice's nested figures and every candidate's cross-fitted ones."""
        out = {"calibrated_log_loss": _nll(self.grouped, labels)}
        if self.by_source is not None:
            out["calibrated_log_loss_by_source"] = _nll(self.by_source, labels)
        for candidate, kinds in self.selection.figures.items():
            out.update({f"calibration.{candidate}.{kind}_log_loss": v for kind, v in kinds.items() if np.isfinite(v)})
        return out

    def summary(self) -> str:
        """One line for the run's tags: what was chosen, from what, by which figures."""
        parts = [f"{c} " + "/".join(f"{v:.4f}" for v in kinds.values()) for c, kinds in self.selection.figures.items()]
        kinds = "/".join(next(iter(self.selection.figures.values())))
        return f"{self.selection.calibrator.method} chosen; {kinds} cross-fitted log-loss: " + ", ".join(parts)


def cross_fit(method: str, probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame, n_folds: int = 5,
              seed: int = 0, probs_swapped: np.ndarray | None = None) -> CrossFit:
    """The choice of `method` on every row, and its out-of-fold probabilities under both cross-fits, each
    fold's choice made again without that fold's rows (nested)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)

    def choose_on(p, y, r, s):
        return select(method, p, y, r, n_folds, seed, s).calibrator

    by_source = source_folds(rows)
    return CrossFit(select(method, probs, labels, rows, n_folds, seed, probs_swapped),
                    _out_of_fold(choose_on, probs, labels, rows, probs_swapped, grouped_folds(rows, n_folds, seed)),
                    None if by_source is None else _out_of_fold(choose_on, probs, labels, rows, probs_swapped, by_source))
