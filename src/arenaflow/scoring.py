"""The one scoring path: `Scorer` (an engine started once, see backends.py) and `predict` (canonical rows
-> prompts -> N x 3 probabilities, optional A/B swap-TTA). `open_scorer` picks the engine a checkpoint
can run on here; every stage, datagen's teacher and the registered MLflow model score through these.
`engine.executor` says where the engines run: `local` (this process, or one spawned process per GPU
group with `data_parallel_size`) or `ray` (one Ray actor per GPU group of a cluster, ray_scoring.py);
`ShardPredictor` is the per-shard work of infer and datagen's teacher on either.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import ScoringError, _TransformersEngine, _VllmEngine, vllm_cannot_run
from .models import label_token_ids, load_tokenizer, read_config
from .ray_scoring import RowGather
from .recipe import EngineConfig, Recipe, check_section
from .shards import run_shards


@dataclass
class ScoreResult:
    probs: np.ndarray  # N x 3 float64 [P(A), P(B), P(tie)], rows sum to 1, input order
    seconds: float  # scoring wall time, engine start excluded
    startup_seconds: float  # engine start (model load, KV cache, workers)
    prompt_tokens: int  # total prompt tokens scored
    probs_one_order: np.ndarray | None = None  # with swap-TTA: the original A/B order alone (what TTA adds)
    probs_swapped: np.ndarray | None = None  # with swap-TTA: the swapped order alone, its A/B columns put back
    probs_uncalibrated: np.ndarray | None = None  # with a calibrator: the model's own probabilities

    @property
    def samples_per_s(self) -> float:
        return len(self.probs) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds > 0 else float("inf")



def swap_average(probs, probs_swapped) -> np.ndarray:
    """Test-time augmentation: `probs_swapped` scored the prompt with responses A and B exchanged, so its
    P(A) is P(original B wins). Swap those columns back and average with `probs`."""
    p = np.asarray(probs, dtype=np.float64)
    q = np.asarray(probs_swapped, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 3:
        raise ScoringError(f"swap_average needs two N x 3 arrays, got {p.shape} and {q.shape}")
    return (p + q[:, [1, 0, 2]]) / 2



def engine_for(checkpoint: Path, engine: EngineConfig) -> EngineConfig:
    """The engine a checkpoint is scored with here: the asked one, or the transformers reference engine
    for a quantized checkpoint vLLM cannot run on this machine (said on stdout and tagged on the active
    MLflow run as `engine_fallback`). Every scorer is opened through this one decision."""
    reason = vllm_cannot_run(checkpoint) if engine.backend.startswith("vllm") else None
    if not reason:
        return engine
    import mlflow

    print(f"scoring with the transformers engine instead of {engine.backend}: {reason}")
    if mlflow.active_run():
        mlflow.set_tag("engine_fallback", f"transformers: {reason}")
    return dataclasses.replace(engine, backend="transformers", data_parallel_size=1)


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's thread count afterwards: an in-process vLLM engine lowers it, which would slow
    the training that follows."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Data parallel: one engine process per GPU group

@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dp_worker(conn, checkpoint: str, engine: EngineConfig, max_model_len: int | None,
               trust_remote_code: bool) -> None:
    """One data-parallel rank (spawned): start a Scorer, then score every shard sent until None."""
    try:
        scorer = Scorer(checkpoint, engine, max_model_len=max_model_len, trust_remote_code=trust_remote_code)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", scorer.max_model_len))
    try:
        while (message := conn.recv()) is not None:
            prompts, progress = message
            try:
                conn.send(("ok", scorer._probs(prompts, progress)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        scorer.close()


def _stop_workers(workers: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for proc in workers:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


class _DataParallel:
    """`len(device_groups)` spawned engines, `CUDA_VISIBLE_DEVICES=group` each, contiguous shards."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, device_groups: list[str],
                 max_model_len: int | None, trust_remote_code: bool):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA/tokenizers
        rank_engine = dataclasses.replace(engine, data_parallel_size=1)
        self.workers, self.conns = [], []
        # Not daemonic: a vLLM engine on GPU starts processes of its own.
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self.conns)
        for group in device_groups:
            parent, child = ctx.Pipe()
            with _env(CUDA_VISIBLE_DEVICES=group, TOKENIZERS_PARALLELISM="false"):
                args = (child, str(checkpoint), rank_engine, max_model_len, trust_remote_code)
                proc = ctx.Process(target=_dp_worker, args=args, name=f"arenaflow-dp{len(self.workers)}")
                proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        self.max_model_len = min(self._receive(rank, "start") for rank in range(len(self.conns)))

    def _receive(self, rank: int, what: str):
        try:
            status, payload = self.conns[rank].recv()
        except EOFError:
            self.close()
            raise ScoringError(f"data-parallel rank {rank} died during {what} "
                               f"(exit code {self.workers[rank].exitcode})") from None
        if status == "error":
            self.close()
            raise ScoringError(f"data-parallel rank {rank} failed during {what}:\n{payload}")
        return payload

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        bounds = np.linspace(0, len(prompts), len(self.conns) + 1).round().astype(int)
        for rank, conn in enumerate(self.conns):  # one bar is enough: rank 0's
            conn.send((prompts[bounds[rank]:bounds[rank + 1]], progress and rank == 0))
        return np.concatenate([self._receive(rank, "scoring") for rank in range(len(self.conns))])

    def close(self) -> None:
        self._finalizer()


