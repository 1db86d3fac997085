"""The stages behind the CLI verbs: each opens its MLflow run, calls the stage's module, logs results."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import data as data_mod
from .recipe import Recipe
from .data import subsample
from .tracking import checkpoint_precision, fetch_artifacts, log_rows_dataset, stage_run

ROWS_KAGGLE_TEST = 25_000  # the competition's hidden test set: projected times are for this many rows


def datagen(recipe: Recipe, input: str = "", prompts_file: str = "") -> str:
    """Ingest -> (max_rows) -> grouped split -> swap-augment train -> parquet + MLflow datasets.
    With `generate.modes` beyond ingest (respond, label, dedup, filter): datagen_llm.generate_dataset.

    Returns the run id; its artifacts `data/train.parquet` and `data/valid.parquet` feed finetune.
    """
    import mlflow

    files = [input] if input else recipe.data.files
    if prompts_file:
        recipe = dataclasses.replace(recipe, generate=dataclasses.replace(recipe.generate, prompts_file=prompts_file))
    with stage_run(recipe, "datagen") as run:
        if set(recipe.generate.modes) != {"ingest"}:
            from .datagen_llm import generate_dataset

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
                digest = log_rows_dataset(rows, source=",".join(map(str, files)), name=f"{recipe.name}-{split}",
                                          context=context)
                mlflow.set_tag(f"{split}_digest", digest)
            mlflow.log_artifacts(str(out), "data")
        counts = ", ".join(f"{k}={v}" for k, v in prepared.counts.items())
        print(f"datagen: {counts}; artifacts at runs:/{run.info.run_id}/data")
        return run.info.run_id


# ---------------------------------------------------------------------------------------------
# Shared by the stages that score: model references, rows, prompts, probabilities.

@dataclass
class ModelRef:
    checkpoint: Path
    uri: str
    registered_name: str | None = None
    version: str | None = None


def resolve_model_ref(reference: str, recipe: Recipe) -> ModelRef:
    """'' -> the recipe's champion; models:/ and runs:/ URIs via the registry; else models.resolve_model."""
    from . import registry
    from .models import resolve_model

    uri = reference or f"models:/{recipe.registry.model_name}@{recipe.registry.alias}"
    if uri.startswith("models:/"):
        name, alias, version = registry.parse_models_uri(uri)
        version = registry.alias_version(name, alias) if alias else version
        checkpoint = registry.resolve_model_uri(f"models:/{name}/{version}" if version else uri)
        return ModelRef(checkpoint, uri, name, version)
    if uri.startswith("runs:/"):
        return ModelRef(registry.resolve_model_uri(uri), uri)
    return ModelRef(resolve_model(uri), uri)


def recipe_split(recipe: Recipe, files: list[str] | None = None) -> data_mod.Prepared:
    """The recipe's grouped train/valid split of `files` (default: the recipe's data.files)."""
    d = recipe.data
    return data_mod.prepare(files or d.files, d.valid_fraction, d.seed, d.swap_augment, d.max_rows, d.group_column)


