"""The memory plan applied to a training run: `gradient_checkpointing: auto` settled for the card
(plan_stages.fit_training), and the plan's prediction for a built trainer, logged beside what it measured."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .recipe import TrainConfig
from .train_log import TrainError


def settle_memory(cfg: TrainConfig, checkpoint: Path, max_length: int):
    """(the TrainConfig to train with, the plan's TrainFit or None). `gradient_checkpointing: auto` on a GPU:
    checkpointing and micro-batch from the memory plan (plan_stages.fit_training) for this card; on a CPU
    (host memory is not the limit there) no checkpointing. TrainError, with the plan's numbers and the
    settings to change, when nothing fits: before any weights load."""
    import torch

    from .architectures import dims_from_config
    from .models import read_config
    from .plan_stages import GIB, fit_training, fitted_config

    if cfg.gradient_checkpointing != "auto":
        return cfg, None
    if not torch.cuda.is_available():
        return replace(cfg, gradient_checkpointing=False), None
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    fit = fit_training(dims_from_config(read_config(checkpoint)), cfg, max_length + 1, capacity)
    if not fit.fits:
        raise TrainError(f"finetune does not fit this GPU ({capacity:.1f} GiB): {fit.reason} ({'; '.join(fit.tried)}). "
                         "Lower prompt.max_length, set train.load_in_4bit=true or lower train.lora_r, or use a larger card")
    return fitted_config(cfg, fit), fit


def planned_training(checkpoint: Path, trainer, cfg: TrainConfig) -> dict:
    """What plan_stages predicts for this training run on this card (the trainer's settled micro-batch,
    checkpointing and rows), named like the measured figures with a `plan_` prefix; {} on CPU."""
    import torch

    from .architectures import dims_from_config
    from .models import read_config
    from .plan import GPUS, PlanError, gpu_spec
    from .plan_stages import GIB, train_memory, train_seconds

    if not torch.cuda.is_available():
        return {}
    try:
        gpu = gpu_spec(torch.cuda.get_device_name())
    except PlanError:
        gpu = GPUS["H100"]  # an unknown card: planned as an H100 (named in the note)
    args = trainer.args
    dims = dims_from_config(read_config(checkpoint))
    lengths = [len(ids) - 1 for ids in trainer.train_dataset["input_ids"]]
    micro = args.per_device_train_batch_size
    rows = len(lengths) * args.world_size
    seconds = train_seconds(dims, replace(cfg, epochs=args.num_train_epochs), lengths, rows, gpu.tflops["bf16"],
                            bool(args.gradient_checkpointing), micro, processes=args.world_size)
    memory = train_memory(dims, cfg, micro * max(lengths + [0]) + micro, bool(args.gradient_checkpointing))
    return {"plan_train_seconds": seconds, "plan_train_peak_gpu_memory_gib": memory.total / GIB}
