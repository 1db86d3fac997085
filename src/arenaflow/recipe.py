"""Experiment recipes: YAML files under experiments/ parsed into typed dataclasses.

A recipe has one section per pipeline stage. `load_recipe(path, overrides)` reads the YAML, applies
`section.key=value` overrides (CLI `--set` / MLproject `-P`, syntax in overrides.py), and checks every
key, type and value, so a typo fails loudly before any work instead of silently falling back to a
default or failing hours later. Each field is declared with `key(default, doc, choices=/within=)`: its
one-line meaning and allowed values live there and nowhere else (`show` prints them; the stages import
the allowed sets below).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .overrides import Quoted, RecipeError, merge, parse_overrides


# Allowed values of the closed keys: the one list of each, imported by the modules that act on them.
TRAIN_HEADS = ("lm", "classifier")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_DTYPES = ("compute", "float32", "bfloat16")
AUTOCAST = ("auto", "off", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
QUANT_SCHEMES = {"W4A16": 4, "W8A16": 8}  # weight bits; activations stay 16/32-bit
QUANT_METHODS = ("awq", "rtn")
MERGE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}  # name -> torch dtype
MERGE_BASES = ("original", "nf4")
CALIBRATION_METHODS = ("none", "temperature", "vector", "shrinkage", "stacker")  # a stored calibrator; simplest first
ENGINE_BACKENDS = ("vllm", "vllm-classify", "transformers", "transformers-naive")
ENGINE_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "half": "float16"}  # name -> torch dtype; "auto" besides: the checkpoint's own
EXECUTORS = ("local", "ray")
DISTRIBUTED_EXECUTORS = ("mp", "ray", "uni", "external_launcher")  # vLLM's DistributedExecutorBackend
GENERATE_MODES = ("ingest", "respond", "label", "dedup", "filter")
AUTOAWQ_REFUSAL = (
    "quant.method=autoawq is not supported: AutoAWQ is archived upstream (last tested on "
    "transformers 4.51), and the checkpoints it writes cannot be reloaded on the current transformers "
    "without intel_extension_for_pytorch or gptqmodel on CPU. Use quant.method=awq, the same AWQ "
    "algorithm in llm-compressor, which writes compressed-tensors checkpoints that transformers and "
    "vLLM load."
)


@dataclass(frozen=True)
class Range:
    """The numbers a key takes: from `low` up to `high` (None: unbounded), each end closed unless `*_open`."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT = Range(1)  # sizes, rows, steps, processes
NON_NEGATIVE = Range(0)  # seeds, lower bounds that 0 switches off
POSITIVE = Range(0, low_open=True)
SHARE = Range(0, 1)
SHARE_BELOW_ONE = Range(0, 1, high_open=True)
POSITIVE_SHARE = Range(0, 1, low_open=True)


