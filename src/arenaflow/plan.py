"""Capacity plan: does a recipe fit the chosen GPUs, and how long do N rows take?

`plan(recipe, rows, gpu, count)` predicts, per GPU, the memory of weights + KV cache + activations +
runtime overhead under the recipe's parallelism (`engine.tensor_parallel_size` x
`engine.pipeline_parallel_size` x `engine.data_parallel_size`, or with `engine.executor: ray` one engine
per Ray actor), and the wall time for `rows` rows from the token-length distribution of the recipe's
data (the prompt builder's lengths at the recipe's `prompt.max_length`; when the recipe's files are not
here - the 34B recipe's Kaggle train.csv - the bundled `data/` at that max_length).

Time is a roofline per engine step (vLLM packs `max_num_batched_tokens` prompt tokens per step):
max(FLOPs / the card's dense rate for the compute precision, bytes read / memory bandwidth), plus the
tensor-parallel all-reduces over the GPUs' link, all divided by the efficiency: `EFFICIENCY`, the share
of the roofline that vLLM reached in `arenaflow bench` at 16-bit, times `PRECISION_FACTOR` for quantized
engines (values and sources: BENCHMARKS.md). `engine_plan` is the plan of one engine run as it happened
(this machine's GPUs, the checkpoint's own quantization, the prompts' lengths): `bench` and `infer`
log its prediction next to what they measured.

Pipeline parallelism (`pp` stages; vLLM keeps `pp` batches in flight): each GPU holds 1/(tp x pp) of the
layers' weights and 1/pp of the KV cache (the worst stage also one vocabulary x hidden matrix: the input
embedding on the first, the LM head on the last); in steady state every stage works at once, so the
per-row roofline is divided by tp x pp. The time then adds what pipelining costs: each row's hidden
states sent across a stage boundary (over `stage_link_gbs`: the card's link inside a node,
`NODE_LINK_GBS` between nodes, i.e. vLLM's Ray executor with pp > 1), and the bubble, pp - 1 stage
steps to fill and drain the pipeline once per run, spread over its rows. Not measured in this project.

Model dimensions come from the checkpoint's config.json when it is local, else from `ARCHITECTURES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import ARCHITECTURES, Dims, architecture, dims_from_config
from .errors import ArenaflowError
from .hardware import card_name, gpu_count
from .metrics import ROWS_KAGGLE_TEST, speed_metrics
from .models import compressed_weights, read_config
from .recipe import Recipe

# Achieved share of the roofline (compute-bound prefill) for vLLM 0.24 on an 8B bf16 model, ~1k-token
# prompts: 42.5 samples/s measured on an H200 (BENCHMARKS.md, 2026-11-27) over this module's roofline
# of 68.8 samples/s for those dims and lengths. Source and caveats: BENCHMARKS.md, "plan calibration".
EFFICIENCY = 0.62
# Quantized engines reach less of their (higher or equal) roofline: achieved samples/s relative to bf16
# in the same `arenaflow bench` run (8B dims, 1000 prompts of 600-1400 tokens, H200, vLLM 0.24,
# 2026-11-27: bf16 41.91, fp8 63.26, W8A16 36.90, W4A16 39.43 samples/s) over the roofline ratio
# (fp8: 2x the rate; weight-only: the same compute-bound rate). Prefill is compute-bound, so
# weight-only dequantisation is pure cost; Hopper kernels (Marlin, CUTLASS fp8) - T4s run others.
PRECISION_FACTOR = {"fp8": 0.755, "W8A16": 0.880, "W4A16": 0.941}
# Bytes/s between nodes that a pipeline stage boundary sees: 200 Gb/s (InfiniBand HDR, one NIC per GPU
# pair is typical); slower Ethernet clusters pass their own `stage_link_gbs` to make_plan.
NODE_LINK_GBS = 25.0


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the card reports as total (what vLLM's gpu_memory_utilization multiplies)
    bandwidth_gbs: float  # HBM/GDDR GB/s
    tflops: dict  # dense TFLOP/s (TOP/s for int8) by compute precision
    link_gbs: float  # GPU-to-GPU bytes/s per direction that an all-reduce sees, GB/s


# Vendor datasheets, dense (no sparsity). A T4 has no bf16 units: bf16 runs at its fp32 rate.
GPUS: dict[str, Gpu] = {
    "T4": Gpu("T4", 15.0, 320, {"fp16": 65, "bf16": 8.1, "int8": 130, "fp32": 8.1}, 8),
    "L4": Gpu("L4", 22.0, 300, {"fp16": 121, "bf16": 121, "fp8": 242, "int8": 242, "fp32": 30}, 20),
    "A100-40GB": Gpu("A100-40GB", 39.4, 1555, {"fp16": 312, "bf16": 312, "int8": 624, "fp32": 19.5}, 250),
    "A100": Gpu("A100", 79.2, 2039, {"fp16": 312, "bf16": 312, "int8": 624, "fp32": 19.5}, 250),
    "H100": Gpu("H100", 79.2, 3350, {"fp16": 989, "bf16": 989, "fp8": 1979, "int8": 1979, "fp32": 67}, 400),
    "H200": Gpu("H200", 139.8, 4800, {"fp16": 989, "bf16": 989, "fp8": 1979, "int8": 1979, "fp32": 67}, 400),
}


class PlanError(ArenaflowError, ValueError):
    """A plan that cannot be made (unknown GPU/model, more GPUs asked of than there are)."""


def gpu_spec(name: str) -> Gpu:
    """'T4', 'h100', 'NVIDIA H100 80GB HBM3', 'NVIDIA H200' -> the table entry."""
    key = name.upper().replace("NVIDIA", "").strip()
    if key in GPUS:
        return GPUS[key]
    for candidate in sorted(GPUS, key=len, reverse=True):
        if candidate in key.replace(" ", "-") or candidate in key.split():
            if candidate == "A100" and "40" in key:
                return GPUS["A100-40GB"]
            return GPUS[candidate]
    raise PlanError(f"unknown GPU {name!r}; known: {sorted(GPUS)}")


def model_dims(reference: str) -> tuple[Dims, str]:
    """Dims of a model reference, and where they came from (a local config.json, or the table)."""
    local = Path(reference).expanduser()
    if (local / "config.json").exists():
        return dims_from_config(read_config(local)), f"{local}/config.json"
    known = architecture(reference)
    if known is None:
        raise PlanError(f"no dimensions for model {reference!r}: not a local checkpoint and not one of "
                        f"{sorted(ARCHITECTURES)}")
    if reference.startswith("random:"):  # built with SmolLM2's tokenizer (models.build_architecture)
        return dataclasses.replace(known[1], vocab=ARCHITECTURES["smollm2-135m"].vocab), \
            f"table ({known[0]}, SmolLM2's vocabulary)"
    return known[1], f"table ({known[0]})"


def engine_precision(engine, weights: tuple[int, int] | None) -> tuple[str, float, str]:
    """(label, bits per matmul weight incl. per-group scales, compute precision) of `engine`
    (EngineConfig) running weights quantized to (num_bits, group_size; 0: no groups), or unquantized
    weights (None). Online fp8 (`engine.quantization`) wins over both."""
    if engine.quantization == "fp8":
        return "fp8-w8a8", 8.0, "fp8"
    act = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(engine.dtype, "bf16")
    if weights:
        bits, group = weights
        return f"W{bits}A16", bits + (16 / group if group > 0 else 0), act
    return act, 32.0 if act == "fp32" else 16.0, act


def recipe_precision(recipe: Recipe) -> tuple[str, float, str]:
    """`engine_precision` of the recipe's engine on the weights its quant section produces."""
    scheme = recipe.quant.scheme
    weights = (int(scheme[1]), recipe.quant.group_size) if scheme in ("W4A16", "W8A16") else None
    return engine_precision(recipe.engine, weights)


