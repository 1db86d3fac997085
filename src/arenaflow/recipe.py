"""Experiment recipes: YAML files under experiments/ parsed into typed dataclasses.

A recipe has one section per pipeline stage. `load_recipe(path, overrides)` reads the YAML, applies
`section.key=value` overrides (CLI `--set` / MLproject `-P`), and checks every key and type, so a
typo fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ArenaflowError


class RecipeError(ArenaflowError, ValueError):
    """A recipe file or override that does not match the dataclasses below."""


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=lambda: ["data/mtbench_human_turn1.csv"])
    valid_fraction: float = 0.2
    group_column: str | None = None  # None: group by prompt text
    swap_augment: bool = True
    max_rows: int | None = None  # user-asked subsample before splitting; None keeps every row
    seed: int = 42
    valid_files: list[str] = field(default_factory=list)  # whole files of `files` held out as validation


@dataclass
class ModelConfig:
    base: str = "gguf:smollm2-135m-instruct"
    trust_remote_code: bool = False


@dataclass
class PromptConfig:
    max_length: int = 512
    prompt_share: float = 0.2  # share of the content budget for the prompt; responses split the rest
    head_share: float = 0.3  # share of a truncated part kept from its head; the rest is its tail


@dataclass
class TrainConfig:
    load_in_4bit: bool = True
    bnb_4bit_compute_dtype: str = "float32"
    head: str = "lm"  # "lm": answer-token loss on the LM head; "classifier": 3-way head
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    # auto: finetune picks checkpointing and the micro-batch on a GPU from the memory plan (plan_stages.py)
    gradient_checkpointing: bool | typing.Literal["auto"] = False
    max_train_rows: int | None = None  # None: every training row
    max_valid_rows: int | None = None  # None: every validation row
    warmup_ratio: float = 0.05
    keep_best_epoch: bool = False  # save the adapter of the epoch with the lowest validation log_loss
    seed: int = 42
    # Speed levers (train.py; `arenaflow bench --train` times them); each default is the behaviour before them.
    adapter_dtype: str = "compute"  # LoRA weights: compute (= bnb_4bit_compute_dtype, float16 -> float32), float32, bfloat16
    upcast_layer_norms: bool = True  # 4-bit: peft's float32 upcast of norms, embeddings and LM head
    autocast: str = "auto"  # Trainer autocast: auto (bf16 when compute is bfloat16 without 4-bit), off, bfloat16, float16
    attn_implementation: str | None = None  # sdpa, eager, flex_attention, flash_attention_2/3; None: transformers' default
    padding_free: bool = False  # each micro-batch packed into one row with position_ids, no pad tokens
    group_by_length: bool = False  # micro-batches of similar lengths (transformers' LengthGroupedSampler)
    optim: str = "adamw_torch_fused"  # transformers optimizer name (adamw_torch, adamw_torch_fused, ...)
    torch_compile: bool = False  # torch.compile the model (the Trainer's torch_compile)
    use_liger_kernel: bool = False  # Liger's RMSNorm/SwiGLU/RoPE kernels (needs the liger-kernel package)
    processes: int = 1  # > 1: finetune under `accelerate launch` (DDP, one process per GPU; train_launch.py)


@dataclass
class QuantConfig:
    scheme: str = "W4A16"  # W4A16 (AWQ), W8A16 (AWQ), or "none"
    method: str = "awq"  # awq (llm-compressor) or rtn; "autoawq" is refused with the reason
    group_size: int = 64
    merge_dtype: str = "float32"
    merge_base: str = "original"  # nf4: merge into the NF4-rounded weights a QLoRA adapter was trained on
    calibration_rows: int = 64
    calibration_max_length: int = 512
    awq_n_grid: int = 20  # AWQ scale-search points per layer; fewer is proportionally faster
    max_log_loss_delta: float | None = 0.005  # register a quantized checkpoint only within this of the merged one
    fallback_schemes: list[str] = field(default_factory=list)  # tried in order past the bound; then the merged model


@dataclass
class CalibrationConfig:
    method: str = "vector"  # none, temperature, vector (temperature + class biases), stacker (calibration.py)
    folds: int = 5  # cross-fitting folds when validation rows come from one source (else one per source)


@dataclass
class EngineConfig:
    backend: str = "vllm"  # vllm (logprobs), vllm-classify (pooling), transformers
    dtype: str = "auto"
    quantization: str | None = None  # vLLM online quantization of a full-precision checkpoint: "fp8" (W8A8)
    max_model_len: int | None = None  # None: prompt.max_length + 8
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # independent engines, one per GPU, each on a shard of the rows
    pipeline_parallel_size: int = 1  # vLLM pipeline stages: the layers split over GPUs (or nodes, ray backend)
    distributed_executor_backend: str | None = None  # vLLM's executor for tp x pp > 1: mp, ray; None: vLLM's
    executor: str = "local"  # local: engines in this process; ray: Ray Data scorer actors (ray_scoring.py)
    ray_actors: int | None = None  # executor=ray: scorer actors; None: as many as the cluster fits
    ray_cpus_per_actor: int = 1  # executor=ray: CPU cores (threads) one scorer actor reserves
    ray_batch_rows: int = 256  # executor=ray: prompts per Ray Data batch (what a restarted actor redoes)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    max_num_batched_tokens: int | None = None
    cpu_kv_cache_gib: float = 1.0
    swap_tta: bool = False
    batch_tokens: int = 16384  # transformers backend: tokens per length-sorted batch
    shard_rows: int = 256  # rows per resumable shard in infer


@dataclass
class RegistryConfig:
    model_name: str = "arenaflow"
    alias: str = "champion"


@dataclass
class GenerateConfig:
    """LLM-generated training data (the datagen package); `modes` beyond "ingest" switch it on."""

    modes: list[str] = field(default_factory=lambda: ["ingest"])  # ingest, respond, label, dedup, filter
    prompts_file: str | None = None  # jsonl/csv with a `prompt` column; None: prompts of the ingested rows
    n_prompts: int | None = 32  # prompts drawn (after filter/dedup) for respond; None: all of them
    generators: list[str] = field(default_factory=lambda: ["gguf:smollm2-135m-instruct"])  # model references
    temperatures: list[float] = field(default_factory=lambda: [0.3, 1.0])  # one response per generator x temperature
    top_p: float = 0.95
    max_tokens: int = 64  # generated tokens per response (per turn)
    max_prompt_tokens: int = 384  # chat-rendered prompt budget; longer prompts are skipped (counted)
    seed: int = 42  # prompt sample, per-request sampling seeds, A/B order of pairs
    shard_size: int = 16  # prompts (respond) / rows (label) per resumable shard
    teacher: str = "models:/arenaflow@champion"  # label: model reference scoring the pairs
    teacher_fallback: str | None = "gguf:smollm2-135m-instruct"  # used when `teacher` is not registered
    teacher_swap_tta: bool = True  # teacher scores both A/B orders and averages (removes position bias)
    confidence_threshold: float | None = 0.6  # hard label where max prob >= this; None: soft labels only
    drop_unconfident: bool = False  # drop teacher-labelled rows below the threshold (counted)
    dedup_threshold: float = 0.8  # shingle Jaccard at or above which a prompt is a near-duplicate
    shingle_size: int = 5  # characters per shingle of the normalised prompt
    min_prompt_chars: int = 8
    max_prompt_chars: int = 2000
    min_response_chars: int = 1
    max_response_chars: int = 4000
    min_ascii_share: float = 0.9  # share of ASCII among letters (a cheap "is English" check); 0 disables
    sample_rows: int = 8  # generated rows written to samples.jsonl / samples.html
    work_dir: str | None = None  # resumable shards; None: <ARENAFLOW_CACHE>/datagen


@dataclass
class Recipe:
    name: str = "cpu-smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    path: str | None = None  # where it was loaded from (not a recipe key)


class Quoted(str):
    """An override value written in quotes: a literal string, never None and never split on commas."""


def _coerce(value, tp, where: str):
    """Check/convert a YAML value to the annotated type `tp`, naming `where` on failure.

    A plain string is read the way an unquoted override is (`none`/`null`/empty -> None for Optional
    fields, `a,b` -> a list for list fields); a `Quoted` one is taken literally.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if (type(None) in args and isinstance(value, str) and not isinstance(value, Quoted)
                and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:  # e.g. `bool | Literal["auto"]`: the first type that takes the value
            try:
                return _coerce(value, candidate, where)
            except RecipeError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, Quoted):
            value = [value]
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and converted != value:
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return converted
    if tp is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise RecipeError(f"{where}: unsupported type {tp}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


_QUOTES = "\"'"


def _quoted(text: str, pos: int, item: str) -> tuple[Quoted, int]:
    """The quoted string starting at text[pos] and the index after its closing quote."""
    close = text.find(text[pos], pos + 1)
    if close < 0:
        raise RecipeError(f"override {item!r}: unbalanced {text[pos]} quote")
    return Quoted(text[pos + 1:close]), close + 1


def _list(text: str, pos: int, item: str) -> tuple[list[str], int]:
    """The `[a, "b,c"]` list starting at text[pos] and the index after its `]`."""
    elements: list[str] = []
    pos += 1
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            raise RecipeError(f"override {item!r}: unclosed [")
        if text[pos] == "]" and not elements:
            return elements, pos + 1  # []
        if text[pos] in _QUOTES:
            element, pos = _quoted(text, pos, item)
        else:
            stop = pos
            while stop < len(text) and text[stop] not in ",]" + _QUOTES + "[":
                stop += 1
            element = text[pos:stop].strip()
            if stop < len(text) and text[stop] in _QUOTES + "[":
                raise RecipeError(f"override {item!r}: a list element is bare or entirely quoted, "
                                  "and lists do not nest")
            if not element:
                raise RecipeError(f"override {item!r}: empty list element")
            if any(c.isspace() for c in element):
                raise RecipeError(f"override {item!r}: list element {element!r} has a space; "
                                  "quote it or add the missing comma")
            pos = stop
        elements.append(element)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            raise RecipeError(f"override {item!r}: unclosed [")
        if text[pos] == "]":
            return elements, pos + 1
        if text[pos] != ",":
            raise RecipeError(f"override {item!r}: expected , or ] after list element {element!r}")
        pos += 1


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.epochs=2 data.files=a.csv,b.csv"]` -> nested dict of raw values, typed later by `_coerce`.

    Each item (one `--set`, or the whole MLproject `overrides` string) holds `section.key=value`
    overrides separated by whitespace. A value is one of:

    - bare: no whitespace and no quotes (`train.epochs=2`, `data.files=a.csv,b.csv`). It is typed by
      the field: `none`/`null`/empty is None for an Optional field (still the string "none" for a
      plain str field such as quant.scheme); a list field splits it on commas.
    - quoted, the whole value in '...' or "...": the literal string inside, which may hold spaces,
      commas and the other quote (`generate.prompts_file="my prompts.jsonl"`,
      `data.group_column="none"`). It is never None and never split: a list field gets it as its
      one element (a bool or number field converts it as it would the bare text). No escapes.
    - a list, `[a.csv, "b,c.csv"]`: comma-separated elements, each bare (no spaces inside; those
      around it are dropped) or quoted as above; `[]` is empty; lists do not nest.

    Anything else is refused with a RecipeError naming the override: a missing `=`, an unbalanced
    quote or `[`, text glued to a closing quote or `]`, or a quote inside a bare value.
    """
    nested: dict = {}
    for text in overrides or []:
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                break
            start = pos
            while pos < len(text) and not text[pos].isspace() and text[pos] != "=":
                pos += 1
            key, item = text[start:pos], text[start:]  # item: from this override on, for errors
            if pos == len(text) or text[pos] != "=" or not all(key.split(".")):
                raise RecipeError(f"override {item.split()[0]!r}: expected section.key=value "
                                  "(quote a value with spaces: key=\"a b\")")
            pos += 1
            if pos < len(text) and text[pos] in _QUOTES:
                value, pos = _quoted(text, pos, item)
            elif pos < len(text) and text[pos] == "[":
                value, pos = _list(text, pos, item)
            else:
                stop = pos
                while stop < len(text) and not text[stop].isspace():
                    stop += 1
                value, pos = text[pos:stop], stop
                if any(q in value for q in _QUOTES):
                    raise RecipeError(f"override {item.split()[0]!r}: quote the whole value or none of it")
            if pos < len(text) and not text[pos].isspace():
                raise RecipeError(f"override {item!r}: unexpected {text[pos]!r} after the value "
                                  f"of {key}")
            *sections, leaf = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    raise RecipeError(f"override {key}: {section} was set to a value, not a section")
            if isinstance(node.get(leaf), dict):
                raise RecipeError(f"override {key}: {leaf} is a section; set section.key=value")
            node[leaf] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the built-in defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    where = "recipe"
    if path:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections")
    recipe = _build(Recipe, _merge(raw, parse_overrides(overrides)), where)
    recipe.path = str(path) if path else None
    return recipe


def flatten(recipe: Recipe) -> dict[str, object]:
    """`{"train.epochs": 1.0, ...}` for mlflow.log_params (lists joined by commas)."""
    flat: dict[str, object] = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                v = getattr(value, sub.name)
                flat[f"{f.name}.{sub.name}"] = ",".join(map(str, v)) if isinstance(v, list) else v
        elif f.name != "path":
            flat[f.name] = value
    return flat
