"""Memory and wall time of the finetune and quantize stages on a card (`plan.py` does scoring).

Finetune, per GPU (each DDP process holds a whole copy):
  * weights: matmul weights in NF4 (0.5 byte + one float32 absmax per 64 weights) or bf16; embeddings
    and LM head in float32 when peft upcasts them (`upcast_layer_norms` with 4-bit), else bf16;
  * LoRA: r x (in + out) per adapted linear, with its gradient and two AdamW moments (16 bytes/param);
  * activations kept for backward, per token of a micro-batch padded to its longest row (the
    collator pads): `ACTIVATION_BYTES` x hidden per layer, plus what LoRA dropout keeps (3 bytes per
    adapted input: the dropped copy and its mask); with gradient checkpointing only each layer's input
    (float32 when upcast) plus one layer's worth, recomputed in backward;
  * `TRAIN_OVERHEAD_GIB`: CUDA context, cuBLAS workspace, allocator slack.
The logits are kept at the answer positions only (train.py's `logits_to_keep`), so no vocabulary x
tokens matrix. `ACTIVATION_BYTES` is read off two measurements (DEVICE.md, H200, 8B dims, 8 x 1024
tokens, no checkpointing, no dropout): QLoRA 130.9 GiB, bf16 LoRA 88.3 GiB peak.

Finetune time: FLOPs over padded tokens - forward 2N, backward through frozen weights 2N (input
gradients only), + a second forward with checkpointing - over the card's bf16 rate times
`TRAIN_EFFICIENCY` (measured: BENCHMARKS.md).

Quantize: the merge loads the base on the GPU in NF4 and dequantizes it (`merge_base: nf4`: NF4 and
bf16 weights at once) or on the host (`original`); AWQ (llm-compressor's sequential pipeline) holds the
model on the host and one decoder layer plus its calibration activations on the GPU at a time. Their
times are per GB of bf16 weights (`MERGE_SECONDS_PER_GB`, `AWQ_SECONDS_PER_GB`, measured), AWQ's grid
search adding n_grid forwards of the calibration tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .architectures import Dims

GIB = 2**30
# Bytes kept for backward per token and layer, in units of `hidden` (no dropout): (130.9 GiB - weights)
# / (8 x 1024 tokens x 32 layers x 4096) for QLoRA with peft's float32 upcast; 88.3 GiB for bf16 LoRA.
ACTIVATION_BYTES = {"nf4": 125.0, "bf16": 75.0}
TRAIN_OVERHEAD_GIB = 1.5
# Share of the planned memory a training step may take of the card's total: allocator fragmentation
# and the first step's transient buffers are not in the model.
TRAIN_MEMORY_SHARE = 0.85
# Micro-batches below this many tokens leave an 8B step launch-bound: below it, checkpointing at a
# larger micro-batch is preferred over none at a smaller one.
MIN_MICRO_BATCH_TOKENS = 2048
# Achieved share of the card's bf16 rate for a training step over padded tokens (4N or 6N FLOPs/token).
# QLoRA: H100, gpu-8b-random, checkpointing, micro-batches of 8 rows (<= 1024 tokens): 2000 rows in 430 s
# (issue 21, commit a91c625). bf16 LoRA: H200, plain peft, 8 x 1024, 10.5k tokens/s (DEVICE.md).
TRAIN_EFFICIENCY = {"nf4": 0.175, "bf16": 0.29}
# The merge: load, (NF4 round trip,) merge and save, per GB of bf16 weights (H100, 8B: ~45 s for 14.5 GB).
MERGE_SECONDS_PER_GB = 3.1
# AWQ apart from its grid search: host load, layer-by-layer onload, packing and saving (H100, 8B, 32 rows
# of <= 1024 tokens, n_grid 10: ~95 s).
AWQ_SECONDS_PER_GB = 5.0
AWQ_EFFICIENCY = 0.2  # the grid search's forwards: small per-layer matmuls


@dataclass
class TrainMemory:
    weights: float
    lora: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.overhead


@dataclass
class TrainFit:
    """How finetune runs on the card: micro-batch, accumulation, checkpointing, and why."""

    micro_batch: int
    accumulation: int
    checkpointing: bool
    memory_gib: float  # planned peak per GPU
    capacity_gib: float
    reason: str
    fits: bool = True
    tried: list[str] = field(default_factory=list)


def lora_params(dims: Dims, r: int, target_modules: str = "all-linear") -> int:
    """LoRA parameters on a Llama-shaped decoder (all-linear: q, k, v, o, gate, up, down)."""
    kv = dims.kv_heads * dims.head_dim
    q = dims.heads * dims.head_dim
    shapes = {"q_proj": (dims.hidden, q), "k_proj": (dims.hidden, kv), "v_proj": (dims.hidden, kv),
              "o_proj": (q, dims.hidden), "gate_proj": (dims.hidden, dims.intermediate),
              "up_proj": (dims.hidden, dims.intermediate), "down_proj": (dims.intermediate, dims.hidden)}
    names = shapes if target_modules.strip() == "all-linear" else \
        [m.strip() for m in target_modules.split(",") if m.strip() in shapes]
    return dims.layers * r * sum(sum(shapes[n]) for n in names)


def train_memory(dims: Dims, cfg, tokens: int, checkpointing: bool) -> TrainMemory:
    """Planned peak bytes per GPU of a training step over `tokens` padded tokens (TrainConfig `cfg`)."""
    kind = "nf4" if cfg.load_in_4bit else "bf16"
    weights = dims.layer_params * (0.5 + 4 / 64 if cfg.load_in_4bit else 2.0)
    weights += dims.embedding_params * (4 if cfg.load_in_4bit and cfg.upcast_layer_norms else 2)
    lora = lora_params(dims, cfg.lora_r, cfg.target_modules) * 16
    per_layer = ACTIVATION_BYTES[kind] * dims.hidden
    if cfg.lora_dropout > 0:  # the dropped copy (2 bytes) and mask (1 byte) of every adapted input
        per_layer += 3 * (6 * dims.hidden + dims.intermediate)
    if checkpointing:
        layer_input = 4 if cfg.load_in_4bit and cfg.upcast_layer_norms else 2
        activations = tokens * (dims.layers * layer_input * dims.hidden + per_layer)
    else:
        activations = tokens * dims.layers * per_layer
    return TrainMemory(weights, lora, activations, TRAIN_OVERHEAD_GIB * GIB)


def fit_training(dims: Dims, cfg, max_length: int, capacity_gib: float) -> TrainFit:
    """Checkpointing and micro-batch for `train.gradient_checkpointing: auto`: the optimizer's batch
    (batch_size x gradient_accumulation_steps) stays; the micro-batch is a divisor of batch_size.
    First choice: no checkpointing (a third less compute) at the largest micro-batch that fits, if it
    holds at least MIN_MICRO_BATCH_TOKENS; else checkpointing at the largest that fits. Memory is
    planned for micro-batches of `max_length` tokens (the longest a padded micro-batch can be)."""
    budget = capacity_gib * TRAIN_MEMORY_SHARE
    divisors = [m for m in range(cfg.batch_size, 0, -1) if cfg.batch_size % m == 0]
    tried = []
    for checkpointing in (False, True):
        for micro in divisors:
            if not checkpointing and micro * max_length < min(MIN_MICRO_BATCH_TOKENS, cfg.batch_size * max_length):
                break
            need = train_memory(dims, cfg, micro * max_length, checkpointing).total / GIB
            tried.append(f"micro-batch {micro}{' + checkpointing' if checkpointing else ''}: {need:.1f} GiB")
            if need <= budget:
                accumulation = cfg.gradient_accumulation_steps * cfg.batch_size // micro
                return TrainFit(micro, accumulation, checkpointing, need, capacity_gib,
                                f"{tried[-1]} of {budget:.1f} usable ({TRAIN_MEMORY_SHARE:.0%} of {capacity_gib:.1f})",
                                tried=tried)
    need = train_memory(dims, cfg, max_length, True).total / GIB
    return TrainFit(1, cfg.gradient_accumulation_steps * cfg.batch_size, True, need, capacity_gib,
                    f"nothing fits: micro-batch 1 + checkpointing needs {need:.1f} GiB of {budget:.1f} usable",
                    fits=False, tried=tried)


def fitted_config(cfg, fit: TrainFit):
    """The TrainConfig finetune runs with after `fit_training`."""
    return dataclasses.replace(cfg, batch_size=fit.micro_batch, gradient_accumulation_steps=fit.accumulation,
                               gradient_checkpointing=fit.checkpointing)


def padded_tokens(lengths, micro_batch: int, seed: int = 0) -> float:
    """Tokens a pass over rows of `lengths` computes in shuffled micro-batches padded to their longest."""
    order = np.random.default_rng(seed).permutation(np.asarray(lengths))
    return float(sum(order[i:i + micro_batch].max() * len(order[i:i + micro_batch])
                     for i in range(0, len(order), micro_batch)))


def train_seconds(dims: Dims, cfg, lengths, rows: int, tflops: float, checkpointing: bool, micro_batch: int,
                  processes: int = 1) -> float:
    """Planned wall time of `rows` x epochs training rows drawn from `lengths` (prompt + answer token)."""
    sample = np.resize(np.asarray(lengths) + 1, rows)
    tokens = padded_tokens(sample, micro_batch) * cfg.epochs
    forward = 2.0 * dims.layer_params + 2.0 * dims.layers * dims.hidden * float(np.mean(sample))  # + attention
    flops = tokens * forward * (3 if checkpointing else 2)
    kind = "nf4" if cfg.load_in_4bit else "bf16"
    return flops / (tflops * 1e12 * TRAIN_EFFICIENCY[kind] * processes)


@dataclass
class QuantizePlan:
    merge_gpu_gib: float  # GPU memory of the merge (0: on the host)
    merge_host_gib: float
    awq_gpu_gib: float
    awq_host_gib: float
    merge_seconds: float
    quantize_seconds: float


def quantize_plan(dims: Dims, quant, tflops: float) -> QuantizePlan:
    """Memory and time of merge + quantization (QuantConfig `quant`); scoring the results is plan.py's."""
    bf16 = dims.params * 2
    nf4 = dims.layer_params * (0.5 + 4 / 64) + dims.embedding_params * 2
    on_gpu = quant.merge_base == "nf4"
    merge_gpu = (nf4 + bf16) / GIB + TRAIN_OVERHEAD_GIB if on_gpu else 0.0
    merge_host = bf16 / GIB * (1 if on_gpu else 2)  # the saved copy is written from the host
    calibration_tokens = quant.calibration_rows * quant.calibration_max_length
    layer = (dims.layer_params / dims.layers) * 2
    layer_activations = calibration_tokens * (2 * dims.hidden + 2 * dims.intermediate) * 2
    awq_gpu = (layer * 2 + layer_activations) / GIB + TRAIN_OVERHEAD_GIB if quant.scheme != "none" else 0.0
    awq_host = bf16 / GIB + calibration_tokens * dims.hidden * 2 * 2 / GIB
    merge_s = MERGE_SECONDS_PER_GB * bf16 / 1e9
    if quant.scheme == "none":
        quant_s = 0.0
    else:
        grid = quant.awq_n_grid if quant.method == "awq" else 0
        quant_s = AWQ_SECONDS_PER_GB * bf16 / 1e9 + \
            grid * 2.0 * dims.layer_params * calibration_tokens / (tflops * 1e12 * AWQ_EFFICIENCY)
    return QuantizePlan(merge_gpu, merge_host, awq_gpu, awq_host, merge_s, quant_s)
