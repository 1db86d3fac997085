"""Training data generated with an LLM: respond, label, dedup, filter; `generate_dataset` runs them.

Modes (recipe `generate.modes`, combinable):
  ingest   the recipe's labelled files -> canonical rows (data.py), split by group;
  respond  prompts (the ingested train split's, or `generate.prompts_file`) -> one response per
           generator x temperature (a "variant") with vLLM `LLM.generate` on chat-template token ids;
           every pair of variants on a prompt becomes an unlabelled A/B row (label -1, model_a/model_b
           name the variant, e.g. "smollm2-135m-instruct@t0.3");
  label    rows without any label -> the teacher's P(A), P(B), P(tie) from the same three-token scorer
           as evaluate (`pipeline.predict`) as soft labels p_a/p_b/p_tie, plus a hard label where the
           largest probability reaches `confidence_threshold`;
  dedup    exact (normalised text) and near-duplicate (character-shingle Jaccard) prompts, first kept;
  filter   prompt/response character bounds, an ASCII-share language check, identical A/B responses.
dedup and filter clean the prompts before generation and the generated pairs after it; with respond
off they clean the ingested rows instead. Every count is returned and logged.

Where generated rows go: the ingested rows are split by group first. Prompts for respond come from
the train side only, and a prompts-file prompt equal to a validation prompt (normalised; or near it,
with dedup) is dropped, so validation stays human-labelled and no prompt is on both sides. Generated
rows take the group of their prompt and join train before swap augmentation. Without ingest, the
generated rows themselves are split by group.

Resume: responses and teacher probabilities are computed in shards, each written atomically (temp file
+ rename) under `<work_dir>/{respond,label}/<hash of inputs and settings>/`. A killed run started
again computes only the missing shards; the table is assembled from the shards in order, so no row is
ever duplicated. Sampling seeds are per request (seed, variant, prompt, turn), not per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import math
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from . import data as data_mod
from .data import CANONICAL, SOFT_COLUMNS, TEXT_COLUMNS, DataError
from .recipe import EngineConfig, Recipe

MODES = ("ingest", "respond", "label", "dedup", "filter")
GENERATED_SOURCE = "generated"


class DatagenError(DataError):
    """A generate section or input that cannot produce a dataset as asked."""


# ---------------------------------------------------------------------------------------------
# Small deterministic helpers

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def stable_int(*parts, bits: int = 31) -> int:
    """A reproducible non-negative integer from any JSON-able parts (Python's hash() is salted)."""
    return int(_digest(parts)[:16], 16) % (1 << bits)


def normalize(text: str) -> str:
    """Lower-cased NFKC text with every run of non-alphanumerics collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def row_text(turns: Sequence[str | None]) -> str:
    return "\n".join(t for t in turns if t)


def shingles(text: str, size: int) -> frozenset[str]:
    """Character shingles of normalised text; a text shorter than `size` is one shingle."""
    if len(text) <= size:
        return frozenset([text])
    return frozenset(text[i:i + size] for i in range(len(text) - size + 1))


def ascii_share(text: str) -> float:
    """Share of ASCII characters among the letters (1.0 with no letters: code, numbers)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a file exists under its name only once complete


# ---------------------------------------------------------------------------------------------
# Prompts

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


# ---------------------------------------------------------------------------------------------
# dedup and filter

def _dedup_text(rows: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [normalize("\n\n".join(row_text(turns) for turns in parts)) for parts in zip(*(rows[c] for c in columns))]


def dedup_rows(rows: pd.DataFrame, threshold: float | None, shingle_size: int = 5,
               seen: Sequence[str] = (), columns: Sequence[str] = ("prompt",),
               within: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop rows whose normalised text (of `columns`) equals an earlier row's or one in `seen`
    (exact), or whose shingle Jaccard with one of them is >= `threshold` (near; None: exact only).
    `within=False` compares rows with `seen` only, not with each other.

    Deterministic: rows are visited in order and the first of a cluster is kept. Candidates come from
    an inverted shingle index, so the cost grows with shared shingles, not with n squared.
    """
    texts = _dedup_text(rows, columns)
    seen_norm = [normalize(s) for s in seen]
    exact_seen = set(seen_norm)
    near = threshold is not None and threshold <= 1.0
    index: dict[str, list[int]] = {}
    kept_sets: list[frozenset[str]] = []

    def add(sh: frozenset[str]) -> None:
        kept_sets.append(sh)
        for s in sh:
            index.setdefault(s, []).append(len(kept_sets) - 1)

    def is_near(sh: frozenset[str]) -> bool:
        shared = Counter(j for s in sh for j in index.get(s, ()))
        return any(inter / (len(sh) + len(kept_sets[j]) - inter) >= threshold for j, inter in shared.items())

    if near:
        for text in dict.fromkeys(seen_norm):
            add(shingles(text, shingle_size))
    keep = np.zeros(len(rows), dtype=bool)
    counts = {"exact": 0, "near": 0}
    for i, text in enumerate(texts):
        if text in exact_seen:
            counts["exact"] += 1
            continue
        if near:
            sh = shingles(text, shingle_size)
            if is_near(sh):
                counts["near"] += 1
                continue
            if within:
                add(sh)
        if within:
            exact_seen.add(text)
        keep[i] = True
    return rows[keep], counts


@dataclass
class FilterBounds:
    min_prompt_chars: int = 0
    max_prompt_chars: int | None = None
    min_response_chars: int = 0
    max_response_chars: int | None = None
    min_ascii_share: float = 0.0

    @classmethod
    def of(cls, generate) -> FilterBounds:
        return cls(**{f.name: getattr(generate, f.name) for f in dataclasses.fields(cls)})


def filter_rows(rows: pd.DataFrame, bounds: FilterBounds) -> tuple[pd.DataFrame, dict[str, int]]:
    """Length and language filters on the text columns present (prompt; response_a/b if any).

    A row is counted under the first rule it fails: prompt_short, prompt_long, response_short,
    response_long, non_ascii, identical_responses.
    """
    responses = [c for c in ("response_a", "response_b") if c in rows.columns]
    counts = dict.fromkeys(("prompt_short", "prompt_long", "response_short", "response_long", "non_ascii",
                            "identical_responses"), 0)
    keep = np.ones(len(rows), dtype=bool)
    for i, row in enumerate(rows[["prompt", *responses]].itertuples(index=False)):
        prompt, *answers = (row_text(turns) for turns in row)
        lengths = [len(a) for a in answers]
        checks = (
            ("prompt_short", len(prompt) < bounds.min_prompt_chars),
            ("prompt_long", bounds.max_prompt_chars is not None and len(prompt) > bounds.max_prompt_chars),
            ("response_short", any(n < bounds.min_response_chars for n in lengths)),
            ("response_long", bounds.max_response_chars is not None and any(n > bounds.max_response_chars for n in lengths)),
            ("non_ascii", any(ascii_share(t) < bounds.min_ascii_share for t in (prompt, *answers))),
            ("identical_responses", len(answers) == 2 and normalize(answers[0]) == normalize(answers[1])),
        )
        failed = next((name for name, bad in checks if bad), None)
        if failed:
            counts[failed] += 1
            keep[i] = False
    if not responses:  # a prompt pool: response rules do not apply
        counts = {k: v for k, v in counts.items() if k.startswith("prompt") or k == "non_ascii"}
    return rows[keep], counts


# ---------------------------------------------------------------------------------------------
# respond

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
        from .tracking import model_short_name

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
                "id": "gen-" + _digest([key, first.name, second.name])[:16], "source": GENERATED_SOURCE,
                "prompt": list(prompt), "response_a": a, "response_b": b, "label": -1,
                "p_a": np.nan, "p_b": np.nan, "p_tie": np.nan, "group": group, "swapped": False,
                "model_a": first.name, "model_b": second.name,
            })
    frame = pd.DataFrame.from_records(records, columns=[*CANONICAL, "model_a", "model_b"])
    frame["label"] = frame["label"].astype(np.int64)
    frame["swapped"] = frame["swapped"].astype(bool)
    return frame, {"pairs": len(frame), "pairs_skipped_too_long": skipped}


# ---------------------------------------------------------------------------------------------
# label

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


# ---------------------------------------------------------------------------------------------
# resumable shards

def run_shards(root: Path, manifest: dict, n: int, size: int, compute: Callable[[int, int], dict],
               desc: str, progress: bool = True) -> tuple[list[dict], list[int]]:
    """Split range(n) into shards of `size`; compute the missing ones (each saved atomically as JSON
    under `root/<hash of manifest>/`); return every shard's result in order and the shards computed now."""
    from tqdm.auto import tqdm

    folder = root / _digest(manifest)[:20]
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
    paths = [folder / f"shard_{k:05d}.json" for k in range(math.ceil(n / max(size, 1)))]
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    for k in tqdm(todo, desc=desc, unit="shard", disable=not (progress and todo)):
        result = compute(k * size, min(n, (k + 1) * size))
        _write_atomically(paths[k], json.dumps(result, ensure_ascii=False))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths], todo


# ---------------------------------------------------------------------------------------------
# engines

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
        from .scoring import Scorer

        self.owned = (key, Scorer(checkpoint, engine, trust_remote_code=self.trust_remote_code))
        return self.owned[1]

    def close(self) -> None:
        import torch

        if self.owned:
            threads = torch.get_num_threads()
            self.owned[1].close()
            self.owned = None
            torch.set_num_threads(threads)  # an in-process engine lowers it; training may follow

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
    generation = dataclasses.replace(recipe.engine, backend="vllm", data_parallel_size=1, max_model_len=length)
    if recipe.engine.backend == "vllm" and recipe.engine.data_parallel_size == 1:
        return generation, generation
    teacher = dataclasses.replace(recipe.engine, max_model_len=recipe.engine.max_model_len or recipe.prompt.max_length + 8)
    return generation, teacher


# ---------------------------------------------------------------------------------------------
# teacher

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


def resolve_teacher(recipe: Recipe) -> Teacher:
    """`generate.teacher`; when it is `models:/name@alias` and that alias is not registered (no champion
    yet), `generate.teacher_fallback` instead, with the reason kept. Any other failure is an error."""
    from . import registry
    from .pipeline import resolve_model_ref

    g = recipe.generate
    registry.setup_tracking()
    reason = None
    uri = g.teacher
    if uri.startswith("models:/") and g.teacher_fallback:
        name, alias, _ = registry.parse_models_uri(uri)
        if alias and registry.alias_version(name, alias) is None:
            reason = f"{name}@{alias} is not registered (registry {registry.tracking_uri()})"
            uri = g.teacher_fallback
    ref = resolve_model_ref(uri, recipe)
    return Teacher(uri, ref.checkpoint, ref.version, g.teacher, reason)


# ---------------------------------------------------------------------------------------------
# orchestration

@dataclass
class GeneratedDataset:
    train: pd.DataFrame  # swap-augmented when data.swap_augment
    valid: pd.DataFrame
    generated: pd.DataFrame  # the generated rows (after filter/label), before augmentation
    counts: dict[str, float] = field(default_factory=dict)  # every count, logged as metrics
    speed: dict[str, float] = field(default_factory=dict)  # samples_per_s, generated_tokens_per_s, ...
    teacher: Teacher | None = None
    files: list[str] = field(default_factory=list)


def check_modes(modes: Sequence[str]) -> set[str]:
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise DatagenError(f"generate.modes: unknown mode(s) {unknown}; known: {list(MODES)}")
    if not modes:
        raise DatagenError("generate.modes is empty; e.g. [ingest] or [ingest, respond, label, dedup, filter]")
    return set(modes)


def _clean(rows: pd.DataFrame, modes: set[str], recipe: Recipe, counts: dict, prefix: str,
           columns: Sequence[str], seen: Sequence[str] = ()) -> pd.DataFrame:
    g = recipe.generate
    if "filter" in modes:
        rows, found = filter_rows(rows, FilterBounds.of(g))
        counts.update({f"{prefix}_filtered_{k}": v for k, v in found.items()})
    if "dedup" in modes:
        rows, found = dedup_rows(rows, g.dedup_threshold, g.shingle_size, seen=seen, columns=columns)
        counts.update({f"{prefix}_dedup_{k}": v for k, v in found.items()})
    return rows


def _work_dir(recipe: Recipe) -> Path:
    from .models import cache_dir

    return Path(recipe.generate.work_dir).expanduser() if recipe.generate.work_dir else cache_dir() / "datagen"


def generate_rows(recipe: Recipe, pool: pd.DataFrame, engines: Engines, counts: dict, speed: dict,
                  progress: bool = True) -> pd.DataFrame:
    """respond: every generator x temperature on every prompt of `pool`, in resumable shards -> pairs."""
    from transformers import AutoTokenizer

    from .pipeline import resolve_model_ref

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
        ref = resolve_model_ref(generator, recipe)
        tokenizer = AutoTokenizer.from_pretrained(ref.checkpoint, trust_remote_code=recipe.model.trust_remote_code)
        scorer = None
        for variant in (v for v in variants if v.generator == generator):
            manifest = {"kind": "respond", "generator": ref.uri, "version": ref.version,
                        "checkpoint": None if ref.version else str(ref.checkpoint), "variant": variant.name,
                        "temperature": variant.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
                        "max_prompt_tokens": g.max_prompt_tokens, "seed": g.seed, "shard_size": g.shard_size,
                        "prompts": _digest(prompts), "n": len(prompts)}

            def compute(lo: int, hi: int, variant=variant) -> dict:
                nonlocal scorer
                scorer = scorer or engines.get(ref.checkpoint, generation_engine)
                out = respond(vllm_of(scorer), tokenizer, prompts[lo:hi], temperature=variant.temperature,
                              top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed, salt=variant.name,
                              max_prompt_tokens=g.max_prompt_tokens, max_model_len=scorer.max_model_len,
                              progress=progress)
                return dataclasses.asdict(out)

            shards, done_now = run_shards(_work_dir(recipe) / "respond", manifest, len(prompts), g.shard_size,
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


def label_with_teacher(recipe: Recipe, rows: pd.DataFrame, teacher: Teacher, engines: Engines, counts: dict,
                       speed: dict, progress: bool = True) -> np.ndarray:
    """N x 3 teacher probabilities for canonical rows (pipeline.predict, in resumable shards)."""
    from .models import load_tokenizer
    from .pipeline import predict
    from .prompts import PromptBuilder

    g = recipe.generate
    _, teacher_engine = engine_configs(recipe)
    builder = PromptBuilder(load_tokenizer(teacher.checkpoint, recipe.model.trust_remote_code), recipe.prompt)
    rows_key = [[i, p, a, b] for i, p, a, b in zip(rows["id"], *(rows[c].map(list) for c in TEXT_COLUMNS))]
    manifest = {"kind": "label", "teacher": teacher.identity, "prompt": dataclasses.asdict(recipe.prompt),
                "swap_tta": g.teacher_swap_tta, "shard_size": g.shard_size, "rows": _digest(rows_key), "n": len(rows)}
    spent = {"seconds": 0.0, "rows": 0}

    def compute(lo: int, hi: int) -> dict:
        scorer = engines.get(teacher.checkpoint, teacher_engine)
        result = predict(scorer, builder, rows.iloc[lo:hi], g.teacher_swap_tta, progress=progress)
        spent["seconds"] += result.seconds
        spent["rows"] += hi - lo
        return {"probs": result.probs.tolist(), "seconds": result.seconds}

    shards, done_now = run_shards(_work_dir(recipe) / "label", manifest, len(rows), g.shard_size, compute,
                                  desc="label", progress=progress)
    counts["rows_label_resumed"] = len(rows) - spent["rows"]
    if spent["seconds"] > 0:
        speed["label_samples_per_s"] = spent["rows"] / spent["seconds"]
    return np.array([p for shard in shards for p in shard["probs"]], dtype=np.float64).reshape(-1, 3)


def build_dataset(recipe: Recipe, files: Sequence[str | Path] | None = None, *,
                  engines: Mapping[str | Path, object] | None = None, progress: bool = True) -> GeneratedDataset:
    """Every mode of `recipe.generate.modes` (see the module doc) -> train/valid canonical rows.

    `engines` maps checkpoint dirs to already started Scorers to use (never closed here).
    No MLflow logging (teacher resolution reads the registry); `generate_dataset` logs."""
    g, d = recipe.generate, recipe.data
    modes = check_modes(g.modes)
    files = [str(f) for f in (files or d.files)]
    counts: dict[str, float] = {}
    speed: dict[str, float] = {}
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in CANONICAL})
    real = train_real = valid_real = None
    if "ingest" in modes or ("respond" in modes and not g.prompts_file):
        real, ingested = data_mod.ingest(files, d.group_column, d.max_rows, d.seed)
        counts.update(ingested)
    if "ingest" in modes:
        if "respond" not in modes:
            real = _clean(real, modes, recipe, counts, "rows", TEXT_COLUMNS)
        train_real, valid_real = data_mod.grouped_split(real, d.valid_fraction, d.seed)
        counts.update(rows_train=len(train_real), rows_valid=len(valid_real))

    generated = empty.iloc[0:0].copy()
    teacher = None
    with Engines(engines, recipe.model.trust_remote_code) as pool_engines:
        if "respond" in modes:
            pool = read_prompts_file(g.prompts_file) if g.prompts_file else \
                prompt_pool(train_real if train_real is not None else real)
            counts["prompts_distinct"] = len(pool)
            valid_prompts = [row_text(p) for p in prompt_pool(valid_real)["prompt"]] if valid_real is not None else []
            if valid_prompts:  # never generate for a prompt that validation holds
                pool, found = dedup_rows(pool, g.dedup_threshold if "dedup" in modes else None, g.shingle_size,
                                         seen=valid_prompts, within=False)
                counts["prompts_in_valid_dropped"] = found["exact"] + found["near"]
            pool = _clean(pool, modes, recipe, counts, "prompts", ("prompt",))
            pool = data_mod.subsample(pool, g.n_prompts, g.seed).reset_index(drop=True)
            counts["prompts_used"] = len(pool)
            if pool.empty:
                raise DatagenError("respond: no prompt left after the valid-overlap, filter and dedup steps "
                                   f"({ {k: v for k, v in counts.items() if k.startswith('prompts')} })")
            generated = generate_rows(recipe, pool, pool_engines, counts, speed, progress)
            if "filter" in modes:
                generated, found = filter_rows(generated, FilterBounds.of(g))
                counts.update({f"pairs_filtered_{k}": v for k, v in found.items()})
        if "label" in modes:
            parts = {"generated": generated, "train": train_real, "valid": valid_real}
            todo = {k: v for k, v in parts.items() if v is not None and len(v) and unlabelled(v).any()}
            counts["rows_to_label"] = sum(int(unlabelled(v).sum()) for v in todo.values())
            if todo:
                teacher = resolve_teacher(recipe)
                stacked = pd.concat([v[unlabelled(v)] for v in todo.values()], ignore_index=True)
                probs = label_with_teacher(recipe, stacked, teacher, pool_engines, counts, speed, progress)
                offset = 0
                for name, part in todo.items():
                    mask = unlabelled(part)
                    n = int(mask.sum())
                    labelled, found = apply_teacher(part[mask], probs[offset:offset + n], g.confidence_threshold,
                                                    g.drop_unconfident)
                    offset += n
                    for k, v in found.items():
                        counts[k] = counts.get(k, 0) + v
                    merged = pd.concat([part[~mask], labelled]).sort_index()
                    if name == "generated":
                        generated = merged
                    elif name == "train":
                        train_real = merged
                    else:
                        valid_real = merged

    generated = generated.reset_index(drop=True)
    counts["rows_generated"] = len(generated)
    if train_real is not None:
        train = pd.concat([train_real, generated], ignore_index=True) if len(generated) else train_real
        valid = valid_real
    elif len(generated):
        train, valid = data_mod.grouped_split(generated, d.valid_fraction, d.seed)
    else:
        raise DatagenError(f"generate.modes={sorted(modes)} produced no rows (add ingest or respond)")
    counts.update(rows_train_total=len(train), rows_valid_total=len(valid))
    if d.swap_augment:
        train = pd.concat([train, data_mod.swap_ab(train)], ignore_index=True)
    counts["rows_train_augmented"] = len(train)
    order = lambda f: f[list(CANONICAL) + [c for c in f.columns if c not in CANONICAL]].reset_index(drop=True)  # noqa: E731
    return GeneratedDataset(order(train), order(valid), generated, counts, speed, teacher, files)


# ---------------------------------------------------------------------------------------------
# outputs and MLflow

def sample_records(rows: pd.DataFrame, n: int) -> list[dict]:
    columns = [c for c in ("id", "model_a", "model_b", *TEXT_COLUMNS, "label", *SOFT_COLUMNS) if c in rows.columns]
    records = []
    for record in rows.head(n)[columns].to_dict("records"):
        records.append({k: (list(v) if isinstance(v, (list, np.ndarray)) else
                            None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
                        for k, v in record.items()})
    return records


def samples_html(records: list[dict], title: str) -> str:
    if not records:
        return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><p>no rows</p>\n"
    columns = list(records[0])

    def cell(v) -> str:
        text = "\n---\n".join(t or "" for t in v) if isinstance(v, list) else ("" if v is None else str(v))
        return f"<td><pre>{html.escape(text)}</pre></td>"

    body = "".join("<tr>" + "".join(cell(r[c]) for c in columns) + "</tr>\n" for r in records)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>td,th{border:1px solid #ccc;vertical-align:top}pre{white-space:pre-wrap;max-width:40em}</style>"
            f"<table><tr>{head}</tr>\n{body}</table>\n")


def dataset_metrics(dataset: GeneratedDataset) -> dict[str, float]:
    """Counts, per-source row counts, label distributions and speeds, as MLflow metrics."""
    metrics = {k: float(v) for k, v in dataset.counts.items()}
    for split, rows in (("train", dataset.train), ("valid", dataset.valid)):
        for source, n in rows["source"].value_counts().sort_index().items():
            metrics[f"rows_{split}.{source}"] = float(n)
        if (rows["label"] >= 0).any():
            metrics.update({f"{split}_{k}": v for k, v in data_mod.label_distribution(rows).items()})
    gen = dataset.generated
    if len(gen):
        if (gen["label"] >= 0).any():
            metrics.update({f"generated_{k}": v for k, v in data_mod.label_distribution(gen).items()})
        soft = gen[list(SOFT_COLUMNS)].to_numpy(dtype=float)
        if np.isfinite(soft).all():
            metrics.update({f"generated_mean_{c}": float(m) for c, m in zip(SOFT_COLUMNS, soft.mean(axis=0))})
    metrics.update(dataset.speed)
    return metrics


def write_outputs(dataset: GeneratedDataset, out: Path, sample_rows: int = 8) -> list[Path]:
    """train/valid/generated parquet (data/) and generated sample rows (samples/) under `out`."""
    written = [data_mod.write_parquet(dataset.train, out / "data" / "train.parquet"),
               data_mod.write_parquet(dataset.valid, out / "data" / "valid.parquet")]
    if len(dataset.generated):
        written.append(data_mod.write_parquet(dataset.generated, out / "data" / "generated.parquet"))
        records = sample_records(dataset.generated, sample_rows)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        jsonl = out / "samples" / "samples.jsonl"
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        page = out / "samples" / "samples.html"
        page.write_text(samples_html(records, "arenaflow generated rows"), encoding="utf-8")
        written += [jsonl, page]
    return written


def log_dataset(dataset: GeneratedDataset, recipe: Recipe) -> dict[str, float]:
    """Into the active MLflow run: metrics, teacher tags, dataset inputs with digests, artifacts
    `data/{train,valid,generated}.parquet` and `samples/samples.{jsonl,html}`."""
    import tempfile

    import mlflow

    from .tracking import log_rows_dataset

    if mlflow.active_run() is None:
        raise DatagenError("log_dataset needs an active MLflow run (pipeline.datagen opens one)")
    metrics = dataset_metrics(dataset)
    mlflow.log_metrics(metrics)
    source = ",".join(dataset.files + ([recipe.generate.prompts_file] if recipe.generate.prompts_file else []))
    tags = {"generate_modes": ",".join(recipe.generate.modes)}
    if dataset.teacher:
        tags.update(teacher=dataset.teacher.uri, teacher_requested=dataset.teacher.requested,
                    teacher_version=dataset.teacher.version or "",
                    teacher_fallback_reason=dataset.teacher.fallback_reason or "")
    for split, rows, context in (("train", dataset.train, "training"), ("valid", dataset.valid, "validation"),
                                 ("generated", dataset.generated, "generated")):
        if len(rows):
            tags[f"{split}_digest"] = log_rows_dataset(rows, source=source or "generated",
                                                       name=f"{recipe.name}-{split}", context=context)
    mlflow.set_tags(tags)
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(dataset, Path(tmp), recipe.generate.sample_rows)
        mlflow.log_artifacts(str(Path(tmp) / "data"), "data")
        if (Path(tmp) / "samples").exists():
            mlflow.log_artifacts(str(Path(tmp) / "samples"), "samples")
    return metrics


def generate_dataset(recipe: Recipe, files: Sequence[str | Path] | None = None, *,
                     engines: Mapping[str | Path, object] | None = None, progress: bool = True) -> GeneratedDataset:
    """`build_dataset` then `log_dataset` into the active MLflow run (what pipeline.datagen calls)."""
    dataset = build_dataset(recipe, files, engines=engines, progress=progress)
    metrics = log_dataset(dataset, recipe)
    if dataset.teacher:
        used = dataset.teacher.uri + (f" v{dataset.teacher.version}" if dataset.teacher.version else "")
        why = f" (fallback: {dataset.teacher.fallback_reason})" if dataset.teacher.fallback_reason else ""
        print(f"datagen: teacher {used}{why}")
    shown = ("rows_train", "rows_valid", "prompts_used", "responses_generated", "responses_resumed", "pairs",
             "rows_generated", "rows_hard_labelled", "rows_train_augmented", "samples_per_s", "generated_tokens_per_s")
    print("datagen: " + ", ".join(f"{k}={metrics[k]:g}" for k in shown if k in metrics))
    return dataset
