"""The stages behind the CLI verbs: each opens its MLflow run, calls the stage's module, logs results."""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import data as data_mod
from .recipe import Recipe
from .tracking import log_rows_dataset, stage_run


def datagen(recipe: Recipe, input: str = "") -> str:
    """Ingest -> (max_rows) -> grouped split -> swap-augment train -> parquet + MLflow datasets.

    Returns the run id; its artifacts `data/train.parquet` and `data/valid.parquet` feed finetune.
    """
    import mlflow

    files = [input] if input else recipe.data.files
    with stage_run(recipe, "datagen") as run:
        prepared = data_mod.prepare(files, recipe.data.valid_fraction, recipe.data.seed,
                                    recipe.data.swap_augment, recipe.data.max_rows, recipe.data.group_column)
        mlflow.log_metrics({k: float(v) for k, v in prepared.counts.items()})
        mlflow.log_metrics({f"valid_{k}": v for k, v in data_mod.label_distribution(prepared.valid).items()})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "data"
            for split, rows, context in (("train", prepared.train, "training"), ("valid", prepared.valid, "validation")):
                path = data_mod.write_parquet(rows, out / f"{split}.parquet")
                digest = log_rows_dataset(rows, source=",".join(map(str, files)), name=f"{recipe.name}-{split}",
                                          context=context)
                mlflow.set_tag(f"{split}_digest", digest)
            mlflow.log_artifacts(str(out), "data")
        counts = ", ".join(f"{k}={v}" for k, v in prepared.counts.items())
        print(f"datagen: {counts}; artifacts at runs:/{run.info.run_id}/data")
        return run.info.run_id
