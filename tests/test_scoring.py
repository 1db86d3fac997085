"""Scoring backends agree with each other, keep input order, and fail clearly.

Tolerances (max absolute difference of probabilities, float32 on CPU):
  * backends on the tiny random model: 1e-5 (measured ~2e-7);
  * vLLM vs transformers on SmolLM2-135M-Instruct: 3e-5 (docs/STACK.md: ~5e-6 achieved).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import VLLM_TEST_ENGINE

from arenaflow.models import load_tokenizer
from arenaflow.prompts import PromptBuilder
from arenaflow.recipe import EngineConfig, PromptConfig, RecipeError
from arenaflow.scoring.engines import ScoringError, three_token_probs
from arenaflow.scoring import Scorer, score, swap_average
from arenaflow.scoring.parallel import DataParallel

TINY_TOL = 1e-5
SMOLLM2_TOL = 3e-5
DATA = Path(__file__).resolve().parents[1] / "data"


def engine(backend: str, **kw) -> EngineConfig:
    return EngineConfig(**{**vars(VLLM_TEST_ENGINE), "backend": backend, **kw})


@pytest.fixture(scope="module")
def tiny_prompts():
    """Random token ids whose lengths (3..300) come in shuffled order."""
    rng = np.random.default_rng(7)
    lengths = rng.permutation(np.r_[np.linspace(3, 300, 22).astype(int), [17, 17, 120]])
    return [rng.integers(100, 40000, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_transformers(tiny_checkpoint):
    # batch_tokens small enough to need several length-sorted batches
    with Scorer(tiny_checkpoint, engine("transformers", batch_tokens=1200)) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def tiny_reference(tiny_transformers, tiny_prompts):
    return tiny_transformers.score(tiny_prompts, progress=False).probs


def assert_probs(probs: np.ndarray, n: int) -> None:
    assert probs.shape == (n, 3) and probs.dtype == np.float64
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


# --- pure functions -------------------------------------------------------------------------------

def test_three_token_probs_renormalises_logits_and_logprobs():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, np.log(3.0), -np.inf]])
    expected = np.array([np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum(), [0.25, 0.75, 0.0]])
    np.testing.assert_allclose(three_token_probs(logits), expected, rtol=1e-12)
    # logprobs over a full vocabulary differ from logits by a per-row constant: same answer
    np.testing.assert_allclose(three_token_probs(logits - 40.0), expected, rtol=1e-12)
    np.testing.assert_allclose(three_token_probs([-1000.0, -1000.0, -1000.0]), [1 / 3] * 3)  # no underflow
    for bad in ([1.0, 2.0], [[-np.inf] * 3], [np.nan, 0.0, 0.0]):
        with pytest.raises(ScoringError):
            three_token_probs(bad)


def test_swap_average_hand_example():
    probs = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    # the swapped prompt shows response B first, so its "A" column is the original B
    swapped = [[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]
    np.testing.assert_allclose(swap_average(probs, swapped), [[0.65, 0.25, 0.10], [0.15, 0.35, 0.50]])
    with pytest.raises(ScoringError):
        swap_average(probs, swapped[:1])


def test_unknown_backend_and_cpu_data_parallel_are_refused(tiny_checkpoint):
    with pytest.raises(RecipeError, match="engine.backend: 'onnx' is not one of vllm, vllm-classify"):
        Scorer(tiny_checkpoint, engine("onnx"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ScoringError, match="needs CUDA"):
            Scorer(tiny_checkpoint, engine("transformers", data_parallel_size=2))


# --- tiny random Llama: every backend against the transformers reference --------------------------

def test_sorted_batches_respect_token_budget(tiny_transformers, tiny_prompts):
    lengths = [len(p) for p in tiny_prompts]
    batches = tiny_transformers._impl.batches(lengths)
    assert len(batches) > 3 and sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 1200


def test_transformers_sorted_keeps_input_order(tiny_transformers, tiny_prompts, tiny_reference):
    assert_probs(tiny_reference, len(tiny_prompts))
    perm = np.random.default_rng(1).permutation(len(tiny_prompts))
    permuted = tiny_transformers.score([tiny_prompts[i] for i in perm], progress=False).probs
    np.testing.assert_allclose(permuted, tiny_reference[perm], atol=TINY_TOL)
    # and each row is what the prompt gets when scored alone (no padding at all)
    for i in (0, 5, len(tiny_prompts) - 1):
        alone = tiny_transformers.score([tiny_prompts[i]], progress=False).probs[0]
        np.testing.assert_allclose(alone, tiny_reference[i], atol=TINY_TOL)


def test_naive_equals_sorted(tiny_checkpoint, tiny_prompts, tiny_reference):
    subset = tiny_prompts[:12]  # full-vocabulary logits at every position are slow: 12 rows, 2 batches
    naive = score(tiny_checkpoint, subset, engine("transformers-naive"), progress=False)
    assert_probs(naive.probs, len(subset))
    assert naive.prompt_tokens == sum(map(len, subset)) and naive.seconds > 0
    np.testing.assert_allclose(naive.probs, tiny_reference[:12], atol=TINY_TOL)


def test_vllm_matches_transformers_and_keeps_order(tiny_vllm, tiny_prompts, tiny_reference):
    result = tiny_vllm.score(tiny_prompts, progress=False)
    assert_probs(result.probs, len(tiny_prompts))
    np.testing.assert_allclose(result.probs, tiny_reference, atol=TINY_TOL)
    perm = np.random.default_rng(2).permutation(len(tiny_prompts))
    permuted = tiny_vllm.score([tiny_prompts[i] for i in perm], progress=False).probs
    np.testing.assert_allclose(permuted, tiny_reference[perm], atol=TINY_TOL)


@pytest.mark.slow
def test_vllm_classify_equals_logprob_backend(tiny_checkpoint, tiny_vllm, tiny_prompts):
    logprob = tiny_vllm.score(tiny_prompts, progress=False).probs
    with Scorer(tiny_checkpoint, engine("vllm-classify")) as classify:
        probs = classify.score(tiny_prompts, progress=False).probs
    assert_probs(probs, len(tiny_prompts))
    np.testing.assert_allclose(probs, logprob, atol=TINY_TOL)


def test_prompt_longer_than_max_model_len_is_a_clear_error(tiny_vllm, tiny_transformers):
    limit = tiny_vllm.max_model_len
    assert limit == VLLM_TEST_ENGINE.max_model_len
    fits = [5] * (limit - 1)  # the prompt plus its answer token fill the context exactly
    assert_probs(tiny_vllm.score([fits], progress=False).probs, 1)
    for scorer in (tiny_vllm, tiny_transformers):
        with pytest.raises(ScoringError, match=rf"prompt 1 has {limit} tokens.*max_model_len >= {limit + 1}"):
            scorer.score([[5] * 10, [5] * limit], progress=False)
    with pytest.raises(ScoringError, match="empty"):
        tiny_transformers.score([[]], progress=False)
    assert tiny_vllm.score([], progress=False).probs.shape == (0, 3)


def test_data_parallel_shards_merge_in_input_order(tiny_checkpoint, tiny_prompts, tiny_reference):
    """The data-parallel machinery (spawned ranks, contiguous shards, merge) on CPU with two
    transformers ranks; on GPU the same code gives each rank its own CUDA_VISIBLE_DEVICES."""
    rank = functools.partial(Scorer, str(tiny_checkpoint), engine("transformers"), max_model_len=None)
    dp = DataParallel(rank, ["", ""])
    try:
        np.testing.assert_allclose(dp(tiny_prompts[:7], progress=False), tiny_reference[:7], atol=TINY_TOL)
        with pytest.raises(ScoringError, match="rank 1 failed during scoring"):
            dp([[5] * 3, [5] * 3, [5] * 3, [5] * 99999], progress=False)  # a rank's error comes back
    finally:
        dp.close()
    assert all(not w.is_alive() for w in dp.workers)


# --- the real SmolLM2-135M-Instruct on real prompts -----------------------------------------------

@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_checkpoint):
    builder = PromptBuilder(load_tokenizer(smollm2_checkpoint), PromptConfig(max_length=256))
    prompts = []
    for name in ("mtbench_human_turn1.csv", "pandalm_test.csv"):
        with open(DATA / name, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[::97][:4]  # spread out: neighbours share their prompt
        for row in rows:
            prompts.append(builder.build(*(json.loads(row[k]) for k in ("prompt", "response_a", "response_b"))))
    return prompts


def test_vllm_matches_transformers_on_smollm2(smollm2_checkpoint, smollm2_vllm, smollm2_prompts):
    assert len({len(p) for p in smollm2_prompts}) >= 4  # lengths differ
    reference = score(smollm2_checkpoint, smollm2_prompts, engine("transformers", batch_tokens=1024),
                      progress=False)
    result = smollm2_vllm.score(smollm2_prompts, progress=False)
    assert_probs(result.probs, len(smollm2_prompts))
    np.testing.assert_allclose(result.probs, reference.probs, atol=SMOLLM2_TOL)
