"""What finetune reports while it trains: the loss curve and per-epoch validation into the caller's
MLflow run, and (train.keep_best_epoch) the weights of the best validated epoch."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

from .errors import ArenaflowError

logger = logging.getLogger("arenaflow.train")  # the same logger as train.py


class TrainError(ArenaflowError, ValueError):
    """A training configuration or training table that cannot be used."""


def make_log_callback(validate: Callable | None, history: list, valid: list, timing: dict, keep_best: bool):
    import torch
    from transformers import TrainerCallback

    def log_mlflow(metrics: dict, step: int) -> None:
        mlflow = sys.modules.get("mlflow")  # not imported: the caller cannot have opened a run
        if mlflow is None or mlflow.active_run() is None:  # the caller owns the run; never start one here
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    class TrainLogCallback(TrainerCallback):
        def __init__(self):
            self.last_validated_step = -1
            self.best: dict = {}  # with keep_best: the lowest-log_loss entry of `valid`
            self.best_weights: dict = {}  # ... and a CPU copy of the trainable weights it was measured with

        def restore_best(self, model) -> dict:
            """Put the best epoch's trainable weights back (keep_best); the saved adapter's figures."""
            if not self.best_weights:
                return valid[-1] if valid else {}
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in self.best_weights:
                        param.copy_(self.best_weights[name])
            return self.best

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or "train_runtime" in logs:
                return
            entry = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                     "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                     "label_accuracy": logs.get("label_accuracy")}
            history.append(entry)
            log_mlflow({"train_loss": entry["loss"], "learning_rate": entry["learning_rate"] or 0.0,
                        "grad_norm": entry["grad_norm"] if entry["grad_norm"] is not None else float("nan"),
                        "train_label_accuracy": entry["label_accuracy"] if entry["label_accuracy"] is not None
                        else float("nan")}, state.global_step)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            self.run(state, model)

        def run(self, state, model) -> None:
            if validate is None or state.global_step < 1 or state.global_step == self.last_validated_step:
                return  # never a forward before the first training step (bitsandbytes trap)
            start = time.perf_counter()
            was_training = model.training
            model.eval()
            try:
                metrics = dict(validate(model))
            finally:
                model.train(was_training)
            timing["valid_seconds"] += time.perf_counter() - start
            self.last_validated_step = state.global_step
            valid.append({"epoch": state.epoch, "step": state.global_step, **metrics})
            if keep_best:
                if "log_loss" not in metrics:
                    raise TrainError(f"train.keep_best_epoch needs a log_loss from validation, got {sorted(metrics)}")
                if not self.best or metrics["log_loss"] < self.best["log_loss"]:
                    self.best = valid[-1]
                    self.best_weights = {name: param.detach().to("cpu", copy=True)
                                         for name, param in model.named_parameters() if param.requires_grad}
            log_mlflow({k if k.startswith("valid_") else f"valid_{k}": v for k, v in metrics.items()}
                       | {"epoch": state.epoch or 0.0}, state.global_step)
            logger.info("validation at step %d (epoch %.2f): %s", state.global_step, state.epoch or 0, metrics)

    return TrainLogCallback()