def key(default, doc: str, *, choices=(), within: Range | None = None, refused: dict[str, str] | None = None):
    """A recipe key: its default, its meaning in one line (`arenaflow recipe show` prints it above the key) and
    the values it takes, `choices` and/or the range `within` (for a list key: each element; None always passes
    an Optional key); `refused` values get their reason instead of the allowed ones."""
    metadata = {"doc": doc, "choices": tuple(choices), "within": within, "refused": refused or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Labelled input files and their train/valid split."""

    files: list[str] = key(["data/mtbench_human_turn1.csv"], "Labelled input files (Kaggle columns; csv, parquet or "
                           "jsonl), relative to the project root")
    valid_fraction: float = key(0.2, "Share of prompt groups held out for validation", within=Range(0, 1, low_open=True, high_open=True))
    group_column: str | None = key(None, "Column that groups rows for the split; null groups by prompt text "
                                   "(no prompt on both sides)")
    swap_augment: bool = key(True, "Add an A/B-swapped copy of every training row (labels swapped), removing position bias")
    max_rows: int | None = key(None, "Subsample this many rows before splitting (user-asked filter, logged); null keeps all",
                               within=COUNT)
    seed: int = key(42, "Seed of the subsample and the split", within=NON_NEGATIVE)
    valid_files: list[str] = key([], "Whole files of `files` held out as validation (a figure on a source never seen); "
                                 "[] splits by group")


@dataclass
class ModelConfig:
    """The base model finetune starts from."""

    base: str = key("gguf:smollm2-135m-instruct", "Base model: gguf:<name>, tiny:llama, random:<arch>, a local "
                    "checkpoint or a hub id")
    trust_remote_code: bool = key(False, "Run model code from the hub (only when you ask for it)")


@dataclass
class PromptConfig:
    """How a row becomes the chat prompt the model answers A, B or tie to (prompts.py)."""

    max_length: int = key(512, "Token budget of the whole chat prompt (template, headers and truncated texts)", within=COUNT)
    prompt_share: float = key(0.2, "Share of the content budget reserved for the user prompt; responses split the rest",
                              within=SHARE)
    head_share: float = key(0.3, "Share of a truncated text kept from its start; the rest comes from its end",
                            within=SHARE)


@dataclass
class TrainConfig:
    """LoRA / QLoRA finetuning on the answer token (train.py)."""

    load_in_4bit: bool = key(True, "QLoRA: load the base in 4-bit NF4 with bitsandbytes (works on CPU, ~9x slower there)")
    bnb_4bit_compute_dtype: str = key("float32", "Compute dtype of the model's layers (4-bit or not)",
                                      choices=COMPUTE_DTYPES)
    head: str = key("lm", "lm: answer-token loss on the LM head; classifier: its three label rows trained as a 3-way head",
                    choices=TRAIN_HEADS)
    lora_r: int = key(16, "LoRA rank", within=COUNT)
    lora_alpha: int = key(32, "LoRA scaling numerator (alpha / r scales the update)", within=POSITIVE)
    lora_dropout: float = key(0.05, "LoRA dropout", within=SHARE_BELOW_ONE)
    target_modules: str = key("all-linear", "Layers that get adapters: all-linear or a comma-separated list of module names")
    epochs: float = key(1.0, "Passes over the training rows", within=POSITIVE)
    learning_rate: float = key(2e-4, "Peak learning rate (cosine decay after warm-up)", within=POSITIVE)
    batch_size: int = key(4, "Rows per device step (micro-batch)", within=COUNT)
    gradient_accumulation_steps: int = key(4, "Steps accumulated per optimizer update (effective batch = batch_size x "
                                           "this)", within=COUNT)
    gradient_checkpointing: bool | typing.Literal["auto"] = key(
        False, "Recompute activations in backward to save memory: true, false or auto (on a GPU the memory plan (plan_stages.py) "
        "picks it and the micro-batch, keeping the optimizer batch; off on CPU)")
    max_train_rows: int | None = key(None, "Training rows used (of the swap-augmented split); null: all", within=COUNT)
    max_valid_rows: int | None = key(None, "Validation rows scored by finetune, quantize and evaluate; null: all",
                                     within=COUNT)
    warmup_ratio: float = key(0.05, "Share of steps spent warming the learning rate up", within=SHARE_BELOW_ONE)
    keep_best_epoch: bool = key(False, "Save the adapter of the epoch with the lowest validation log_loss, not the last")
    seed: int = key(42, "Seed of row sampling, LoRA init and dropout", within=NON_NEGATIVE)
    # Speed levers (`arenaflow bench --train` times them); each default is the behaviour before them.
    adapter_dtype: str = key("compute", "LoRA weights' dtype; compute: bnb_4bit_compute_dtype (float16 -> float32)",
                             choices=ADAPTER_DTYPES)
    upcast_layer_norms: bool = key(True, "4-bit: peft's float32 upcast of norms, embeddings and LM head "
                                   "(false keeps the compute dtype)")
    autocast: str = key("auto", "Trainer autocast; auto: bf16 for a bfloat16 model without 4-bit", choices=AUTOCAST)
    attn_implementation: str | None = key(None, "Attention kernel; null: transformers' default", choices=ATTENTION)
    padding_free: bool = key(False, "Pack each micro-batch into one row with position_ids (no padding; pair with "
                             "flex/flash attention)")
    group_by_length: bool = key(False, "Micro-batches of similar lengths (less padding; the row order changes)")
    optim: str = key("adamw_torch_fused", "Optimizer, a transformers name (adamw_torch_fused, adamw_torch, ...; "
                     "checked by finetune against transformers)")
    torch_compile: bool = key(False, "torch.compile the model (compiles during the first steps)")
    use_liger_kernel: bool = key(False, "Liger's RMSNorm / SwiGLU / RoPE kernels (needs the liger-kernel package)")
    processes: int = key(1, "Processes under `accelerate launch` (DDP, one per GPU, each on its share of the rows; "
                         "stages/train_launch.py)", within=COUNT)


@dataclass
class QuantConfig:
    """Merge the adapter, quantize the merged checkpoint for vLLM, register a version (quantize.py)."""

    scheme: str = key("W4A16", "Weights: W4A16 (4-bit, AWQ), W8A16 (8-bit) or none (the merged checkpoint as it is)",
                      choices=(*QUANT_SCHEMES, "none"))
    method: str = key("awq", "awq: llm-compressor AWQModifier; rtn: round-to-nearest, no calibration",
                      choices=QUANT_METHODS, refused={"autoawq": AUTOAWQ_REFUSAL})
    group_size: int = key(64, "Weights sharing one scale; must divide every quantized layer's input width; "
                          "-1: one per channel", choices=(-1,), within=COUNT)
    merge_dtype: str = key("float32", "Precision of the base the adapter is merged into (never the 4-bit weights)",
                           choices=MERGE_DTYPES)
    merge_base: str = key("original", "Weights the adapter merges into: original (the checkpoint's) or nf4 (the "
                          "NF4-rounded ones a QLoRA adapter was trained on)", choices=MERGE_BASES)
    calibration_rows: int = key(64, "Training prompts used to calibrate AWQ", within=COUNT)
    calibration_max_length: int = key(512, "Token budget of each calibration prompt", within=COUNT)
    awq_n_grid: int = key(20, "AWQ scale-search points per layer (20 is llm-compressor's; fewer is proportionally "
                          "faster)", within=COUNT)
    max_log_loss_delta: float | None = key(0.005, "Register a quantized checkpoint only if its validation log-loss is "
                                           "at most this above the merged one; null: always")
    fallback_schemes: list[str] = key([], "Schemes tried in order when one is over the bound; past the last, the merged "
                                      "checkpoint is registered", choices=(*QUANT_SCHEMES, "none"))


@dataclass
class CalibrationConfig:
    """The calibrator fitted on validation rows after quantize, stored with the version (calibration.py)."""

    method: str = key("auto", "auto: every candidate fitted, the one of the lowest worse-of-two cross-fitted "
                      "log-loss stored; or none, temperature, vector (temperature + class biases), shrinkage "
                      "(towards the class prior), stacker (logistic regression on log-probs and lengths)",
                      choices=("auto", *CALIBRATION_METHODS))
    folds: int = key(5, "Grouped cross-fitting folds (prompt groups, within sources)",
                     within=Range(2))


@dataclass
class EngineConfig:
    """The scoring engine evaluate, infer and the registered model run (backends.py, scoring.py)."""

    backend: str = key("vllm", "vllm (A/B/tie logprobs), vllm-classify (pooling runner), transformers (reference), "
                       "transformers-naive", choices=ENGINE_BACKENDS)
    dtype: str = key("auto", "Weights/activations dtype in the engine; auto: the checkpoint's", choices=("auto", *ENGINE_DTYPES))
    quantization: str | None = key(None, "vLLM online quantization of a full-precision checkpoint (fp8 = W8A8 on "
                                   "Hopper); null: none")
    max_model_len: int | None = key(None, "Longest sequence the engine accepts; null: prompt.max_length + 8", within=COUNT)
    tensor_parallel_size: int = key(1, "GPUs one engine spans (tensor parallel)", within=COUNT)
    data_parallel_size: int = key(1, "Independent engines, one per GPU, each scoring a shard of the rows", within=COUNT)
    pipeline_parallel_size: int = key(1, "vLLM pipeline stages: the layers split over GPUs (over nodes with "
                                      "distributed_executor_backend ray)", within=COUNT)
    distributed_executor_backend: str | None = key(None, "vLLM's executor when tensor x pipeline parallel > 1: mp (one "
                                                   "node) or ray (nodes); null: vLLM's choice",
                                                   choices=DISTRIBUTED_EXECUTORS)
    executor: str = key("local", "Where engines run: local (this process) or ray (Ray Data scorer actors on the cluster "
                        "at RAY_ADDRESS, else a local one; scoring/ray_actors.py)", choices=EXECUTORS)
    ray_actors: int | None = key(None, "executor ray: scorer actors; null: as many as the cluster fits", within=COUNT)
    ray_cpus_per_actor: int = key(1, "executor ray: CPU cores (threads) each scorer actor reserves", within=COUNT)
    ray_batch_rows: int = key(256, "executor ray: prompts per Ray Data batch (what a restarted actor scores again)",
                              within=COUNT)
    gpu_memory_utilization: float = key(0.9, "Share of GPU memory vLLM may take (ignored on CPU)", within=POSITIVE_SHARE)
    enable_prefix_caching: bool = key(True, "Reuse the KV cache of shared prefixes (system prompt, swap-TTA pairs)")
    enforce_eager: bool = key(True, "Skip torch.compile / CUDA graphs: faster start, slower steady state")
    max_num_batched_tokens: int | None = key(None, "Tokens per engine step; null lets vLLM choose", within=COUNT)
    cpu_kv_cache_gib: float = key(1.0, "KV cache size on CPU, GiB", within=POSITIVE)
    swap_tta: bool = key(False, "Also score the A/B-swapped prompt and average (test-time augmentation)")
    batch_tokens: int = key(16384, "transformers backend: tokens per length-sorted batch", within=COUNT)
    shard_rows: int = key(256, "infer: rows per finished shard, so a killed run resumes where it stopped", within=COUNT)


@dataclass
class RegistryConfig:
    """Where quantize registers versions and which one infer uses."""

    model_name: str = key("arenaflow", "Registered model name in the MLflow model registry")
    alias: str = key("champion", "Alias that marks the version infer uses")


@dataclass
class GenerateConfig:
    """LLM-generated training data (the datagen package); `modes` beyond "ingest" switch it on."""

    modes: list[str] = key(["ingest"], "Steps of datagen, in this order", choices=GENERATE_MODES)
    prompts_file: str | None = key(None, "jsonl/csv with a `prompt` column; null: prompts of the ingested rows")
    n_prompts: int | None = key(32, "Prompts drawn (after filter/dedup) for respond; null: all of them", within=COUNT)
    generators: list[str] = key(["gguf:smollm2-135m-instruct"], "Model references that write responses")
    temperatures: list[float] = key([0.3, 1.0], "Sampling temperatures: one response per generator x temperature",
                                    within=NON_NEGATIVE)
    top_p: float = key(0.95, "Nucleus sampling share of the generators", within=POSITIVE_SHARE)
    max_tokens: int = key(64, "Generated tokens per response (per turn)", within=COUNT)
    max_prompt_tokens: int = key(384, "Chat-rendered prompt budget; longer prompts are skipped (counted)", within=COUNT)
    seed: int = key(42, "Seed of the prompt sample, per-request sampling and the A/B order of pairs", within=NON_NEGATIVE)
    shard_size: int = key(16, "Prompts (respond) / rows (label) per resumable shard", within=COUNT)
    teacher: str = key("models:/arenaflow@champion", "label: model reference scoring the pairs")
    teacher_fallback: str | None = key("gguf:smollm2-135m-instruct", "Used when `teacher` is not registered; null: none")
    teacher_swap_tta: bool = key(True, "Teacher scores both A/B orders and averages (removes position bias)")
    confidence_threshold: float | None = key(0.6, "Hard label where the teacher's max prob >= this; null: soft labels "
                                             "only", within=SHARE)
    drop_unconfident: bool = key(False, "Drop teacher-labelled rows below the threshold (counted)")
    dedup_threshold: float = key(0.8, "Shingle Jaccard at or above which a prompt is a near-duplicate",
                                 within=POSITIVE_SHARE)
    shingle_size: int = key(5, "Characters per shingle of the normalised prompt", within=COUNT)
    min_prompt_chars: int = key(8, "filter: shortest prompt kept", within=NON_NEGATIVE)
    max_prompt_chars: int = key(2000, "filter: longest prompt kept", within=COUNT)
    min_response_chars: int = key(1, "filter: shortest response kept", within=NON_NEGATIVE)
    max_response_chars: int = key(4000, "filter: longest response kept", within=COUNT)
    min_ascii_share: float = key(0.9, "filter: share of ASCII among letters (a cheap \"is English\" check); 0 disables",
                                 within=SHARE)
    sample_rows: int = key(8, "Generated rows written to samples.jsonl / samples.html", within=NON_NEGATIVE)
    work_dir: str | None = key(None, "Resumable shards; null: <ARENAFLOW_CACHE>/datagen")


@dataclass
class Recipe:
    """An experiment: one section per pipeline stage."""

    name: str = key("cpu-smollm2", "Experiment name in MLflow (one experiment per recipe)")
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


SECTIONS = {tp: name for name, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)}


def _expected(tp) -> str:
    """What a value of the annotated type `tp` looks like, for errors: true/false, one of a, b, int, ..."""
    if tp is bool:
        return "true/false"
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(tp)))}"
    return getattr(tp, "__name__", str(tp))


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
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        for candidate in inner:  # e.g. `bool | Literal["auto"]`: the first type that takes the value
            try:
                return _coerce(value, candidate, where)
            except RecipeError:
                pass
        raise RecipeError(f"{where}: expected {' or '.join(map(_expected, inner))}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: expected {_expected(tp)}, got {value!r}")
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
        raise RecipeError(f"{where}: expected {_expected(bool)}, got {value!r}")
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


def _build(cls, values: dict, source: str, prefix: str = ""):
    """`cls` from the raw `values` of `source` (a file, or "recipe"), every key typed and checked; `prefix`
    is the key path of the section being built (`train.`)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{source}: {prefix or 'recipe'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: {prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(tp, value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{source}: {prefix}{name}")
    built = cls(**kwargs)
    _check_fields(built, f"{source}: {prefix}")
    return built


def allowed(f: dataclasses.Field) -> str:
    """What a checked key takes, e.g. "one of lm, classifier", ">= 1", "-1 or >= 1"; "" when unchecked."""
    choices = ", ".join(map(str, f.metadata.get("choices", ())))
    within = f.metadata.get("within")
    if within:
        return f"{choices} or {within}" if choices else str(within)
    return f"one of {choices}" if choices else ""


def _check_fields(config, prefix: str) -> None:
    for f in dataclasses.fields(config):
        choices, within = f.metadata.get("choices", ()), f.metadata.get("within")
        value = getattr(config, f.name)
        if not (choices or within) or value is None:
            continue
        for where, element in ([(f"{f.name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list)
                               else [(f.name, value)]):
            number = isinstance(element, (int, float)) and not isinstance(element, bool)
            if element in choices or (within is not None and number and element in within):
                continue
            if element in f.metadata["refused"]:
                raise RecipeError(f.metadata["refused"][element])
            raise RecipeError(f"{prefix}{where}: {element!r} is not {allowed(f)}")


def check_section(config) -> None:
    """RecipeError for a value outside its key's choices or range, naming `section.key`, the value and what the
    key takes. load_recipe checks every section; a stage calls this on a config built or changed in code."""
    _check_fields(config, f"{SECTIONS[type(config)]}.")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the built-in defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    source = str(path) if path else "recipe"
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections")
    recipe = _build(Recipe, merge(raw, parse_overrides(overrides)), source)
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


def show(recipe: Recipe) -> str:
    """The recipe as YAML that loads back to it, each section and key under its one-line meaning and what it
    takes, from the dataclasses above (`arenaflow recipe show`)."""
    lines = [f"# {recipe.path or 'built-in defaults'}, resolved (after any --set): every key under its meaning (src/arenaflow/recipe.py)"]
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            lines += ["", f"# {type(value).__doc__.splitlines()[0]}", f"{f.name}:"]
            lines += [f"  {line}" for sub in dataclasses.fields(value) for line in _commented(sub, getattr(value, sub.name))]
        elif f.name != "path":
            lines += _commented(f, value)
    return "\n".join(lines) + "\n"


def _commented(f: dataclasses.Field, value) -> list[str]:
    takes = allowed(f)
    entry = yaml.safe_dump({f.name: value}, default_flow_style=None if isinstance(value, list) else False,
                           sort_keys=False, width=1 << 16)  # a list on one line: [a, b]
    return [f"# {f.metadata['doc']}" + (f" [{takes}]" if takes else ""), entry.rstrip("\n")]
