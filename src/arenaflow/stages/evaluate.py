"""`arenaflow evaluate`: score labelled rows with a model; log_loss & co against the version's MLflow Model and
the evaluation dataset, per source, next to the length baseline and the class prior; plots, predictions."""

from __future__ import annotations

from pathlib import Path
import tempfile

import mlflow

from ..calibration import cross_fit
from ..metrics import preference_metrics, reference_log_losses, save_plots, speed_metrics
from ..recipe import Recipe
from ..scoring import open_scorer, predict
from . import registry
from .datasets import evaluation_rows, log_rows_dataset
from .registry import resolve_model_ref
from .runs import checkpoint_precision, stage_run


def run(recipe: Recipe, input: str = "", model: str = "") -> dict[str, float]:
    """Score labelled rows with a model; log log_loss & co (against the version's MLflow Model and the
    evaluation dataset when the model is a registered version), plots, predictions."""
    train, rows = evaluation_rows(recipe, input)  # unlabelled rows are refused before any model is resolved
    ref = resolve_model_ref(model, recipe)
    labels = rows["label"].to_numpy()
    with stage_run(recipe, "evaluate", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        dataset = log_rows_dataset(rows, source=input or "recipe valid split", name="eval", context="evaluation")
        scorer, builder = open_scorer(ref.checkpoint, recipe)
        with scorer:
            result = predict(scorer, builder, rows, recipe.engine.swap_tta, calibrator=ref.calibrator)
        probs = result.probs
        if ref.calibrator.dataset_digest == dataset.digest:
            # The calibrator was chosen and fitted on these very rows: report the choice cross-fitted, as quantize did.
            raw = result.probs if result.probs_uncalibrated is None else result.probs_uncalibrated  # none chosen
            probs = cross_fit(ref.calibrator.chosen_from or ref.calibrator.method, raw, labels, rows,
                              recipe.calibration.folds, recipe.data.seed, result.probs_swapped).grouped
            mlflow.set_tag("calibration_figure", "cross-fitted: the calibrator was fitted on this dataset")
        figures = preference_metrics(probs, labels)
        if result.probs_uncalibrated is not None:  # what calibration buys, on the same rows
            figures["log_loss_uncalibrated"] = preference_metrics(result.probs_uncalibrated, labels)["log_loss"]
        if result.probs_one_order is not None:  # what swap-TTA buys, on the same rows (uncalibrated)
            figures["log_loss_without_tta"] = preference_metrics(result.probs_one_order, labels)["log_loss"]
        for source in sorted(set(rows["source"])) if rows["source"].nunique() > 1 else []:
            mine = (rows["source"] == source).to_numpy()
            figures[f"log_loss.{Path(source).stem}"] = preference_metrics(probs[mine], labels[mine])["log_loss"]
        figures.update(reference_log_losses(train, rows))
        figures["rows"] = float(len(rows))
        mlflow.log_metrics(speed_metrics(len(rows), result.seconds, result.prompt_tokens, result.startup_seconds))
        if ref.version:  # the figures belong to the version's model and this dataset too
            registry.log_version_metrics(ref.registered_name, ref.version, figures, dataset)
        else:
            mlflow.log_metrics(figures)
        mlflow.set_tags({"eval_dataset_digest": dataset.digest, "model_uri": ref.uri,
                         "model_version": ref.version or "", "swap_tta": str(recipe.engine.swap_tta)})
        with tempfile.TemporaryDirectory() as tmp:
            for plot in save_plots(probs, labels, Path(tmp)):
                mlflow.log_artifact(str(plot), "plots")
            predictions = rows[["id", "source", "label"]].assign(
                p_a=probs[:, 0], p_b=probs[:, 1], p_tie=probs[:, 2])
            predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "predictions.csv"))
        print(f"evaluate {ref.uri}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items())
              + f"; {result.samples_per_s:.2f} samples/s (run {run.info.run_id})")
        return figures
