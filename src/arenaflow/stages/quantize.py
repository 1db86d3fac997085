"""`arenaflow quantize`: merge, quantize within the log-loss bound, calibrate, register a version."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import mlflow

from ..calibration import CHOICE_RULE, check_method, cross_fit
from ..data import subsample
from ..metrics import preference_metrics, speed_metrics
from ..models import load_tokenizer
from ..prompts import PromptBuilder
from ..quantize import checkpoint_size_bytes, merge_adapter, quantize_within_bound
from ..recipe import Recipe
from ..scoring import score_rows
from . import registry
from .datasets import fetch_artifacts, load_split, log_rows_dataset
from .registry import training_base
from .runs import stage_run


def run(recipe: Recipe, adapter: str, data: str = "") -> str:
    """Merge the adapter into a full-precision base, quantize (AWQ W4A16/W8A16) within the recipe's
    log-loss bound (else a fallback scheme, else the merged checkpoint), fit the calibrator on the valid
    rows (its figure cross-fitted), register the result as a new version (an MLflow Model whose metrics
    are those figures on the valid dataset). Returns the version."""
    check_method(recipe.calibration.method)
    base = training_base(recipe)
    train, valid = load_split(data, recipe)
    valid = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    labels = valid["label"].to_numpy()
    with stage_run(recipe, "quantize") as run, tempfile.TemporaryDirectory() as tmp:
        dataset = log_rows_dataset(valid, source=data or "recipe split", name=f"{recipe.name}-valid",
                                   context="validation")
        adapter_dir = fetch_artifacts(adapter)
        start = time.perf_counter()
        merged = merge_adapter(base, adapter_dir, Path(tmp) / "merged", recipe.quant.merge_dtype, recipe.quant.merge_base)
        mlflow.log_metric("merge_seconds", time.perf_counter() - start)
        calibration_builder = PromptBuilder(load_tokenizer(merged),
                                            dataclasses.replace(recipe.prompt, max_length=recipe.quant.calibration_max_length))
        calibration = calibration_builder.build_rows(subsample(train, recipe.quant.calibration_rows, recipe.data.seed))
        chosen = quantize_within_bound(merged, Path(tmp), recipe.quant, calibration,
                                       score=lambda checkpoint: score_rows(checkpoint, recipe, valid), log_loss_of=lambda result: preference_metrics(result.probs, labels)["log_loss"])
        mlflow.log_metrics(chosen.seconds)
        for prefix, result in (("merged_", chosen.merged_result), ("", chosen.result)):  # the same rows, same card
            speed = speed_metrics(len(valid), result.seconds, result.prompt_tokens, result.startup_seconds)
            mlflow.log_metrics({f"{prefix}{k}": v for k, v in speed.items() if k != "projected_hours_25k_rows"})
        merged_figures = preference_metrics(chosen.merged_result.probs, labels)
        figures = preference_metrics(chosen.result.probs, labels)
        figures.update({f"merged_{k}": v for k, v in merged_figures.items()})
        figures["quant_log_loss_delta"] = figures["log_loss"] - merged_figures["log_loss"]
        figures["merged_size_mb"] = checkpoint_size_bytes(merged) / 2**20
        figures["quantized_size_mb"] = checkpoint_size_bytes(chosen.checkpoint) / 2**20
        fitted = cross_fit(recipe.calibration.method, chosen.result.probs, labels, valid, recipe.calibration.folds,
                           recipe.data.seed, chosen.result.probs_swapped)
        calibrator = fitted.selection.calibrator
        calibrator.dataset_digest = dataset.digest  # evaluate cross-fits again on these very rows
        figures.update(fitted.figures(labels))  # the stored choice's figures are nested: out of fold
        mlflow.set_tags({"calibration_rule": CHOICE_RULE, "calibration_choice": fitted.summary()})
        mlflow.log_params(calibrator.params())
        mlflow.log_dict(calibrator.to_dict(), "calibration.json")
        version = registry.register_model(
            chosen.checkpoint, recipe.registry.model_name, recipe, example=valid.head(3), calibrator=calibrator,
            tags={"quantization": chosen.scheme, "quantization_choice": chosen.note, "quant_method": recipe.quant.method,
                  "group_size": str(recipe.quant.group_size), "base_model": recipe.model.base,
                  "recipe": recipe.name, "adapter": adapter, "calibration": calibrator.method},
            description=(f"{recipe.model.base} finetuned by recipe {recipe.name}, merged in "
                         f"{recipe.quant.merge_dtype}, quantized {chosen.scheme} ({chosen.note}). Valid log_loss "
                         f"{figures['log_loss']:.4f} (merged {merged_figures['log_loss']:.4f}; calibrated "
                         f"{figures['calibrated_log_loss']:.4f} out of fold, {calibrator.method} calibration)."))
        registry.log_version_metrics(recipe.registry.model_name, version.version, figures, dataset)
        mlflow.set_tags({"registered_version": str(version.version), "quantization_choice": chosen.note})
        print(f"quantize: {chosen.scheme} log_loss={figures['log_loss']:.4f} (merged {merged_figures['log_loss']:.4f}, "
              f"delta {figures['quant_log_loss_delta']:+.4f}; {chosen.note}); calibration {fitted.summary()}; "
              f"{figures['calibrated_log_loss']:.4f} out of fold; registered "
              f"{recipe.registry.model_name} v{version.version} (run {run.info.run_id})")
        return str(version.version)
