"""label: rows without labels -> the teacher's P(A), P(B), P(tie) as soft labels (+ confident hard labels)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import SOFT_COLUMNS, TEXT_COLUMNS
from ..recipe import Recipe
from ..shards import digest
from . import DatagenError
from .engines import Engines, engine_configs, work_dir


def apply_teacher(rows: pd.DataFrame, probs: np.ndarray, threshold: float | None,
                  drop_unconfident: bool = False) -> tuple[pd.DataFrame, dict[str, int]]:
    """Soft labels from N x 3 teacher probabilities (renormalised to sum to 1); hard label 0/1/2
    where max >= threshold, else -1 (or the row is dropped when `drop_unconfident`)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(rows), 3) or not np.isfinite(probs).all() or (probs < 0).any():
        raise DatagenError(f"teacher probabilities: expected {len(rows)} x 3 finite non-negative values, got {probs.shape}")
    probs = probs / probs.sum(axis=1, keepdims=True)
    out = rows.copy()
    out[list(SOFT_COLUMNS)] = probs
    confident = np.ones(len(out), bool) if threshold is None else probs.max(axis=1) >= threshold
    hard = threshold is not None
    out["label"] = np.where(confident & hard, probs.argmax(axis=1), -1).astype(np.int64)
    counts = {"rows_labelled": len(out), "rows_hard_labelled": int((confident & hard).sum()),
              "rows_unconfident": int((~confident).sum()), "rows_unconfident_dropped": 0}
    if drop_unconfident and threshold is not None:
        counts["rows_unconfident_dropped"] = int((~confident).sum())
        out = out[confident]
    return out, counts


def unlabelled(rows: pd.DataFrame) -> np.ndarray:
    soft = rows[list(SOFT_COLUMNS)].to_numpy(dtype=float)
    return ((rows["label"] < 0) & ~np.isfinite(soft).all(axis=1)).to_numpy()



@dataclass
class Teacher:
    uri: str  # the reference actually used
    checkpoint: Path
    version: str | None
    requested: str
    fallback_reason: str | None = None

    @property
    def identity(self) -> str:
        """What the teacher's labels depend on (a registered version is pinned by its number)."""
        return f"{self.uri}#v{self.version}" if self.version else f"{self.uri}@{self.checkpoint}"


def teacher_from(ref, requested: str, fallback_reason: str | None = None) -> Teacher:
    """The Teacher of a resolved ModelRef (`requested`: the recipe's `generate.teacher`)."""
    return Teacher(ref.uri, ref.checkpoint, ref.version, requested, fallback_reason)


def label_with_teacher(recipe: Recipe, rows: pd.DataFrame, teacher: Teacher, engines: Engines, counts: dict,
                       speed: dict, progress: bool = True) -> np.ndarray:
    """N x 3 teacher probabilities for canonical rows (scoring.ShardPredictor, in resumable shards; with
    `engine.executor: ray` one Ray Data run over every row left)."""
    from ..models import load_tokenizer
    from ..prompts import PromptBuilder
    from ..scoring import ShardPredictor, predict_in_shards

    g = recipe.generate
    _, teacher_engine = engine_configs(recipe)
    builder = PromptBuilder(load_tokenizer(teacher.checkpoint, recipe.model.trust_remote_code), recipe.prompt)
    rows_key = [[i, p, a, b] for i, p, a, b in zip(rows["id"], *(rows[c].map(list) for c in TEXT_COLUMNS))]
    manifest = {"kind": "label", "teacher": teacher.identity, "prompt": dataclasses.asdict(recipe.prompt),
                "swap_tta": g.teacher_swap_tta, "shard_size": g.shard_size, "rows": digest(rows_key), "n": len(rows)}
    # The teacher engine (owned by `engines`) is started by the first shard that needs one.
    shard_predict = ShardPredictor(lambda: (engines.get(teacher.checkpoint, teacher_engine), builder), rows,
                                   g.teacher_swap_tta, progress=progress)
    probs, spent = predict_in_shards(shard_predict, work_dir(recipe) / "label", manifest, g.shard_size, "label",
                                     progress=progress)
    counts["rows_label_resumed"] = len(rows) - spent["rows"]
    if spent["seconds"] > 0:
        speed["label_samples_per_s"] = spent["rows"] / spent["seconds"]
    return probs