def load_split(data_uri: str, recipe: Recipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) from a datagen output (`runs:/<id>/data` or a folder), or split from the recipe."""
    if not data_uri:
        prepared = recipe_split(recipe)
        return prepared.train, prepared.valid
    folder = fetch_artifacts(data_uri)
    return data_mod.read_prepared(folder / "train.parquet"), data_mod.read_prepared(folder / "valid.parquet")


def predict(scorer, builder, rows: pd.DataFrame, swap_tta: bool, progress: bool = True):
    """N x 3 probabilities for canonical rows (A/B-swap test-time augmentation if asked) + timings."""
    from .scoring import ScoreResult, swap_average

    prompts = builder.build_rows(rows)
    if not swap_tta:
        return scorer.score(prompts, progress=progress)
    # One call for both orders: the engine batches them together and shares the prompt prefix.
    both = scorer.score(prompts + builder.build_rows(rows, swap=True), progress=progress)
    n = len(prompts)
    return ScoreResult(swap_average(both.probs[:n], both.probs[n:]), both.seconds, both.startup_seconds,
                       both.prompt_tokens, probs_one_order=both.probs[:n])


def open_scorer(checkpoint: Path, recipe: Recipe):
    """The recipe's engine on a checkpoint; its tokenizer's prompt builder.

    A quantized checkpoint that vLLM's CPU backend cannot run here is scored by the transformers
    reference engine instead, said on stdout and tagged on the active run (`engine_fallback`).
    """
    import mlflow

    from .models import load_tokenizer
    from .prompts import PromptBuilder
    from .scoring import Scorer, vllm_cannot_run

    engine = recipe.engine
    reason = vllm_cannot_run(checkpoint) if engine.backend.startswith("vllm") else None
    if reason:
        print(f"scoring with the transformers engine instead of {engine.backend}: {reason}")
        engine = dataclasses.replace(engine, backend="transformers")
        if mlflow.active_run():
            mlflow.set_tag("engine_fallback", f"transformers: {reason}")
    builder = PromptBuilder(load_tokenizer(checkpoint, recipe.model.trust_remote_code), recipe.prompt)
    scorer = Scorer(checkpoint, engine, max_model_len=recipe.prompt.max_length + 8,
                    trust_remote_code=recipe.model.trust_remote_code)
    return scorer, builder


def speed_metrics(rows: int, seconds: float, tokens: float, startup_seconds: float) -> dict[str, float]:
    """Throughput figures under the same names in every run (engine start-up reported apart)."""
    return {"samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds, "wall_seconds": seconds,
            "startup_seconds": startup_seconds, "projected_hours_25k_rows": ROWS_KAGGLE_TEST * seconds / rows / 3600}


def planned_speed(checkpoint: Path, engine, prompts: int, tokens: float, rows: int) -> dict[str, float]:
    """What `arenaflow plan` predicts for this scoring run on this machine's GPUs (nothing on CPU), under
    the names the measurement has with a `plan_` prefix, so the MLflow UI shows them side by side."""
    import numpy as np

    from .bench import card_name, gpu_count
    from .plan import engine_plan

    planned = engine_plan(checkpoint, engine, np.full(prompts, tokens / prompts), card_name(), gpu_count())
    if planned is None:
        return {}
    figures = speed_metrics(rows, planned.seconds_per_row * prompts, tokens, startup_seconds=0.0)
    return {f"plan_{k}": figures[k] for k in ("samples_per_s", "projected_hours_25k_rows")}


def evaluation_rows(recipe: Recipe, input: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows for the length baseline, labelled rows to score) for evaluate's `input`."""
    if input.startswith("runs:/") or (input and Path(input).is_dir()):
        train, valid = load_split(input, recipe)
    else:
        prepared = recipe_split(recipe)
        train, valid = prepared.train, data_mod.read_prepared(input) if input else prepared.valid
    rows = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    if (rows["label"] < 0).any():
        raise data_mod.DataError(f"{input or 'valid split'}: evaluate needs labelled rows (winner_* columns)")
    return train, rows


def evaluate(recipe: Recipe, input: str = "", model: str = "") -> dict[str, float]:
    """Score labelled rows with a model; log log_loss & co, plots, predictions; tag a registry version."""
    import mlflow

    from . import registry
    from .metrics import preference_metrics, reference_log_losses, save_plots

    ref = resolve_model_ref(model, recipe)
    train, rows = evaluation_rows(recipe, input)
    labels = rows["label"].to_numpy()
    with stage_run(recipe, "evaluate", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        digest = log_rows_dataset(rows, source=input or "recipe valid split", name="eval", context="evaluation")
        scorer, builder = open_scorer(ref.checkpoint, recipe)
        with scorer:
            result = predict(scorer, builder, rows, recipe.engine.swap_tta)
        figures = preference_metrics(result.probs, labels)
        if result.probs_one_order is not None:  # what swap-TTA buys, on the same rows
            figures["log_loss_without_tta"] = preference_metrics(result.probs_one_order, labels)["log_loss"]
        figures.update(reference_log_losses(train, rows))
        figures["rows"] = float(len(rows))
        mlflow.log_metrics({**figures, **speed_metrics(len(rows), result.seconds, result.prompt_tokens,
                                                        result.startup_seconds)})
        mlflow.set_tags({"eval_dataset_digest": digest, "model_uri": ref.uri,
                         "model_version": ref.version or "", "swap_tta": str(recipe.engine.swap_tta)})
        with tempfile.TemporaryDirectory() as tmp:
            for plot in save_plots(result.probs, labels, Path(tmp)):
                mlflow.log_artifact(str(plot), "plots")
            predictions = rows[["id", "source", "label"]].assign(
                p_a=result.probs[:, 0], p_b=result.probs[:, 1], p_tie=result.probs[:, 2])
            predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "predictions.csv"))
        if ref.version:
            registry.tag_version_with_eval(ref.registered_name, ref.version, figures, digest)
        print(f"evaluate {ref.uri}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items())
              + f"; {result.samples_per_s:.2f} samples/s (run {run.info.run_id})")
        return figures


