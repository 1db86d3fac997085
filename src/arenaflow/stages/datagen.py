"""`arenaflow datagen`: every mode of `generate.modes` (datagen/dataset.py) in one MLflow run: counts, datasets,
the train/valid parquet artifacts (what finetune reads) and generated samples."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow

from ..datagen.dataset import GeneratedDataset, build_dataset, dataset_metrics, write_outputs
from ..datagen.label import Teacher, teacher_from
from ..recipe import Recipe
from . import registry
from .datasets import log_rows_dataset
from .runs import setup_tracking, stage_run, tracking_uri


def run(recipe: Recipe, input: str = "", prompts_file: str = "") -> str:
    """Ingest -> (generate) -> grouped split -> swap-augment train -> parquet + MLflow datasets, one path for
    every `generate.modes` (datagen/dataset.build_dataset). Returns the run id; its artifacts
    `data/train.parquet` and `data/valid.parquet` feed finetune."""
    files = [input] if input else recipe.data.files
    if prompts_file:
        recipe = dataclasses.replace(recipe, generate=dataclasses.replace(recipe.generate, prompts_file=prompts_file))
    with stage_run(recipe, "datagen") as run:
        generate_dataset(recipe, files)
        print(f"datagen: artifacts at runs:/{run.info.run_id}/data")
        return run.info.run_id


def resolve_teacher(recipe: Recipe) -> Teacher:
    """`generate.teacher`; when it is `models:/name@alias` and that alias is not registered (no champion
    yet), `generate.teacher_fallback` instead, with the reason kept. Any other failure is an error."""
    g = recipe.generate
    setup_tracking()
    reason = None
    uri = g.teacher
    if uri.startswith("models:/") and g.teacher_fallback:
        name, alias, _ = registry.parse_models_uri(uri)
        if alias and registry.alias_version(name, alias) is None:
            reason = f"{name}@{alias} is not registered (registry {tracking_uri()})"
            uri = g.teacher_fallback
    return teacher_from(registry.resolve_model_ref(uri, recipe), g.teacher, reason)


def log_dataset(dataset: GeneratedDataset, recipe: Recipe) -> dict[str, float]:
    """Into the active MLflow run: metrics, teacher tags, dataset inputs with digests, artifacts
    `data/{train,valid,generated}.parquet` and `samples/samples.{jsonl,html}`."""
    metrics = dataset_metrics(dataset)
    mlflow.log_metrics(metrics)
    source = ",".join(dataset.files + ([recipe.generate.prompts_file] if recipe.generate.prompts_file else []))
    tags = {"generate_modes": ",".join(recipe.generate.modes)}
    if dataset.teacher:
        tags.update(teacher=dataset.teacher.uri, teacher_requested=dataset.teacher.requested,
                    teacher_version=dataset.teacher.version or "",
                    teacher_fallback_reason=dataset.teacher.fallback_reason or "")
    for split, rows, context in (("train", dataset.train, "training"), ("valid", dataset.valid, "validation"),
                                 ("generated", dataset.generated, "generated")):
        if len(rows):
            tags[f"{split}_digest"] = log_rows_dataset(rows, source=source or "generated",
                                                       name=f"{recipe.name}-{split}", context=context).digest
    mlflow.set_tags(tags)
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(dataset, Path(tmp), recipe.generate.sample_rows)
        mlflow.log_artifacts(str(Path(tmp) / "data"), "data")
        if (Path(tmp) / "samples").exists():
            mlflow.log_artifacts(str(Path(tmp) / "samples"), "samples")
    return metrics


def generate_dataset(recipe: Recipe, files: Sequence[str | Path] | None = None, *,
                     engines: Mapping[str | Path, object] | None = None, progress: bool = True) -> GeneratedDataset:
    """`build_dataset` (the teacher from the registry) then `log_dataset` into the active MLflow run."""
    dataset = build_dataset(recipe, files, engines=engines, progress=progress, teacher_of=resolve_teacher,
                            resolve=lambda reference: registry.resolve_model_ref(reference, recipe))
    metrics = log_dataset(dataset, recipe)
    if dataset.teacher:
        used = dataset.teacher.uri + (f" v{dataset.teacher.version}" if dataset.teacher.version else "")
        why = f" (fallback: {dataset.teacher.fallback_reason})" if dataset.teacher.fallback_reason else ""
        print(f"datagen: teacher {used}{why}")
    shown = ("rows_train", "rows_valid", "prompts_used", "responses_generated", "responses_resumed", "pairs",
             "rows_generated", "rows_hard_labelled", "rows_train_augmented", "samples_per_s", "generated_tokens_per_s")
    print("datagen: " + ", ".join(f"{k}={metrics[k]:g}" for k in shown if k in metrics))
    return dataset
