"""The engines datagen shares between respond and label: one open at a time, reused when they match."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ..recipe import EngineConfig, Recipe
from . import DatagenError


class Engines:
    """Scorers (vLLM engines) by checkpoint, started when first asked for. Engines passed in
    `provided` ({checkpoint dir: Scorer}, e.g. test fixtures) are used and never closed; of the ones
    started here at most one is open at a time, so a generator that is also the teacher is reused."""

    def __init__(self, provided: Mapping[str | Path, object] | None = None, trust_remote_code: bool = False):
        self.provided = {str(Path(k)): v for k, v in (provided or {}).items()}
        self.trust_remote_code = trust_remote_code
        self.owned: tuple[tuple, object] | None = None

    def get(self, checkpoint: Path, engine: EngineConfig):
        if engine.backend == "vllm" and engine.data_parallel_size == 1 and str(checkpoint) in self.provided:
            return self.provided[str(checkpoint)]
        key = (str(checkpoint), dataclasses.astuple(engine))
        if self.owned and self.owned[0] == key:
            return self.owned[1]
        self.close()
        from ..scoring import Scorer

        self.owned = (key, Scorer(checkpoint, engine, trust_remote_code=self.trust_remote_code))
        return self.owned[1]

    def close(self) -> None:
        from ..scoring import keep_torch_threads

        if self.owned:
            with keep_torch_threads():  # training may follow
                self.owned[1].close()
            self.owned = None

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vllm_of(scorer):
    """The vLLM `LLM` behind a Scorer (logprob or classify backend, one engine)."""
    llm = scorer.llm
    if llm is None:
        raise DatagenError("respond needs a vLLM engine (engine.backend vllm, data_parallel_size 1)")
    return llm


def engine_configs(recipe: Recipe) -> tuple[EngineConfig, EngineConfig]:
    """(generation engine, teacher engine). Generation always runs on one vLLM engine sized for the
    prompt budget + max_tokens; the teacher shares it when the recipe's engine is plain vLLM."""
    g = recipe.generate
    length = max(recipe.engine.max_model_len or 0, recipe.prompt.max_length + 8, g.max_prompt_tokens + g.max_tokens)
    # Generation needs the in-process LLM (not a Ray actor pool); the teacher may score on Ray.
    generation = dataclasses.replace(recipe.engine, backend="vllm", data_parallel_size=1, max_model_len=length,
                                     executor="local")
    if recipe.engine.backend == "vllm" and recipe.engine.data_parallel_size == 1 and recipe.engine.executor == "local":
        return generation, generation
    teacher = dataclasses.replace(recipe.engine, max_model_len=recipe.engine.max_model_len or recipe.prompt.max_length + 8)
    return generation, teacher



def work_dir(recipe: Recipe) -> Path:
    from ..models import cache_dir

    return Path(recipe.generate.work_dir).expanduser() if recipe.generate.work_dir else cache_dir() / "datagen"

