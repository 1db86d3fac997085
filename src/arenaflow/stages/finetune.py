"""`arenaflow finetune`: the base's zero-shot figure, then LoRA/QLoRA on the answer token (train.py, or
`accelerate launch` for several processes), the loss curve, validation and the adapter in one MLflow run."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import mlflow

from ..data import subsample
from ..metrics import preference_metrics, reference_log_losses
from ..recipe import Recipe
from ..scoring import score_rows
from ..train import check_config as check_train_config
from ..train import finetune as train_adapter
from ..train_fit import settle_memory
from .datasets import load_split, log_rows_dataset
from .registry import training_base
from .runs import log_to_run, stage_run
from .train_launch import launch as launch_training


def run(recipe: Recipe, data: str = "") -> str:
    """QLoRA/LoRA on the answer token; logs the base model's zero-shot and the finetuned validation
    log_loss on the same rows, and the adapter under the run's `adapter/` artifacts."""
    check_train_config(recipe.train)  # before scoring the base model, not after
    base = training_base(recipe)
    train_cfg, fit = settle_memory(recipe.train, base, recipe.prompt.max_length)  # refuses what cannot fit, now
    train, valid = load_split(data, recipe)
    valid = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    with stage_run(recipe, "finetune") as run:
        if fit is not None:
            print(f"finetune: gradient_checkpointing=auto -> {fit.reason}")
            mlflow.set_tag("memory_plan", f"{fit.reason}; tried: {'; '.join(fit.tried)}")
            mlflow.log_params({"fitted.batch_size": train_cfg.batch_size, "fitted.gradient_checkpointing":
                               train_cfg.gradient_checkpointing,
                               "fitted.gradient_accumulation_steps": train_cfg.gradient_accumulation_steps})
        log_rows_dataset(train, source=data or "recipe split", name=f"{recipe.name}-train", context="training")
        dataset = log_rows_dataset(valid, source=data or "recipe split", name=f"{recipe.name}-valid",
                                   context="validation")
        mlflow.set_tag("eval_dataset_digest", dataset.digest)
        # Zero-shot first, in its own engine: bitsandbytes must not see a forward before training. One A/B
        # order (no swap-TTA), like the finetuned figure it is compared with.
        one_order = dataclasses.replace(recipe, engine=dataclasses.replace(recipe.engine, swap_tta=False))
        zero_shot = preference_metrics(score_rows(base, one_order, valid).probs, valid["label"].to_numpy())
        mlflow.log_metrics({f"base_{k}": v for k, v in zero_shot.items()})
        references = reference_log_losses(train, valid)  # what the finetuned model must beat, same rows
        mlflow.log_metrics(references)
        with tempfile.TemporaryDirectory() as tmp:
            if recipe.train.processes == 1:
                result = train_adapter(base, train, valid, recipe.prompt, train_cfg, Path(tmp),
                                       trust_remote_code=recipe.model.trust_remote_code, log_metrics=log_to_run)
            else:  # rank 0 logs into this run itself (train_launch)
                result = launch_training(base, train, valid, recipe.prompt, train_cfg, Path(tmp),
                                         trust_remote_code=recipe.model.trust_remote_code)
            mlflow.log_artifacts(str(result.adapter_dir), "adapter")
        final = result.kept  # the saved adapter's validation: the last epoch's, or the best with keep_best_epoch
        mlflow.log_metrics({"train_loss": result.train_loss, "train_seconds": result.seconds,
                            "seconds_per_row": result.seconds_per_row, "rows_trained": result.rows_trained,
                            "rows_per_s": 1.0 / result.seconds_per_row if result.seconds_per_row else 0.0,
                            **result.planned, **({"train_peak_gpu_memory_gib": result.peak_gpu_memory_gib}
                                                 if result.peak_gpu_memory_gib is not None else {}),
                            **({"log_loss": final["log_loss"], "kept_epoch": final["epoch"] or 0.0,
                                "log_loss_gain_over_base": zero_shot["log_loss"] - final["log_loss"]} if final else {})})
        print(f"finetune: base zero-shot log_loss={zero_shot['log_loss']:.4f}, finetuned "
              f"log_loss={final.get('log_loss', float('nan')):.4f} at epoch {final.get('epoch') or 0:.2f} (length baseline "
              f"{references['length_baseline_log_loss']:.4f}); adapter at runs:/{run.info.run_id}/adapter")
        return run.info.run_id