def prompt_lengths(recipe: Recipe, max_rows: int | None = 4000) -> tuple[np.ndarray, str]:
    """Token lengths of the recipe's prompts (prompt builder), or of the bundled data if its files are absent."""
    from . import data as data_mod
    from .models import load_tokenizer, resolve_model
    from .prompts import PromptBuilder

    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]  # the project root (cwd), or the source tree's
    found = [next((str(r / f) for r in roots if (r / f).exists()), None) for f in recipe.data.files]
    files = [f for f in found if f]
    source = ",".join(recipe.data.files)
    if not files:
        bundled = next((r / "data" for r in roots if list((r / "data").glob("*.csv"))), None)
        if bundled is None:
            raise PlanError(f"no prompt lengths: the recipe's {recipe.data.files} and the bundled data/ are absent")
        files = sorted(str(p) for p in bundled.glob("*.csv"))
        source = f"bundled data ({', '.join(Path(f).name for f in files)}; the recipe's {recipe.data.files} are absent)"
    import pandas as pd

    rows = pd.concat([data_mod.read_prepared(f) for f in files], ignore_index=True)
    rows = data_mod.subsample(rows, max_rows, seed=0)
    try:  # the recipe's own tokenizer when it is local, else SmolLM2's (lengths then approximate)
        checkpoint = resolve_model(recipe.model.base) if Path(recipe.model.base).exists() or \
            recipe.model.base.startswith(("gguf:", "tiny:")) else resolve_model("gguf:smollm2-135m-instruct")
    except Exception:  # noqa: BLE001 - no hub here: fall back to the embedded tokenizer
        checkpoint = resolve_model("gguf:smollm2-135m-instruct")
    builder = PromptBuilder(load_tokenizer(checkpoint), recipe.prompt)
    lengths = np.array([len(p) for p in builder.build_rows(rows)])
    return lengths, f"{source}, tokenizer {Path(checkpoint).name}, max_length {recipe.prompt.max_length}"


