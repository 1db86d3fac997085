"""respond: prompts -> one response per generator x temperature (vLLM) -> unlabelled A/B pairs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from .. import data as data_mod
from ..data import CANONICAL
from ..models import ModelRef, local_model_ref
from ..recipe import Recipe
from ..shards import digest, run_shards
from . import DatagenError, GENERATED_SOURCE
from .engines import Engines, engine_configs, vllm_of, work_dir


def stable_int(*parts, bits: int = 31) -> int:
    """A reproducible non-negative integer from any JSON-able parts (Python's hash() is salted)."""
    return int(digest(parts)[:16], 16) % (1 << bits)



def read_prompts_file(path: str | Path) -> pd.DataFrame:
    """A jsonl/csv/parquet file with a `prompt` column (a JSON list of turns or plain text) ->
    rows with `prompt` (list of turns) and `group` (file name + prompt)."""
    path = Path(path)
    frame = data_mod.read_table(path)
    if "prompt" not in frame.columns:
        raise DatagenError(f"{path}: no `prompt` column; found {list(frame.columns)}")
    prompts = []
    for i, value in enumerate(frame["prompt"]):
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # plain text that happens to start with "["
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(t is None or isinstance(t, str) for t in value):
            raise DatagenError(f"{path}, row {i + 1}, column 'prompt': expected text or a JSON list of strings, got {value!r}")
        prompts.append(value)
    return pd.DataFrame({"prompt": prompts, "group": [f"{path.name}:{json.dumps(p)}" for p in prompts]})


def prompt_pool(rows: pd.DataFrame) -> pd.DataFrame:
    """One row (prompt, group) per distinct prompt of canonical rows, in first-seen order."""
    keys = rows["prompt"].map(json.dumps)
    first = ~keys.duplicated()
    return pd.DataFrame({"prompt": list(rows["prompt"][first]), "group": list(rows["group"][first])})



@dataclass
class Responses:
    texts: list[list[str] | None]  # per prompt: one response per prompt turn; None: did not fit the engine
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the generator's chat template, ending with the assistant prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatagenError(f"generator tokenizer {tokenizer.name_or_path!r} has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def respond(llm, tokenizer, prompts: Sequence[Sequence[str | None]], *, temperature: float, top_p: float,
            max_tokens: int, seed: int, max_prompt_tokens: int, max_model_len: int | None,
            salt: str = "", progress: bool = True) -> Responses:
    """Generate one response per turn of every prompt with a vLLM `LLM` (multi-turn prompts see their
    own earlier answers). A prompt whose rendered ids exceed `max_prompt_tokens`, or leave less than
    `max_tokens` room in `max_model_len`, gets None. Per-request seeds make the output independent of
    how prompts are batched."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    answers: list[list[str]] = [[] for _ in prompts]
    alive = [True] * len(prompts)
    result = Responses(texts=[])
    for turn in range(max((len(p) for p in prompts), default=0)):
        todo, inputs, params = [], [], []
        for i, prompt in enumerate(prompts):
            if not alive[i] or turn >= len(prompt):
                continue
            messages = []
            for user, answer in zip(prompt[:turn], answers[i]):
                messages += [{"role": "user", "content": user or ""}, {"role": "assistant", "content": answer}]
            ids = render_chat(tokenizer, messages + [{"role": "user", "content": prompt[turn] or ""}])
            if len(ids) > max_prompt_tokens or (max_model_len and len(ids) + max_tokens > max_model_len):
                alive[i] = False
                continue
            todo.append(i)
            inputs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                         seed=stable_int(seed, salt, json.dumps(list(prompt)), turn)))
            result.prompt_tokens += len(ids)
        if not todo:
            continue
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=progress)
        result.seconds += time.perf_counter() - start
        for i, out in zip(todo, outputs):
            completion = out.outputs[0]
            answers[i].append(completion.text.strip())
            result.generated_tokens += len(completion.token_ids)
    result.texts = [a if ok else None for a, ok in zip(answers, alive)]
    return result


@dataclass(frozen=True)
class Variant:
    generator: str  # model reference as in the recipe
    temperature: float

    @property
    def name(self) -> str:
        from ..models import model_short_name

        return f"{model_short_name(self.generator)}@t{self.temperature:g}"


def make_pairs(pool: pd.DataFrame, variants: Sequence[Variant], texts: Mapping[Variant, Sequence[list[str] | None]],
               seed: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Canonical unlabelled rows: every pair of variants on every prompt. Which variant is A is drawn
    per row (reproducibly), so neither position is always the hotter sampler."""
    records, skipped = [], 0
    for i, (prompt, group) in enumerate(zip(pool["prompt"], pool["group"])):
        key = json.dumps(list(prompt))
        for first, second in combinations(variants, 2):
            a, b = texts[first][i], texts[second][i]
            if a is None or b is None:
                skipped += 1
                continue
            if stable_int(seed, key, first.name, second.name) % 2:
                first, second, a, b = second, first, b, a
            records.append({
                "id": "gen-" + digest([key, first.name, second.name])[:16], "source": GENERATED_SOURCE,
                "prompt": list(prompt), "response_a": a, "response_b": b, "label": -1,
                "p_a": np.nan, "p_b": np.nan, "p_tie": np.nan, "group": group, "swapped": False,
                "model_a": first.name, "model_b": second.name,
            })
    frame = pd.DataFrame.from_records(records, columns=[*CANONICAL, "model_a", "model_b"])
    frame["label"] = frame["label"].astype(np.int64)
    frame["swapped"] = frame["swapped"].astype(bool)
    return frame, {"pairs": len(frame), "pairs_skipped_too_long": skipped}



