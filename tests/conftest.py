"""Shared session fixtures: model checkpoints and the (slow to start) vLLM engines, one per model."""

from __future__ import annotations

import pytest

from arenaflow.models import resolve_model
from arenaflow.recipe import EngineConfig

# float32 so that vLLM and the transformers reference can be compared tightly; 1024 fits the recipes'
# prompt.max_length (512) + 8.
VLLM_TEST_ENGINE = EngineConfig(backend="vllm", dtype="float32", max_model_len=1024, cpu_kv_cache_gib=0.25)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    return resolve_model("tiny:llama")


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    return resolve_model("gguf:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_vllm(tiny_checkpoint):
    """The one vLLM engine (logprob backend) on the tiny model that every test shares."""
    from arenaflow.scoring import Scorer

    with Scorer(tiny_checkpoint, VLLM_TEST_ENGINE) as scorer:
        yield scorer


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2_checkpoint):
    """The one vLLM engine (logprob backend) on SmolLM2-135M-Instruct."""
    from arenaflow.scoring import Scorer

    with Scorer(smollm2_checkpoint, VLLM_TEST_ENGINE) as scorer:
        yield scorer
