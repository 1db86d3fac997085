"""The one scoring path: `Scorer` (an engine started once, see engines.py) and `predict` (canonical rows
-> prompts -> N x 3 probabilities, optional A/B swap-TTA). `open_scorer` picks the engine a checkpoint
can run on here; every stage, datagen's teacher and the registered MLflow model score through these.
`engine.executor` says where the engines run: `local` (this process, or one spawned process per GPU
group with `data_parallel_size`) or `ray` (one Ray actor per GPU group of a cluster, ray_actors.py).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import label_token_ids, load_tokenizer, read_config
from ..recipe import EngineConfig, Recipe, check_section
from .engines import ScoringError, TransformersEngine, VllmEngine, vllm_cannot_run
from .parallel import DataParallel, cuda_device_groups

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



ENGINE_FALLBACKS: list[str] = []  # every fallback engine_for took in this process, in order (stages tag them)


def engine_for(checkpoint: Path, engine: EngineConfig) -> EngineConfig:
    """The engine a checkpoint is scored with here: the asked one, or the transformers reference engine
    for a quantized checkpoint vLLM cannot run on this machine (said on stdout and tagged on the active
    MLflow run as `engine_fallback`, from `ENGINE_FALLBACKS`). Every scorer is opened through this one decision."""
    reason = vllm_cannot_run(checkpoint) if engine.backend.startswith("vllm") else None
    if not reason:
        return engine
    print(f"scoring with the transformers engine instead of {engine.backend}: {reason}")
    ENGINE_FALLBACKS.append(f"transformers: {reason}")
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
            from .ray_actors import RayScorer

            make = functools.partial(Scorer, str(self.checkpoint), dataclasses.replace(engine, executor="local"),
                                     max_model_len=max_model_len, trust_remote_code=trust_remote_code)
            self._impl = RayScorer(make, engine, str(self.checkpoint),
                                   max_model_len or read_config(self.checkpoint).get("max_position_embeddings"))
        elif engine.data_parallel_size > 1:
            rank = functools.partial(Scorer, str(self.checkpoint), dataclasses.replace(engine, data_parallel_size=1),
                                     max_model_len=max_model_len, trust_remote_code=trust_remote_code)
            self._impl = DataParallel(rank, cuda_device_groups(engine))
        else:
            tokenizer = load_tokenizer(self.checkpoint, trust_remote_code=trust_remote_code)
            label_ids = label_token_ids(tokenizer)
            if engine.backend.startswith("vllm"):
                self._impl = VllmEngine(self.checkpoint, engine, label_ids, tokenizer, max_model_len,
                                         trust_remote_code)
            else:
                self._impl = TransformersEngine(self.checkpoint, engine, label_ids, tokenizer.pad_token_id,
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

    def probabilities(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
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
        probs = self.probabilities(prompts, progress)
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


def finish_result(probs, probs_swapped, seconds: float, startup_seconds: float, prompt_tokens: int, rows,
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
    return finish_result(both.probs[:n], both.probs[n:] if swap_tta else None, both.seconds, both.startup_seconds,
                   both.prompt_tokens, rows, calibrator)


def open_scorer(checkpoint: Path, recipe: Recipe):
    """(Scorer, PromptBuilder): the recipe's engine (`engine_for`) on a checkpoint, and the prompt
    builder of its tokenizer."""
    from ..prompts import PromptBuilder

    builder = PromptBuilder(load_tokenizer(checkpoint, recipe.model.trust_remote_code), recipe.prompt)
    scorer = Scorer(checkpoint, recipe.engine, max_model_len=recipe.prompt.max_length + 8,
                    trust_remote_code=recipe.model.trust_remote_code)
    return scorer, builder


def score_rows(checkpoint: Path, recipe: Recipe, rows) -> ScoreResult:
    """Probabilities for rows with a fresh engine, stopped afterwards (torch's thread count kept)."""
    with keep_torch_threads():
        scorer, builder = open_scorer(checkpoint, recipe)
        with scorer:
            return predict(scorer, builder, rows, recipe.engine.swap_tta)