def promote(recipe: Recipe, version: str = "latest"):
    """Move the alias to `version` if its log_loss beats the champion's on the same evaluation data."""
    import mlflow

    from . import registry

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
    (`<output>.shards/`): a killed run started again with the same arguments scores only the missing
    shards and writes the identical file.
    """
    import json
    import shutil

    import mlflow
    import numpy as np
    from tqdm import tqdm

    ref = resolve_model_ref(model, recipe)
    rows = data_mod.read_prepared(fetch_artifacts(input))
    output_path = Path(output)
    shard_dir = output_path.with_name(output_path.name + ".shards")
    with stage_run(recipe, "infer", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        digest = log_rows_dataset(rows, source=input, name="infer-input", context="inference")
        manifest = {"input": str(input), "input_digest": digest, "rows": len(rows), "model": ref.uri,
                    "version": ref.version, "checkpoint": str(ref.checkpoint) if not ref.version else None,
                    "prompt": dataclasses.asdict(recipe.prompt), "engine": dataclasses.asdict(recipe.engine)}
        manifest_file = shard_dir / "manifest.json"
        if shard_dir.exists() and (not manifest_file.exists() or json.loads(manifest_file.read_text()) != manifest):
            shutil.rmtree(shard_dir)  # shards of another input, model or setting: never mix them in
        shard_dir.mkdir(parents=True, exist_ok=True)
        manifest_file.write_text(json.dumps(manifest, indent=1))
        size = recipe.engine.shard_rows
        shards = [shard_dir / f"shard_{k:05d}.npy" for k in range(-(-len(rows) // size))]
        todo = [k for k, path in enumerate(shards) if not path.exists()]
        seconds = tokens = startup = 0.0
        if todo:
            scorer, builder = open_scorer(ref.checkpoint, recipe)
            startup = scorer.startup_seconds
            with scorer:
                for k in tqdm(todo, desc="infer shards", unit="shard"):
                    result = predict(scorer, builder, rows.iloc[k * size:(k + 1) * size], recipe.engine.swap_tta,
                                     progress=False)
                    tmp = shards[k].with_suffix(".tmp.npy")
                    np.save(tmp, result.probs)
                    tmp.rename(shards[k])  # a shard exists only once complete
                    seconds += result.seconds
                    tokens += result.prompt_tokens
        probs = np.concatenate([np.load(path) for path in shards])
        assert len(probs) == len(rows), f"{len(probs)} predictions for {len(rows)} rows"
        submission = pd.DataFrame({"id": rows["id"], "winner_model_a": probs[:, 0],
                                   "winner_model_b": probs[:, 1], "winner_tie": probs[:, 2]})
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = output_path.with_name(output_path.name + ".tmp")
        submission.to_csv(tmp_out, index=False)
        tmp_out.rename(output_path)
        scored = sum(min(size, len(rows) - k * size) for k in todo)
        figures = {"rows": float(len(rows)), "rows_scored_this_run": float(scored),
                   "rows_resumed": float(len(rows) - scored)}
        if scored:
            figures.update(speed_metrics(scored, seconds, tokens, startup))
            prompts = scored * (2 if recipe.engine.swap_tta else 1)
            figures.update(planned_speed(ref.checkpoint, recipe.engine, prompts, tokens, scored))
        mlflow.log_metrics(figures)
        mlflow.set_tag("model_version", ref.version or "")
        mlflow.log_artifact(str(output_path))
        shutil.rmtree(shard_dir)
        print(f"infer: wrote {output_path} ({len(rows)} rows, {scored} scored now, "
              f"{len(rows) - scored} resumed) with {ref.uri} (run {run.info.run_id})")
        return output_path


def score_rows(checkpoint: Path, recipe: Recipe, rows: pd.DataFrame):
    """Probabilities for rows with a fresh engine, stopped afterwards (torch's thread count restored:
    an in-process vLLM engine lowers it, which would slow the training that follows)."""
    import torch

    threads = torch.get_num_threads()
    scorer, builder = open_scorer(checkpoint, recipe)
    try:
        with scorer:
            return predict(scorer, builder, rows, recipe.engine.swap_tta)
    finally:
        torch.set_num_threads(threads)


def finetune(recipe: Recipe, data: str = "") -> str:
    """QLoRA/LoRA on the answer token; logs the base model's zero-shot and the finetuned validation
    log_loss on the same rows, and the adapter under the run's `adapter/` artifacts."""
    import mlflow

    from .metrics import preference_metrics, reference_log_losses
    from .models import resolve_model
    from .train import check_config, finetune as train_adapter

    check_config(recipe.train)  # before scoring the base model, not after
    base = resolve_model(recipe.model.base)
    train, valid = load_split(data, recipe)
    valid = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    with stage_run(recipe, "finetune") as run:
        log_rows_dataset(train, source=data or "recipe split", name=f"{recipe.name}-train", context="training")
        digest = log_rows_dataset(valid, source=data or "recipe split", name=f"{recipe.name}-valid", context="validation")
        mlflow.set_tag("eval_dataset_digest", digest)
        # Zero-shot first, in its own engine: bitsandbytes must not see a forward before training. One A/B
        # order (no swap-TTA), like the finetuned figure it is compared with.
        one_order = dataclasses.replace(recipe, engine=dataclasses.replace(recipe.engine, swap_tta=False))
        zero_shot = preference_metrics(score_rows(base, one_order, valid).probs, valid["label"].to_numpy())
        mlflow.log_metrics({f"base_{k}": v for k, v in zero_shot.items()})
        references = reference_log_losses(train, valid)  # what the finetuned model must beat, same rows
        mlflow.log_metrics(references)
        with tempfile.TemporaryDirectory() as tmp:
            result = train_adapter(base, train, valid, recipe.prompt, recipe.train, Path(tmp),
                                   trust_remote_code=recipe.model.trust_remote_code)
            mlflow.log_artifacts(str(result.adapter_dir), "adapter")
        final = result.kept  # the saved adapter's validation: the last epoch's, or the best with keep_best_epoch
        mlflow.log_metrics({"train_loss": result.train_loss, "train_seconds": result.seconds,
                            "seconds_per_row": result.seconds_per_row, "rows_trained": result.rows_trained,
                            **({"log_loss": final["log_loss"], "kept_epoch": final["epoch"] or 0.0,
                                "log_loss_gain_over_base": zero_shot["log_loss"] - final["log_loss"]} if final else {})})
        print(f"finetune: base zero-shot log_loss={zero_shot['log_loss']:.4f}, finetuned "
              f"log_loss={final.get('log_loss', float('nan')):.4f} at epoch {final.get('epoch') or 0:.2f} (length baseline "
              f"{references['length_baseline_log_loss']:.4f}); adapter at runs:/{run.info.run_id}/adapter")
        return run.info.run_id


