"""What finetune reports while it trains: the loss curve and per-epoch validation (to the caller's
`log_metrics`: the stage logs them into its MLflow run), and (train.keep_best_epoch) the weights of the
best validated epoch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .scoring import label_probabilities
from .metrics import preference_metrics

from .errors import ArenaflowError

logger = logging.getLogger("arenaflow.train")  # the same logger as train.py


class TrainError(ArenaflowError, ValueError):
    """A training configuration or training table that cannot be used."""


def make_log_callback(validate: Callable | None, history: list, valid: list, timing: dict, keep_best: bool,
                      log_metrics: Callable[[dict, int], None] | None = None):
    """The Trainer callback that records the loss curve and validates each epoch; `log_metrics(metrics, step)`
    (the stage's: into its MLflow run) gets both as they come, finite values only."""
    import torch
    from transformers import TrainerCallback

    def log_mlflow(metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean and log_metrics is not None:
            log_metrics(clean, step)

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


def validation_metrics(probs: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """log_loss / accuracy on hard-labelled rows (sklearn), soft cross-entropy on soft-labelled ones."""
    metrics: dict[str, float] = {}
    hard = np.isin(labels, (0, 1, 2))
    if hard.any():  # the same figures evaluate reports
        figures = preference_metrics(probs[hard], labels[hard])
        metrics.update(log_loss=figures["log_loss"], accuracy=figures["accuracy"])
    soft = np.isfinite(targets).all(axis=1) & ((targets > 0) & (targets < 1)).any(axis=1)
    if soft.any():
        clipped = np.clip(probs[soft], 1e-15, 1.0)
        metrics["soft_cross_entropy"] = float(-(targets[soft] * np.log(clipped)).sum(axis=1).mean())
    return metrics


def make_validator(valid_ids: list[list[int]], targets: np.ndarray, labels: np.ndarray, label_ids: Sequence[int],
                   pad_token_id: int, batch_tokens: int) -> Callable:
    """`validate(model) -> {"log_loss", "accuracy", ...}` on these prompts: the renormalised three
    label-token probabilities (what every scorer reads), length-sorted batches of `batch_tokens`."""
    def validate(model):
        probs = label_probabilities(model, valid_ids, label_ids, pad_token_id, batch_tokens=batch_tokens)
        return validation_metrics(probs, targets, labels)

    return validate
