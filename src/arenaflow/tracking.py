"""MLflow tracking shared by every stage: store location, one run per stage, params, tags, datasets."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .data import TEXT_COLUMNS
from .models import compressed_weights, read_config
from .recipe import Recipe, flatten
from .registry import setup_tracking

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def precision_of(recipe: Recipe, stage: str) -> str:
    """What precision a stage's model runs in, for run names and tags."""
    if stage == "finetune":
        return "nf4-qlora" if recipe.train.load_in_4bit else "lora"
    if stage in ("quantize", "evaluate", "infer", "promote"):
        return recipe.quant.scheme.lower() if recipe.quant.scheme != "none" else recipe.engine.dtype
    return "-"


def checkpoint_precision(checkpoint: Path, engine_dtype: str) -> str:
    """`W4A16` / `W8A16` for a compressed-tensors checkpoint, else the dtype it runs in."""
    config = read_config(checkpoint)
    bits = sorted({w.get("num_bits") for w in compressed_weights(config)} - {None})
    if bits:
        return "/".join(f"W{b}A16" for b in bits)
    return engine_dtype if engine_dtype != "auto" else str(config.get("dtype") or config.get("torch_dtype") or "auto")


def model_short_name(reference: str) -> str:
    """`models:/arenaflow/3` -> `arenaflow-v3`; `gguf:smollm2-135m-instruct` -> `smollm2-135m-instruct`."""
    if reference.startswith("models:/"):
        return reference.removeprefix("models:/").replace("/", "-v")
    return reference.removeprefix("gguf:").removeprefix("tiny:").rstrip("/").split("/")[-1]


@contextmanager
def stage_run(recipe: Recipe, stage: str, model: str | None = None, precision: str | None = None):
    """Open (or join, under `mlflow run`) the run of one stage, with params and comparable tags.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) in the experiment `mlflow run` chose;
    run directly, each recipe gets its own experiment named after it.
    """
    import mlflow

    setup_tracking()
    model = model or recipe.model.base
    precision = precision or precision_of(recipe, stage)
    if not os.environ.get("MLFLOW_RUN_ID"):  # (set_experiment itself exports MLFLOW_EXPERIMENT_ID)
        mlflow.set_experiment(recipe.name)
    run_name = f"{stage} {model_short_name(model)} {recipe.name} {precision}"
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({
            "stage": stage, "recipe": recipe.name, "base_model": recipe.model.base, "model": model,
            "precision": precision, "quantization": recipe.quant.scheme, "git_commit": git_commit(),
        })
        mlflow.set_tag("mlflow.runName", run_name)  # also renames a run that `mlflow run` created
        mlflow.log_params(flatten(recipe))
        if recipe.path:
            mlflow.log_artifact(recipe.path, "recipe")
        yield run


def log_rows_dataset(rows: pd.DataFrame, source: str | Path, name: str, context: str) -> str:
    """Log rows as an MLflow dataset input; returns its digest (covers every column, turns included)."""
    import mlflow

    flat = rows.copy()
    for column in TEXT_COLUMNS:
        flat[column] = [json.dumps(list(v), ensure_ascii=False) for v in rows[column]]
    targets = "label" if (rows["label"] >= 0).any() else None
    source = str(source)
    if source.startswith("runs:/"):  # MLflow datasets know no runs:/ source: name the artifact location
        from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

        source = RunsArtifactRepository.get_underlying_uri(source)
    dataset = mlflow.data.from_pandas(flat, source=source, name=name, targets=targets)
    mlflow.log_input(dataset, context=context)
    return dataset.digest


def fetch_artifacts(uri: str | Path) -> Path:
    """A local path, or an MLflow artifact URI (`runs:/…`, `models:/…`) downloaded to a local path."""
    import mlflow

    local = Path(str(uri)).expanduser()
    if local.exists():
        return local
    if "://" not in str(uri) and not str(uri).startswith(("runs:/", "models:/")):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))
