"""MLflow tracking shared by every stage: store location, one run per stage, params, tags."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ..hardware import GpuMemoryPeak
from ..models import compressed_weights, model_short_name, read_config
from ..recipe import Recipe, flatten
from ..scoring import ENGINE_FALLBACKS


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<cwd>/mlflow.db` (absolute, so a chdir can't move it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def setup_tracking() -> str:
    """Point MLflow tracking and the model registry at `tracking_uri()`; return that URI."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stage_precision(recipe: Recipe, stage: str) -> str:
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


@contextmanager
def stage_run(recipe: Recipe, stage: str, model: str | None = None, precision: str | None = None):
    """Open (or join, under `mlflow run`) the run of one stage, with params and comparable tags; on
    success it logs the stage's wall time (`stage_seconds`) and, on GPUs, `peak_gpu_memory_gib`; an
    engine fallback of its scoring is tagged (`engine_fallback`).

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) in the experiment `mlflow run` chose;
    run directly, each recipe gets its own experiment named after it.
    """
    import mlflow

    setup_tracking()
    model = model or recipe.model.base
    precision = precision or stage_precision(recipe, stage)
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
        start, fallbacks = time.perf_counter(), len(ENGINE_FALLBACKS)
        try:
            with GpuMemoryPeak() as memory:
                yield run
        finally:
            if len(ENGINE_FALLBACKS) > fallbacks:  # scoring.engine_for took the transformers engine instead
                mlflow.set_tag("engine_fallback", "; ".join(dict.fromkeys(ENGINE_FALLBACKS[fallbacks:])))
        mlflow.log_metric("stage_seconds", time.perf_counter() - start)  # wall time of the stage's work
        if memory.peak_gib is not None:
            mlflow.log_metric("peak_gpu_memory_gib", memory.peak_gib)


def log_to_run(metrics: dict, step: int) -> None:
    """The loss curve and validation figures, as training reports them, into the active MLflow run."""
    import mlflow

    mlflow.log_metrics(metrics, step=step)