def _cuda_device_groups(engine: EngineConfig) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        raise ScoringError(
            f"data_parallel_size={engine.data_parallel_size} runs one engine per GPU and needs CUDA; "
            "on CPU use data_parallel_size=1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    group = engine.tensor_parallel_size * engine.pipeline_parallel_size
    need = engine.data_parallel_size * group
    if need > len(devices):
        raise ScoringError(f"data_parallel_size={engine.data_parallel_size} x tensor_parallel_size="
                           f"{engine.tensor_parallel_size} x pipeline_parallel_size={engine.pipeline_parallel_size}"
                           f" needs {need} GPUs, {len(devices)} visible")
    return [",".join(devices[r * group:(r + 1) * group]) for r in range(engine.data_parallel_size)]


class Scorer:
    """An engine started once for `checkpoint` + `engine` config; `.score(prompts)` as often as needed.

    `max_model_len` applies when `engine.max_model_len` is None (then the model's own limit if both
    are). A prompt plus its one answer token must fit in it, on every backend.
    """

    def __init__(self, checkpoint: str | Path, engine: EngineConfig, *, max_model_len: int | None = None,
                 trust_remote_code: bool = False):
        check_section(engine)  # an engine built in code (bench specs, tests); load_recipe checked the recipe's
        if engine.executor == "ray" and engine.data_parallel_size > 1:
            raise ScoringError("engine.executor=ray runs one engine per Ray actor (engine.ray_actors); "
                               "set data_parallel_size=1")
        self.checkpoint = Path(checkpoint)
        engine = engine_for(self.checkpoint, engine)
        self.engine = engine
        start = time.perf_counter()
        max_model_len = engine.max_model_len or max_model_len
        if engine.executor == "ray":  # the same Scorer, local in each actor
            from .ray_scoring import RayScorer

            make = functools.partial(Scorer, str(self.checkpoint), dataclasses.replace(engine, executor="local"),
                                     max_model_len=max_model_len, trust_remote_code=trust_remote_code)
            self._impl = RayScorer(make, engine, str(self.checkpoint),
                                   max_model_len or read_config(self.checkpoint).get("max_position_embeddings"))
        elif engine.data_parallel_size > 1:
            groups = _cuda_device_groups(engine)
            self._impl = _DataParallel(self.checkpoint, engine, groups, max_model_len, trust_remote_code)
        else:
            tokenizer = load_tokenizer(self.checkpoint, trust_remote_code=trust_remote_code)
            label_ids = label_token_ids(tokenizer)
            if engine.backend.startswith("vllm"):
                self._impl = _VllmEngine(self.checkpoint, engine, label_ids, tokenizer, max_model_len,
                                         trust_remote_code)
            else:
                self._impl = _TransformersEngine(self.checkpoint, engine, label_ids, tokenizer.pad_token_id,
                                                 trust_remote_code)
                self._impl.max_model_len = max_model_len or self._impl.max_model_len
        self.max_model_len: int | None = self._impl.max_model_len
        self.startup_seconds = time.perf_counter() - start

    def _check(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        checked = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise ScoringError(f"prompt {i} is empty")
            checked.append(ids)
        if self.max_model_len is not None:
            too_long = [i for i, p in enumerate(checked) if len(p) + 1 > self.max_model_len]
            if too_long:
                i = too_long[0]
                raise ScoringError(
                    f"{len(too_long)} prompt(s) do not fit max_model_len={self.max_model_len} with their answer "
                    f"token, e.g. prompt {i} has {len(checked[i])} tokens (needs max_model_len >= "
                    f"{len(checked[i]) + 1}); raise engine.max_model_len or lower prompt.max_length")
        return checked

    def _probs(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
        checked = self._check(prompts)
        if not checked:
            return np.zeros((0, 3))
        return self._impl(checked, progress)

    @property
    def streams(self) -> bool:
        """Whether `stream` yields batches as they finish (a Ray scorer) rather than everything at once."""
        return hasattr(self._impl, "stream")

    def stream(self, prompts: Sequence[Sequence[int]],
               progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(prompt indices, their probabilities) batch by batch, in the order they finish."""
        checked = self._check(prompts)
        if self.streams:
            yield from self._impl.stream(checked, progress)
        elif checked:
            yield np.arange(len(checked)), self._impl(checked, progress)

    def score(self, prompts: Sequence[Sequence[int]], progress: bool = True) -> ScoreResult:
        """N x 3 probabilities for N prompts (token ids), in input order, with timings."""
        start = time.perf_counter()
        probs = self._probs(prompts, progress)
        return ScoreResult(probs=probs, seconds=time.perf_counter() - start,
                           startup_seconds=self.startup_seconds, prompt_tokens=sum(len(p) for p in prompts))

    @property
    def llm(self):
        """The vLLM `LLM` behind a single-engine vLLM scorer (datagen generates with it), else None."""
        return getattr(self._impl, "llm", None)

    def close(self) -> None:
        impl, self._impl = getattr(self, "_impl", None), None
        if impl is not None:
            impl.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score(checkpoint: Path, prompts: list[list[int]], engine: EngineConfig, progress: bool = True) -> ScoreResult:
    """Start an engine, score `prompts`, stop it. With engine.max_model_len None the engine is sized
    for the longest prompt + 8 (the recipe's prompt.max_length + 8 rule)."""
    fallback = max((len(p) for p in prompts), default=0) + 8
    with Scorer(checkpoint, engine, max_model_len=fallback) as scorer:
        return scorer.score(prompts, progress=progress)


def _finish(probs, probs_swapped, seconds: float, startup_seconds: float, prompt_tokens: int, rows,
            calibrator) -> ScoreResult:
    """The ScoreResult of rows scored in one A/B order (`probs_swapped` None) or both (swap-TTA, the swapped
    order with its own columns), with the version's calibrator applied if given."""
    if probs_swapped is None:
        result = ScoreResult(probs, seconds, startup_seconds, prompt_tokens)
    else:
        result = ScoreResult(swap_average(probs, probs_swapped), seconds, startup_seconds, prompt_tokens,
                             probs_one_order=probs, probs_swapped=probs_swapped[:, [1, 0, 2]])
    if calibrator is not None and calibrator.method != "none":
        calibrated = calibrator.apply(result.probs, rows, result.probs_swapped)
        result = dataclasses.replace(result, probs=calibrated, probs_uncalibrated=result.probs)
    return result


def predict(scorer: Scorer, builder, rows, swap_tta: bool, progress: bool = True, calibrator=None) -> ScoreResult:
    """N x 3 probabilities for canonical rows (A/B-swap test-time augmentation if asked; then the
    version's calibrator if given, see calibration.py) + timings."""
    prompts = builder.build_rows(rows)
    n = len(prompts)
    # With swap-TTA one call for both orders: the engine batches them together and shares the prompt prefix.
    both = scorer.score(prompts + builder.build_rows(rows, swap=True) if swap_tta else prompts, progress=progress)
    return _finish(both.probs[:n], both.probs[n:] if swap_tta else None, both.seconds, both.startup_seconds,
                   both.prompt_tokens, rows, calibrator)


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
        return _finish(probs[:, 0], probs[:, 1] if self.swap_tta else None, time.perf_counter() - start,
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


def open_scorer(checkpoint: Path, recipe: Recipe):
    """(Scorer, PromptBuilder): the recipe's engine (`engine_for`) on a checkpoint, and the prompt
    builder of its tokenizer."""
    from .prompts import PromptBuilder

    builder = PromptBuilder(load_tokenizer(checkpoint, recipe.model.trust_remote_code), recipe.prompt)
    scorer = Scorer(checkpoint, recipe.engine, max_model_len=recipe.prompt.max_length + 8,
                    trust_remote_code=recipe.model.trust_remote_code)
    return scorer, builder


class KeptEngine:
    """`score_rows` that keeps the engine of the checkpoint it scored last open until the next call or
    `close()`, so the caller can score through it again (`lend`: MLflow's check of a logged model's
    input example) instead of starting the same engine twice. One engine at a time: each call closes
    the one before, freeing the GPU."""

    def __init__(self, recipe: Recipe, rows):
        self.recipe, self.rows, self.kept = recipe, rows, None

    def __call__(self, checkpoint: Path) -> ScoreResult:
        self.close()
        with keep_torch_threads():
            scorer, builder = open_scorer(checkpoint, self.recipe)
            self.kept = (Path(checkpoint), scorer, builder)
            return predict(scorer, builder, self.rows, self.recipe.engine.swap_tta)

    def lend(self, checkpoint: Path) -> tuple | None:
        """(Scorer, PromptBuilder) open on `checkpoint`, or None when the engine kept is another's."""
        if self.kept is None or self.kept[0] != Path(checkpoint):
            return None
        return self.kept[1], self.kept[2]

    def close(self) -> None:
        kept, self.kept = self.kept, None
        if kept is not None:
            kept[1].close()

    def __enter__(self) -> KeptEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_rows(checkpoint: Path, recipe: Recipe, rows) -> ScoreResult:
    """Probabilities for rows with a fresh engine, stopped afterwards (torch's thread count kept)."""
    with keep_torch_threads():
        scorer, builder = open_scorer(checkpoint, recipe)
        with scorer:
            return predict(scorer, builder, rows, recipe.engine.swap_tta)