def quantize(recipe: Recipe, adapter: str, data: str = "") -> str:
    """Merge the adapter into a full-precision base, quantize (AWQ W4A16/W8A16), evaluate both on
    the same valid rows, register the quantized checkpoint as a new version. Returns the version."""
    import mlflow

    from . import registry
    from .metrics import preference_metrics
    from .models import load_tokenizer, resolve_model
    from .prompts import PromptBuilder
    from .quantize import check_config, checkpoint_size_bytes, merge_adapter, quantize_checkpoint

    check_config(recipe.quant)  # before merging, not after
    base = resolve_model(recipe.model.base)
    train, valid = load_split(data, recipe)
    valid = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    labels = valid["label"].to_numpy()
    with stage_run(recipe, "quantize") as run, tempfile.TemporaryDirectory() as tmp:
        digest = log_rows_dataset(valid, source=data or "recipe split", name=f"{recipe.name}-valid", context="validation")
        merged = merge_adapter(base, fetch_artifacts(adapter), Path(tmp) / "merged", recipe.quant.merge_dtype,
                               recipe.quant.merge_base)
        calibration_builder = PromptBuilder(load_tokenizer(merged),
                                            dataclasses.replace(recipe.prompt, max_length=recipe.quant.calibration_max_length))
        calibration = calibration_builder.build_rows(subsample(train, recipe.quant.calibration_rows, recipe.data.seed))
        quantized = quantize_checkpoint(merged, Path(tmp) / "quantized", recipe.quant, calibration)
        merged_figures = preference_metrics(score_rows(merged, recipe, valid).probs, labels)
        figures = preference_metrics(score_rows(quantized, recipe, valid).probs, labels)
        figures.update({f"merged_{k}": v for k, v in merged_figures.items()})
        figures["quant_log_loss_delta"] = figures["log_loss"] - merged_figures["log_loss"]
        figures["merged_size_mb"] = checkpoint_size_bytes(merged) / 2**20
        figures["quantized_size_mb"] = checkpoint_size_bytes(quantized) / 2**20
        mlflow.log_metrics(figures)
        version = registry.register_checkpoint(
            quantized, recipe.registry.model_name,
            tags={"quantization": recipe.quant.scheme, "quant_method": recipe.quant.method,
                  "group_size": str(recipe.quant.group_size), "base_model": recipe.model.base,
                  "recipe": recipe.name, "adapter": adapter},
            description=(f"{recipe.model.base} finetuned by recipe {recipe.name}, merged in "
                         f"{recipe.quant.merge_dtype}, quantized {recipe.quant.scheme} ({recipe.quant.method}). "
                         f"Valid log_loss {figures['log_loss']:.4f} (merged {merged_figures['log_loss']:.4f})."))
        registry.tag_version_with_eval(recipe.registry.model_name, version.version, figures, digest)
        mlflow.set_tag("registered_version", str(version.version))
        print(f"quantize: {recipe.quant.scheme} log_loss={figures['log_loss']:.4f} (merged "
              f"{merged_figures['log_loss']:.4f}, delta {figures['quant_log_loss_delta']:+.4f}); registered "
              f"{recipe.registry.model_name} v{version.version} (run {run.info.run_id})")
        return str(version.version)