def generate_rows(recipe: Recipe, pool: pd.DataFrame, engines: Engines, counts: dict, speed: dict,
                  progress: bool = True, resolve: Callable[[str], ModelRef] = local_model_ref) -> pd.DataFrame:
    """respond: every generator x temperature on every prompt of `pool`, in resumable shards -> pairs;
    `resolve(reference)` turns a generator reference into its ModelRef (the stage's reads the registry)."""
    from transformers import AutoTokenizer

    g = recipe.generate
    variants = [Variant(gen, float(t)) for gen in g.generators for t in g.temperatures]
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or len(names) < 2:
        raise DatagenError("respond needs at least two generator x temperature variants with distinct names "
                           f"(model short name @ temperature) to make pairs; got {names}")
    generation_engine, _ = engine_configs(recipe)
    prompts = [list(p) for p in pool["prompt"]]
    texts: dict[Variant, list] = {}
    fresh = {"responses": 0, "generated_tokens": 0, "prompt_tokens": 0, "seconds": 0.0}
    resumed = 0
    for generator in g.generators:
        ref = resolve(generator)
        tokenizer = AutoTokenizer.from_pretrained(ref.checkpoint, trust_remote_code=recipe.model.trust_remote_code)
        scorer = None
        for variant in (v for v in variants if v.generator == generator):
            manifest = {"kind": "respond", "generator": ref.uri, "version": ref.version,
                        "checkpoint": None if ref.version else str(ref.checkpoint), "variant": variant.name,
                        "temperature": variant.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
                        "max_prompt_tokens": g.max_prompt_tokens, "seed": g.seed, "shard_size": g.shard_size,
                        "prompts": digest(prompts), "n": len(prompts)}

            def compute(lo: int, hi: int, variant=variant) -> dict:
                nonlocal scorer
                scorer = scorer or engines.get(ref.checkpoint, generation_engine)
                out = respond(vllm_of(scorer), tokenizer, prompts[lo:hi], temperature=variant.temperature,
                              top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed, salt=variant.name,
                              max_prompt_tokens=g.max_prompt_tokens, max_model_len=scorer.max_model_len,
                              progress=progress)
                return dataclasses.asdict(out)

            shards, done_now = run_shards(work_dir(recipe) / "respond", manifest, len(prompts), g.shard_size,
                                          compute, desc=f"respond {variant.name}", progress=progress)
            texts[variant] = [t for shard in shards for t in shard["texts"]]
            for k, shard in enumerate(shards):
                n_ok = sum(t is not None for t in shard["texts"])
                if k in done_now:
                    fresh["responses"] += n_ok
                    for key in ("generated_tokens", "prompt_tokens", "seconds"):
                        fresh[key] += shard[key]
                else:
                    resumed += n_ok
    counts.update({"responses_generated": fresh["responses"], "responses_resumed": resumed,
                   "variants": len(variants)})
    if fresh["seconds"] > 0:
        speed.update({"samples_per_s": fresh["responses"] / fresh["seconds"],
                      "generated_tokens_per_s": fresh["generated_tokens"] / fresh["seconds"],
                      "generate_seconds": fresh["seconds"], "generated_tokens": float(fresh["generated_tokens"]),
                      "generate_prompt_tokens": float(fresh["prompt_tokens"])})
    pairs, found = make_pairs(pool, variants, texts, g.seed)
    counts.update(found)
    return pairs

