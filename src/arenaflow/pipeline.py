"""The stages behind the CLI verbs: each opens its MLflow run, calls the stage's module, logs results."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd

from . import data as data_mod
from . import registry
from .bench import bench_stage
from .calibration import Calibrator, cross_fit
from .data import evaluation_rows, fetch_artifacts, load_split, log_rows_dataset, recipe_split, subsample
from .datagen.stage import generate_dataset
from .metrics import ROWS_KAGGLE_TEST, preference_metrics, reference_log_losses, save_plots, speed_metrics
from .models import load_tokenizer, resolve_model
from .plan import plan_stage, planned_speed
from .prompts import PromptBuilder
from .quantize import checkpoint_size_bytes, merge_adapter, quantize_within_bound
from .recipe import Recipe
from .registry import resolve_model_ref
from .scoring import KeptEngine, ShardPredictor, open_scorer, predict, predict_in_shards, score_rows
from .tracking import checkpoint_precision, git_commit, stage_run
from .train import check_config as check_train_config
from .train import finetune as train_adapter
from .train import settle_memory
from .train_launch import launch as launch_training


def datagen(recipe: Recipe, input: str = "", prompts_file: str = "") -> str:
    """Ingest -> (max_rows) -> grouped split -> swap-augment train -> parquet + MLflow datasets.
    With `generate.modes` beyond ingest (respond, label, dedup, filter): datagen.stage.generate_dataset.

    Returns the run id; its artifacts `data/train.parquet` and `data/valid.parquet` feed finetune.
    """
    files = [input] if input else recipe.data.files
    if prompts_file:
        recipe = dataclasses.replace(recipe, generate=dataclasses.replace(recipe.generate, prompts_file=prompts_file))
    with stage_run(recipe, "datagen") as run:
        if set(recipe.generate.modes) != {"ingest"}:
            generate_dataset(recipe, files)
            print(f"datagen: artifacts at runs:/{run.info.run_id}/data")
            return run.info.run_id
        prepared = recipe_split(recipe, files)
        mlflow.log_metrics({k: float(v) for k, v in prepared.counts.items()})
        mlflow.log_metrics({f"valid_{k}": v for k, v in data_mod.label_distribution(prepared.valid).items()})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "data"
            for split, rows, context in (("train", prepared.train, "training"), ("valid", prepared.valid, "validation")):
                data_mod.write_parquet(rows, out / f"{split}.parquet")
                dataset = log_rows_dataset(rows, source=",".join(map(str, files)), name=f"{recipe.name}-{split}",
                                           context=context)
                mlflow.set_tag(f"{split}_digest", dataset.digest)
            mlflow.log_artifacts(str(out), "data")
        counts = ", ".join(f"{k}={v}" for k, v in prepared.counts.items())
        print(f"datagen: {counts}; artifacts at runs:/{run.info.run_id}/data")
        return run.info.run_id


def evaluate(recipe: Recipe, input: str = "", model: str = "") -> dict[str, float]:
    """Score labelled rows with a model; log log_loss & co (against the version's MLflow Model and the
    evaluation dataset when the model is a registered version), plots, predictions."""
    ref = resolve_model_ref(model, recipe)
    train, rows = evaluation_rows(recipe, input)
    labels = rows["label"].to_numpy()
    with stage_run(recipe, "evaluate", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        dataset = log_rows_dataset(rows, source=input or "recipe valid split", name="eval", context="evaluation")
        scorer, builder = open_scorer(ref.checkpoint, recipe)
        with scorer:
            result = predict(scorer, builder, rows, recipe.engine.swap_tta, calibrator=ref.calibrator)
        probs = result.probs
        if ref.calibrator.method != "none" and ref.calibrator.dataset_digest == dataset.digest:
            # The calibrator was fitted on these very rows: report it cross-fitted, as quantize did.
            probs = cross_fit(ref.calibrator.method, result.probs_uncalibrated, labels, rows, recipe.calibration.folds,
                              recipe.data.seed, result.probs_swapped)[1]
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


def promote(recipe: Recipe, version: str = "latest"):
    """Move the alias to `version` if its log_loss beats the champion's on the same evaluation data."""
    name = recipe.registry.model_name
    with stage_run(recipe, "promote"):
        if version == "latest":
            version = registry.latest_version(name)
        decision = registry.promote(name, version, alias=recipe.registry.alias)
        mlflow.set_tags({"candidate_version": version, "promoted": str(decision.promoted),
                         "decision": decision.reason})
        print(f"promote {name} v{version}: {'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
        return decision


def infer(recipe: Recipe, input: str, output: str = "submission.csv", model: str = "") -> Path:
    """Kaggle submission (id, winner_model_a, winner_model_b, winner_tie) from the champion.

    Rows are scored in shards of `engine.shard_rows`, each saved as it finishes next to the output
    (`<output>.shards/`, shards.run_shards): a killed run started again with the same arguments scores
    only the missing shards and writes the identical file.
    """
    ref = resolve_model_ref(model, recipe)
    rows = data_mod.read_prepared(fetch_artifacts(input))
    output_path = Path(output)
    shard_root = output_path.with_name(output_path.name + ".shards")
    with stage_run(recipe, "infer", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        dataset = log_rows_dataset(rows, source=input, name="infer-input", context="inference")
        manifest = {"input": str(input), "input_digest": dataset.digest, "rows": len(rows), "model": ref.uri,
                    "version": ref.version, "checkpoint": str(ref.checkpoint) if not ref.version else None,
                    "calibration": ref.calibrator.to_dict(),
                    "prompt": dataclasses.asdict(recipe.prompt), "engine": dataclasses.asdict(recipe.engine)}
        # The engine is started by the first shard that needs one (on Ray: one run over every row left).
        shard_predict = ShardPredictor(lambda: open_scorer(ref.checkpoint, recipe), rows, recipe.engine.swap_tta,
                                       calibrator=ref.calibrator, predict=predict)
        try:
            probs, spent = predict_in_shards(shard_predict, shard_root, manifest, recipe.engine.shard_rows,
                                             "infer shards")
        finally:
            if shard_predict.scorer is not None:
                shard_predict.scorer.close()
        submission = pd.DataFrame({"id": rows["id"], "winner_model_a": probs[:, 0],
                                   "winner_model_b": probs[:, 1], "winner_tie": probs[:, 2]})
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = output_path.with_name(output_path.name + ".tmp")
        submission.to_csv(tmp_out, index=False)
        tmp_out.rename(output_path)
        scored = spent["rows"]
        figures = {"rows": float(len(rows)), "rows_scored_this_run": float(scored),
                   "rows_resumed": float(len(rows) - scored)}
        if scored:
            figures.update(speed_metrics(scored, spent["seconds"], spent["tokens"],
                                         shard_predict.scorer.startup_seconds))
            prompts = scored * (2 if recipe.engine.swap_tta else 1)
            figures.update(planned_speed(ref.checkpoint, recipe.engine, prompts, spent["tokens"], scored))
        mlflow.log_metrics(figures)
        mlflow.set_tag("model_version", ref.version or "")
        mlflow.log_artifact(str(output_path))
        shutil.rmtree(shard_root)
        print(f"infer: wrote {output_path} ({len(rows)} rows, {scored} scored now, "
              f"{len(rows) - scored} resumed) with {ref.uri} (run {run.info.run_id})")
        return output_path


def finetune(recipe: Recipe, data: str = "") -> str:
    """QLoRA/LoRA on the answer token; logs the base model's zero-shot and the finetuned validation
    log_loss on the same rows, and the adapter under the run's `adapter/` artifacts."""
    check_train_config(recipe.train)  # before scoring the base model, not after
    base = resolve_model(recipe.model.base)
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
            train_fn = train_adapter if recipe.train.processes == 1 else launch_training
            result = train_fn(base, train, valid, recipe.prompt, train_cfg, Path(tmp),
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


def quantize(recipe: Recipe, adapter: str, data: str = "") -> str:
    """Merge the adapter into a full-precision base, quantize (AWQ W4A16/W8A16) within the recipe's
    log-loss bound (else a fallback scheme, else the merged checkpoint), fit the calibrator on the valid
    rows (its figure cross-fitted), register the result as a new version (an MLflow Model whose metrics
    are those figures on the valid dataset). Returns the version."""
    base = resolve_model(recipe.model.base)
    train, valid = load_split(data, recipe)
    valid = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    labels = valid["label"].to_numpy()
    with (stage_run(recipe, "quantize") as run, tempfile.TemporaryDirectory() as tmp,
          KeptEngine(recipe, valid) as engine):
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
                                       score=engine, release=engine.close, log_loss_of=lambda result: preference_metrics(result.probs, labels)["log_loss"])
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
        calibrator, held_out, folds = cross_fit(recipe.calibration.method, chosen.result.probs, labels, valid,
                                                recipe.calibration.folds, recipe.data.seed, chosen.result.probs_swapped)
        calibrator.dataset_digest = dataset.digest  # evaluate cross-fits again on these very rows
        figures["calibrated_log_loss"] = preference_metrics(held_out, labels)["log_loss"]  # out of fold
        if figures["calibrated_log_loss"] > figures["log_loss"]:
            # It does not transfer across the folds (on gpu-smollm2 leave-one-source-out took 0.943 to 0.995):
            # a calibrator that makes unseen rows worse is not stored.
            mlflow.set_tag("calibration_dropped", f"{recipe.calibration.method} out of fold "
                           f"{figures['calibrated_log_loss']:.4f} > {figures['log_loss']:.4f} uncalibrated")
            calibrator = Calibrator()
        mlflow.log_params({**calibrator.params(), "calibrator.folds_by": folds})
        mlflow.log_dict(calibrator.to_dict(), "calibration.json")
        version = registry.register_model(
            chosen.checkpoint, recipe.registry.model_name, recipe, example=valid.head(3), calibrator=calibrator,
            scorer=engine.lend(chosen.checkpoint),
            tags={"quantization": chosen.scheme, "quantization_choice": chosen.note, "quant_method": recipe.quant.method,
                  "group_size": str(recipe.quant.group_size), "base_model": recipe.model.base,
                  "recipe": recipe.name, "adapter": adapter, "calibration": calibrator.method},
            description=(f"{recipe.model.base} finetuned by recipe {recipe.name}, merged in "
                         f"{recipe.quant.merge_dtype}, quantized {chosen.scheme} ({chosen.note}). Valid log_loss "
                         f"{figures['log_loss']:.4f} (merged {merged_figures['log_loss']:.4f}; calibrated "
                         f"{figures['calibrated_log_loss']:.4f} out of fold by {folds})."))
        registry.log_version_metrics(recipe.registry.model_name, version.version, figures, dataset)
        mlflow.set_tags({"registered_version": str(version.version), "quantization_choice": chosen.note})
        print(f"quantize: {chosen.scheme} log_loss={figures['log_loss']:.4f} (merged {merged_figures['log_loss']:.4f}, "
              f"delta {figures['quant_log_loss_delta']:+.4f}; {chosen.note}); {recipe.calibration.method} "
              f"calibration {figures['calibrated_log_loss']:.4f} out of fold; registered "
              f"{recipe.registry.model_name} v{version.version} (run {run.info.run_id})")
        return str(version.version)


# ---------------------------------------------------------------------------------------------
# main: every stage as a nested run (mlflow's multistep workflow pattern).

def project_root() -> Path:
    here = Path.cwd()
    return here if (here / "MLproject").exists() else Path(__file__).resolve().parents[2]


def _finished_run(entry_point: str, parameters: dict, git_commit: str, experiment_id: str):
    """A FINISHED run of this entry point with the same parameters and code version, if any. MLflow logs
    a project run's parameter as the shell word it passed (an empty one as `''`)."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
        order_by=["attributes.start_time DESC"])
    for run in runs:
        if (run.info.status == "FINISHED" and run.data.tags.get("git_commit") == git_commit
                and all(run.data.params.get(k) in (str(v), shlex.quote(str(v))) for k, v in parameters.items())):
            return run
    return None


def _step(entry_point: str, parameters: dict, git_commit: str, experiment_id: str):
    """Reuse a finished run with the same params and commit, else run the entry point as a child run."""
    found = _finished_run(entry_point, parameters, git_commit, experiment_id)
    if found is not None:
        print(f"main: reusing {entry_point} run {found.info.run_id} (same parameters and commit)")
        mlflow.set_tag(f"step_{entry_point}", f"{found.info.run_id} (reused)")
        return found
    print(f"main: running {entry_point} {parameters}")
    submitted = mlflow.run(str(project_root()), entry_point=entry_point, parameters=parameters,
                           env_manager="local", experiment_id=experiment_id, synchronous=True)
    mlflow.set_tag(f"step_{entry_point}", submitted.run_id)
    return mlflow.MlflowClient().get_run(submitted.run_id)


def main(recipe: Recipe, overrides: list[str] | None = None, infer_input: str = "data/sample_test.csv") -> None:
    """datagen -> finetune -> quantize -> evaluate -> promote -> infer, each a nested MLflow run."""
    common = {"recipe": recipe.path or "", "overrides": " ".join(overrides or [])}
    with stage_run(recipe, "main") as parent:
        experiment_id, commit = parent.info.experiment_id, git_commit()
        datagen_run = _step("datagen", {**common, "input": ""}, commit, experiment_id)
        data = f"runs:/{datagen_run.info.run_id}/data"
        finetune_run = _step("finetune", {**common, "data": data}, commit, experiment_id)
        quantize_run = _step("quantize", {**common, "data": data,
                                          "adapter": f"runs:/{finetune_run.info.run_id}/adapter"}, commit, experiment_id)
        version = quantize_run.data.tags["registered_version"]
        model_uri = f"models:/{recipe.registry.model_name}/{version}"
        evaluate_run = _step("evaluate", {**common, "input": data, "model": model_uri}, commit, experiment_id)
        promote_run = _step("promote", {**common, "version": version}, commit, experiment_id)
        infer_run = _step("infer", {**common, "input": infer_input, "model": "",
                                    "output": str(Path(tempfile.gettempdir()) / f"arenaflow-main-{parent.info.run_id}.csv")},
                          commit, experiment_id)
        ft, ev = finetune_run.data.metrics, evaluate_run.data.metrics
        mlflow.log_metrics({
            "base_log_loss": ft["base_log_loss"], "finetuned_log_loss": ft["log_loss"],
            "merged_log_loss": quantize_run.data.metrics["merged_log_loss"],
            "log_loss": ev["log_loss"], "accuracy": ev["accuracy"],
            "length_baseline_log_loss": ev["length_baseline_log_loss"],
            "class_prior_log_loss": ev["class_prior_log_loss"],
            "quant_log_loss_delta": quantize_run.data.metrics["quant_log_loss_delta"],
            "samples_per_s": infer_run.data.metrics.get("samples_per_s", float("nan")),
        })
        mlflow.set_tags({"registered_version": version, "promotion": promote_run.data.tags.get("decision", "")})
        print(f"main: base zero-shot log_loss {ft['base_log_loss']:.4f} -> finetuned {ft['log_loss']:.4f} -> "
              f"{recipe.quant.scheme} {ev['log_loss']:.4f} (length baseline {ev['length_baseline_log_loss']:.4f}); "
              f"{recipe.registry.model_name} v{version}: {promote_run.data.tags.get('decision', '')}")


def bench(recipe: Recipe, model: str = "", rows: int = 64, engines: str = "", synthetic: str = "", warmup: int = 8,
          train: str | bool = False, variants: str = "", steps: int = 10, warmup_steps: int = 2):
    """Time every scoring engine on one model and one prompt set (see bench.py), or with `train` training
    steps, the project's against plain peft (bench_train.py); one MLflow run."""
    if str(train).lower() != "true":
        return bench_stage(recipe, model=model, rows=rows, engines=engines, synthetic=synthetic, warmup=warmup)
    from .bench import card_peak_tflops, metric_prefix, synthetic_lengths
    from .bench_train import prepare_train_bench, run_train_bench
    from .hardware import card_name

    setup = prepare_train_bench(recipe, model, variants, rows=rows, steps=steps, warmup_steps=warmup_steps,
                                synthetic=synthetic_lengths(synthetic) if synthetic else None)
    with stage_run(recipe, "bench", model=setup.reference, precision="train") as run:
        mlflow.set_tags({"bench_mode": "train", "bench_model_note": f"{setup.reference}; {setup.rows.note}",
                         "bench_variants": ",".join(v.label for v in setup.variants)})

        def log_variant(fig) -> None:  # as each variant ends: a killed bench keeps these
            mlflow.log_metrics(fig.metrics())
            mlflow.set_tag(f"{metric_prefix(fig.label)}_settings", fig.settings)
            if fig.error:
                mlflow.set_tag(f"{metric_prefix(fig.label)}_error", fig.error[:4000])

        report = run_train_bench(setup, peak_tflops=card_peak_tflops(card_name()), on_variant=log_variant)
        mlflow.set_tag("card", report.card)
        mlflow.log_metrics(report.metrics())
        table = report.table()
        mlflow.log_text(table + "\n", "bench_train.txt")
        print(table)
        print(f"(MLflow run {run.info.run_id})")
        return report


def plan(recipe: Recipe, rows: int = ROWS_KAGGLE_TEST, gpu: str = "T4", count: int = 2, model: str = ""):
    """Predict whether the recipe fits `count` x `gpu` and how long `rows` rows take (see plan.py)."""
    return plan_stage(recipe, rows=rows, gpu=gpu, count=count, model=model)