# ---------------------------------------------------------------------------------------------
# main: every stage as a nested run (mlflow's multistep workflow pattern).

def project_root() -> Path:
    here = Path.cwd()
    return here if (here / "MLproject").exists() else Path(__file__).resolve().parents[2]


def _finished_run(entry_point: str, parameters: dict, git_commit: str, experiment_id: str):
    """A FINISHED run of this entry point with the same parameters and code version, if any."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
        order_by=["attributes.start_time DESC"])
    for run in runs:
        if (run.info.status == "FINISHED" and run.data.tags.get("mlflow.source.git.commit") == git_commit
                and all(run.data.params.get(k) == str(v) for k, v in parameters.items())):
            return run
    return None


def _step(entry_point: str, parameters: dict, git_commit: str, experiment_id: str):
    """Reuse a finished run with the same params and commit, else run the entry point as a child run."""
    import mlflow
    from mlflow import MlflowClient

    found = _finished_run(entry_point, parameters, git_commit, experiment_id)
    if found is not None:
        print(f"main: reusing {entry_point} run {found.info.run_id} (same parameters and commit)")
        mlflow.set_tag(f"step_{entry_point}", f"{found.info.run_id} (reused)")
        return found
    print(f"main: running {entry_point} {parameters}")
    submitted = mlflow.run(str(project_root()), entry_point=entry_point, parameters=parameters,
                           env_manager="local", experiment_id=experiment_id, synchronous=True)
    mlflow.set_tag(f"step_{entry_point}", submitted.run_id)
    return MlflowClient().get_run(submitted.run_id)


def main(recipe: Recipe, overrides: list[str] | None = None, infer_input: str = "data/sample_test.csv") -> None:
    """datagen -> finetune -> quantize -> evaluate -> promote -> infer, each a nested MLflow run."""
    import mlflow

    from .tracking import git_commit

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


def bench(recipe: Recipe, model: str = "", rows: int = 64, engines: str = "", synthetic: str = "", warmup: int = 8):
    """Time every scoring engine on one model and one prompt set (see bench.py); one MLflow run."""
    from .bench import bench_stage

    return bench_stage(recipe, model=model, rows=rows, engines=engines, synthetic=synthetic, warmup=warmup)


def plan(recipe: Recipe, rows: int = ROWS_KAGGLE_TEST, gpu: str = "T4", count: int = 2, model: str = ""):
    """Predict whether the recipe fits `count` x `gpu` and how long `rows` rows take (see plan.py)."""
    from .plan import plan_stage

    return plan_stage(recipe, rows=rows, gpu=gpu, count=count, model=model)
