"""Scoring in resumable shards (infer, datagen's teacher): `ShardPredictor` is the per-shard work on any
executor (a Ray scorer streams every row left as one Ray Data run), `predict_in_shards` runs it over
shards.run_shards."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..shards import run_shards
from .engines import ScoringError
from .ray_actors import RowGather
from .scorer import ScoreResult, Scorer, finish_result, predict


class ShardPredictor:
    """`predict` over the row ranges [lo, hi) of `rows` that shards.run_shards asks for (infer, datagen's
    teacher); `open_engine()` -> (Scorer, PromptBuilder) runs at the first range, and the caller closes
    that scorer. A streaming scorer (`executor: ray`) gets every row from that first `lo` to the end as one
    Ray Data run (each row's two A/B orders side by side), so its actors start once and stay busy across
    shards; each range then takes its rows as they come back and returns as soon as they are all in.
    `predict` scores a range on any other scorer (the caller's, so that it can be replaced in tests)."""

    def __init__(self, open_engine: Callable[[], tuple], rows, swap_tta: bool, calibrator=None,
                 progress: bool = False, predict: Callable = predict):
        self.open_engine, self.rows, self.swap_tta = open_engine, rows, swap_tta
        self.calibrator, self.progress, self.predict = calibrator, progress, predict
        self.scorer: Scorer | None = None
        self.builder = None
        self._stream = None
        self._first = 0  # the row the stream starts at

    def __call__(self, lo: int, hi: int) -> ScoreResult:
        if self.scorer is None:
            self.scorer, self.builder = self.open_engine()
        rows = self.rows.iloc[lo:hi]
        if not self.scorer.streams:
            return self.predict(self.scorer, self.builder, rows, self.swap_tta, progress=self.progress,
                                calibrator=self.calibrator)
        if self._stream is None or lo < self._first:
            self._start(lo)
        per_row = 2 if self.swap_tta else 1
        need = (np.arange(lo, hi) - self._first)[:, None] * per_row + np.arange(per_row)
        start = time.perf_counter()
        while not self._gather.have[need].all():
            try:
                index, probs = next(self._stream)
            except StopIteration:
                self._gather.check_complete()
                raise
            self._gather.add(index, probs)
        probs = self._gather.probs[need]
        return finish_result(probs[:, 0], probs[:, 1] if self.swap_tta else None, time.perf_counter() - start,
                       self.scorer.startup_seconds, int(self._lengths[need].sum()), rows, self.calibrator)

    def _start(self, lo: int) -> None:
        self.close()
        rows = self.rows.iloc[lo:]
        prompts = self.builder.build_rows(rows)
        if self.swap_tta:
            prompts = [p for pair in zip(prompts, self.builder.build_rows(rows, swap=True)) for p in pair]
        self._first, self._lengths = lo, np.array([len(p) for p in prompts])
        self._gather = RowGather(len(prompts))
        self._stream = self.scorer.stream(prompts, self.progress)

    def close(self) -> None:
        """End a stream still running (its Ray Data run); the scorer stays open."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def predict_in_shards(predictor: ShardPredictor, root: Path, manifest: dict, shard_rows: int, desc: str,
                      progress: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """N x 3 probabilities of `predictor.rows`, scored in resumable shards (shards.run_shards under `root`,
    keyed by `manifest`), and what this run scored itself: seconds, prompt tokens, rows. The predictor's
    stream is ended; its scorer stays open for the caller (infer owns it, datagen's `Engines` theirs)."""
    spent = {"seconds": 0.0, "tokens": 0.0, "rows": 0}

    def compute(lo: int, hi: int) -> dict:
        result = predictor(lo, hi)
        spent["seconds"] += result.seconds
        spent["tokens"] += result.prompt_tokens
        spent["rows"] += hi - lo
        return {"probs": result.probs.tolist()}

    try:
        shards, _ = run_shards(root, manifest, len(predictor.rows), shard_rows, compute, desc, progress)
    finally:
        predictor.close()
    probs = np.array([p for shard in shards for p in shard["probs"]], dtype=np.float64).reshape(-1, 3)
    if len(probs) != len(predictor.rows):
        raise ScoringError(f"{len(probs)} predictions for {len(predictor.rows)} rows in {root}")
    return probs, spent