@dataclass
class Plan:
    model: str
    dims_source: str
    gpu: Gpu
    count: int
    tp: int
    dp: int
    precision: str
    memory_gib: dict  # per GPU: weights, kv_cache, activations, overhead, total, capacity
    fits: bool
    rows: int
    mean_tokens: float
    seconds_per_row: float
    hours: float
    bound: str  # compute / memory
    efficiency: float
    lengths_source: str
    notes: list[str] = field(default_factory=list)
    pp: int = 1  # pipeline stages
    stages: list = field(default_factory=list)  # plan_stage: the StagePlan of finetune, quantize, scoring

    def table(self) -> str:
        m = self.memory_gib
        stages = f" x pipeline parallel {self.pp}" if self.pp > 1 else ""
        lines = [
            f"plan: {self.model} ({self.dims_source}) on {self.count}x {self.gpu.name}, "
            f"tensor parallel {self.tp}{stages} x data parallel {self.dp}, {self.precision}",
            f"  memory per GPU (GiB): weights {m['weights']:.2f} + KV cache {m['kv_cache']:.2f} + activations "
            f"{m['activations']:.2f} + overhead {m['overhead']:.2f} = {m['total']:.2f} of {m['capacity']:.2f} "
            f"usable -> {'FITS' if self.fits else 'DOES NOT FIT'}",
            f"  time: {self.rows} rows x {self.mean_tokens:.0f} mean prompt tokens ({self.lengths_source}); "
            f"{self.bound}-bound; efficiency {self.efficiency:.2f} -> {self.seconds_per_row:.3g} s/row "
            f"(all GPUs), {self.hours:.2f} h",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def precision_efficiency(weight_bits: float, compute: str) -> float:
    """`EFFICIENCY` times the measured factor of the precision (fp8 W8A8, W8A16, W4A16; 16-bit: 1)."""
    if compute == "fp8":
        return EFFICIENCY * PRECISION_FACTOR["fp8"]
    if weight_bits < 6:
        return EFFICIENCY * PRECISION_FACTOR["W4A16"]
    if weight_bits < 12:
        return EFFICIENCY * PRECISION_FACTOR["W8A16"]
    return EFFICIENCY


def make_plan(dims: Dims, lengths, *, gpu: Gpu, count: int, tp: int = 1, dp: int = 1, pp: int = 1,
              weight_bits: float = 16.0, compute: str = "bf16", rows: int = ROWS_KAGGLE_TEST,
              max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
              gpu_memory_utilization: float = 0.9, efficiency: float | None = None, model: str = "?",
              dims_source: str = "?", precision: str | None = None, lengths_source: str = "given",
              stage_link_gbs: float | None = None) -> Plan:
    """The plan for explicit dims, token lengths and hardware (see module doc); `efficiency` None:
    `precision_efficiency`; `stage_link_gbs` None: pipeline stages inside one node (the card's link)."""
    if efficiency is None:
        efficiency = precision_efficiency(weight_bits, compute)
    if min(tp, dp, pp) < 1:
        raise PlanError(f"parallel sizes must be >= 1: tensor {tp}, pipeline {pp}, data {dp}")
    group = tp * pp  # GPUs of one engine
    if group * dp > count:
        raise PlanError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} x data_parallel_size {dp} "
                        f"needs {group * dp} GPUs, {count} given")
    if pp > dims.layers:
        raise PlanError(f"pipeline_parallel_size {pp} exceeds the model's {dims.layers} layers")
    notes = []
    if group * dp < count:
        notes.append(f"{count - group * dp} GPU(s) stay idle: raise data_parallel_size")
    if compute not in gpu.tflops:
        notes.append(f"{gpu.name} has no {compute} matmul units: planned at its fp32 rate")
    rate = gpu.tflops.get(compute, gpu.tflops["fp32"]) * 1e12
    lengths = np.asarray(lengths, dtype=float)
    max_model_len = max_model_len or int(lengths.max()) + 8

    # Memory per GPU (the worst pipeline stage). Matmul weights at weight_bits; embeddings and LM head stay
    # 16-bit; with stages the first holds the embedding and the last the LM head (a copy each when tied).
    stage_layers = -(-dims.layers // pp)
    embeddings = dims.embedding_params * 2 if pp == 1 else dims.vocab * dims.hidden * 2
    weights = (dims.layer_params * weight_bits / 8 * stage_layers / dims.layers + embeddings) / tp
    kv_tokens = max(max_num_batched_tokens, max_model_len)  # vLLM refuses to start below one full sequence
    kv_heads_per_gpu = max(dims.kv_heads // tp, 1)
    kv = 2 * stage_layers * kv_heads_per_gpu * dims.head_dim * 2 * kv_tokens
    step = max_num_batched_tokens
    activations = step * 2 * (dims.hidden * 4 + 2 * dims.intermediate / tp + dims.head_dim * (dims.heads + 2 * dims.kv_heads) / tp)
    overhead = 0.6 * 2**30 + 0.05 * gpu.memory_gib * 2**30  # CUDA context, NCCL, cuBLAS workspace, CUDA graphs
    total = weights + kv + activations + overhead
    capacity = gpu.memory_gib * 2**30 * gpu_memory_utilization
    fits = total <= capacity
    memory = {k: v / 2**30 for k, v in dict(weights=weights, kv_cache=kv, activations=activations,
                                               overhead=overhead, total=total, capacity=capacity).items()}

    # Time: per engine step of `step` tokens, one engine spanning tp x pp GPUs (its stages busy at once on
    # pp batches in flight); dp engines in parallel.
    flops = sum(dims.flops_per_prompt(int(n)) for n in lengths) / len(lengths)  # per row
    tokens = lengths.mean()
    steps_per_row = tokens / step
    compute_s = flops / (rate * group)
    memory_s = steps_per_row * (weights + kv) / (gpu.bandwidth_gbs * 1e9)  # weights (per GPU) once per step
    # Two all-reduces of the hidden state per layer of a stage; a ring over tp GPUs moves 2(tp-1)/tp of it
    # per GPU; the stages all-reduce at the same time.
    comm_s = 0.0 if tp == 1 else \
        tokens * stage_layers * 2 * dims.hidden * 2 * 2 * (tp - 1) / tp / (gpu.link_gbs * 1e9)
    bound = "compute" if compute_s >= memory_s else "memory"
    stage_s = (max(compute_s, memory_s) + comm_s) / efficiency  # per row, every stage at once
    send_s = bubble_s = 0.0
    if pp > 1:  # each row's hidden states cross a stage boundary; the pipeline fills and drains once per run
        link = stage_link_gbs or gpu.link_gbs
        send_s = tokens * dims.hidden * 2 / (link * 1e9)
        step_period = (stage_s + send_s) * step / tokens  # one step of `step` tokens through one stage
        bubble_s = (pp - 1) * step_period / max(rows, 1)
        notes.append(f"pipeline stages over a {link:.0f} GB/s link: {send_s * 1e3:.2f} ms/row of activations "
                     f"sent; fill and drain bubble {bubble_s * rows:.2f} s per run")
    per_row = (stage_s + send_s + bubble_s) / dp
    if tp > 1:
        notes.append(f"tensor-parallel all-reduce over a {gpu.link_gbs:.0f} GB/s link: {comm_s * 1e3:.1f} ms/row")
    return Plan(model, dims_source, gpu, count, tp, dp, precision or f"{weight_bits:g}-bit weights, {compute}",
                memory, fits, rows, float(tokens), per_row, rows * per_row / 3600, bound, efficiency,
                lengths_source, notes, pp=pp)


def plan(recipe: Recipe, rows: int = ROWS_KAGGLE_TEST, gpu: str = "T4", count: int = 2, model: str = "",
         lengths=None) -> Plan:
    """The plan of a recipe (its model, precision, engine settings, data lengths) on `count` x `gpu`."""
    reference = model or recipe.model.base
    dims, source = model_dims(reference)
    label, bits, compute = recipe_precision(recipe)
    lengths_source = "given"
    if lengths is None:
        lengths, lengths_source = prompt_lengths(recipe)
    e = recipe.engine
    return make_plan(dims, lengths, gpu=gpu_spec(gpu), count=count, tp=e.tensor_parallel_size,
                     dp=_engines(e, count), weight_bits=bits, compute=compute, rows=rows, **_stages(e),
                     max_num_batched_tokens=e.max_num_batched_tokens or 8192,
                     max_model_len=e.max_model_len or recipe.prompt.max_length + 8,
                     gpu_memory_utilization=e.gpu_memory_utilization, model=reference, dims_source=source,
                     precision=f"{label} (compute {compute})", lengths_source=lengths_source)


def _stages(engine) -> dict:
    """make_plan's pipeline arguments for an EngineConfig: its stages, across nodes (`NODE_LINK_GBS`)
    when vLLM's Ray executor runs them, else inside one node."""
    pp = engine.pipeline_parallel_size
    across = pp > 1 and engine.distributed_executor_backend == "ray"
    return {"pp": pp, "stage_link_gbs": NODE_LINK_GBS if across else None}


def _engines(engine, count: int) -> int:
    """Engines scoring side by side: data_parallel_size, or with `executor: ray` one per Ray actor
    (`ray_actors`, else as many GPU groups as `count` GPUs hold)."""
    if engine.executor != "ray":
        return engine.data_parallel_size
    return engine.ray_actors or max(count // (engine.tensor_parallel_size * engine.pipeline_parallel_size), 1)


@dataclass
class StagePlan:
    """One stage of the recipe on the card: memory per GPU, whether it fits, wall time, and why."""

    stage: str
    memory_gib: float
    capacity_gib: float
    fits: bool
    seconds: float
    detail: str

    def line(self) -> str:
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        return (f"  {self.stage}: {self.memory_gib:.1f} of {self.capacity_gib:.1f} GiB per GPU -> {verdict}; "
                f"{self.seconds / 60:.1f} min\n    {self.detail}")


def _rate(gpu: Gpu, dtype: str) -> float:
    """The card's dense TFLOP/s for a torch dtype name (bfloat16 on a T4: its fp32 rate)."""
    key = {"float16": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}.get(dtype, "fp32")
    return gpu.tflops.get(key, gpu.tflops["fp32"])


def finetune_plan(recipe: Recipe, dims: Dims, lengths, gpu: Gpu, count: int) -> StagePlan:
    """Finetune (plan_stages): `train.gradient_checkpointing: auto` as finetune settles it on this card,
    else the recipe's own micro-batch and checkpointing; each of `train.processes` GPUs holds the model."""
    from .plan_stages import GIB, TRAIN_MEMORY_SHARE, fit_training, train_memory, train_seconds

    cfg = recipe.train
    max_length = recipe.prompt.max_length + 1
    if cfg.gradient_checkpointing == "auto":
        fit = fit_training(dims, cfg, max_length, gpu.memory_gib)
        micro, checkpointing, how = fit.micro_batch, fit.checkpointing, f"auto: {fit.reason}"
    else:
        micro, checkpointing, how = cfg.batch_size, bool(cfg.gradient_checkpointing), "the recipe's settings"
    memory = train_memory(dims, cfg, micro * max_length, checkpointing)
    budget = gpu.memory_gib * TRAIN_MEMORY_SHARE
    split = len(lengths) * (1 - recipe.data.valid_fraction) * (2 if recipe.data.swap_augment else 1)
    rows = int(min(cfg.max_train_rows or split, split) if recipe.data.files else cfg.max_train_rows or split)
    processes = min(cfg.processes, count)
    seconds = train_seconds(dims, cfg, lengths, rows, _rate(gpu, cfg.bnb_4bit_compute_dtype), checkpointing, micro,
                            processes)
    kind = "QLoRA NF4" if cfg.load_in_4bit else "bf16 LoRA"
    detail = (f"{kind}, micro-batch {micro} x {max_length} tokens{' + checkpointing' if checkpointing else ''} ({how}); "
              f"weights {memory.weights / GIB:.1f} + LoRA {memory.lora / GIB:.1f} + activations "
              f"{memory.activations / GIB:.1f} + overhead {memory.overhead / GIB:.1f} GiB, usable "
              f"{TRAIN_MEMORY_SHARE:.0%} of the card; {rows} rows x {cfg.epochs:g} epochs on {processes} GPU(s)")
    fits = memory.total / GIB <= budget
    if not fits:
        smallest = train_memory(dims, cfg, max_length, True).total / GIB
        detail += (f"; needs a card with >= {memory.total / GIB / TRAIN_MEMORY_SHARE:.0f} GiB (every process holds "
                   "the whole model: FSDP/ZeRO-3 is not wired)" + (
                       f", or train.gradient_checkpointing=auto ({smallest:.1f} GiB at micro-batch 1 + checkpointing)"
                       if smallest <= budget else ", or a smaller model or prompt.max_length"))
    return StagePlan("finetune", memory.total / GIB, budget, fits, seconds, detail)


def quantize_stage_plan(recipe: Recipe, dims: Dims, gpu: Gpu) -> StagePlan:
    """Merge + AWQ (plan_stages.quantize_plan) on one GPU of the card; the scoring after it is `plan`'s."""
    from .plan_stages import quantize_plan

    q = quantize_plan(dims, recipe.quant, _rate(gpu, recipe.quant.merge_dtype))
    memory = max(q.merge_gpu_gib, q.awq_gpu_gib)
    merge_where = "on the GPU (NF4 base dequantized)" if q.merge_gpu_gib else "on the host"
    detail = (f"merge {merge_where}: {q.merge_gpu_gib:.1f} GiB GPU, {q.merge_host_gib:.1f} GiB host, "
              f"{q.merge_seconds:.0f} s; {recipe.quant.method} {recipe.quant.scheme}: {q.awq_gpu_gib:.1f} GiB GPU "
              f"(one layer at a time), {q.awq_host_gib:.1f} GiB host RAM, {q.quantize_seconds:.0f} s")
    fits = memory <= gpu.memory_gib
    if not fits:
        detail += (f"; the merge needs a card with >= {memory:.0f} GiB, or quant.merge_base=original "
                   f"(merged on the host: {2 * q.merge_host_gib:.0f} GiB RAM)")
    return StagePlan("quantize", memory, gpu.memory_gib, fits, q.merge_seconds + q.quantize_seconds, detail)


def plan_stage(recipe: Recipe, rows: int = ROWS_KAGGLE_TEST, gpu: str = "T4", count: int = 2, model: str = "") -> Plan:
    """CLI `arenaflow plan`: print the plan of every stage, finetune, quantize and scoring (no MLflow run:
    nothing is executed). Returns the scoring plan, its `stages` the three StagePlans."""
    lengths, lengths_source = prompt_lengths(recipe)
    result = plan(recipe, rows=rows, gpu=gpu, count=count, model=model, lengths=lengths)
    result.lengths_source = lengths_source
    dims = model_dims(model or recipe.model.base)[0]
    scoring = StagePlan("scoring", result.memory_gib["total"], result.memory_gib["capacity"], result.fits,
                        result.hours * 3600, f"{rows} rows, {result.precision}, tensor parallel {result.tp} x data "
                        f"parallel {result.dp} (below)")
    result.stages = [finetune_plan(recipe, dims, lengths, result.gpu, count),
                     quantize_stage_plan(recipe, dims, result.gpu), scoring]
    fit = [s.stage for s in result.stages if s.fits]
    print(f"plan: {result.model} on {count}x {result.gpu.name}, every stage")
    print("\n".join(s.line() for s in result.stages))
    print(f"  fits {count}x {result.gpu.name}: {', '.join(fit) or 'no stage'}; "
          f"needs a bigger card: {', '.join(s.stage for s in result.stages if not s.fits) or 'none'}")
    print(result.table())
    return result


def engine_plan(checkpoint: Path, engine, lengths, card: str, count: int) -> Plan | None:
    """The plan of one scoring run as it happened: `engine` (EngineConfig) on `checkpoint` over prompts of
    `lengths` tokens, on `count` GPUs named `card`. The checkpoint's own compressed-tensors weights set
    the weight bits, `engine.quantization="fp8"` the fp8 compute. None where no plan applies: a CPU, a
    card the table lacks, or a backend other than vLLM (the efficiency is vLLM's)."""
    if not engine.backend.startswith("vllm") or card.startswith("CPU"):
        return None
    try:
        gpu = gpu_spec(card)
    except PlanError:
        return None
    config = read_config(checkpoint)
    weights = compressed_weights(config)
    scheme = (weights[0]["num_bits"], weights[0].get("group_size") or 0) if weights else None
    label, bits, compute = engine_precision(engine, scheme)
    tp, dp, pp = engine.tensor_parallel_size, _engines(engine, count), engine.pipeline_parallel_size
    return make_plan(dims_from_config(config), lengths, gpu=gpu, count=max(count, tp * pp * dp), tp=tp, dp=dp,
                     weight_bits=bits, compute=compute, rows=len(lengths), **_stages(engine),
                     max_num_batched_tokens=engine.max_num_batched_tokens or 8192,
                     max_model_len=engine.max_model_len, gpu_memory_utilization=engine.gpu_memory_utilization,
                     model=str(checkpoint), dims_source="config.json", precision=label,
                     lengths_source="the prompts scored")


def planned_speed(checkpoint: Path, engine, prompts: int, tokens: float, rows: int) -> dict[str, float]:
    """What `arenaflow plan` predicts for this scoring run on this machine's GPUs (nothing on CPU), under
    the names the measurement has with a `plan_` prefix, so the MLflow UI shows them side by side."""
    planned = engine_plan(checkpoint, engine, np.full(prompts, tokens / prompts), card_name(), gpu_count())
    if planned is None:
        return {}
    figures = speed_metrics(rows, planned.seconds_per_row * prompts, tokens, startup_seconds=0.0)
    return {f"plan_{k}": figures[k] for k in ("samples_per_s", "projected_hours_25k_rows")}
