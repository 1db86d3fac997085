"""Rows in and out of MLflow: a datagen output or a model artifact by URI, the recipe's split or a datagen
output's, evaluate's rows, and rows logged as an MLflow dataset input of the active run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..data import TEXT_COLUMNS, DataError, read_prepared, recipe_split, subsample
from ..recipe import Recipe


def fetch_artifacts(uri: str | Path) -> Path:
    """A local path, or an MLflow artifact URI (`runs:/…`, `models:/…`) downloaded to a local path."""
    local = Path(str(uri)).expanduser()
    if local.exists():
        return local
    if "://" not in str(uri) and not str(uri).startswith(("runs:/", "models:/")):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))


def load_split(data_uri: str, recipe: Recipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) from a datagen output (`runs:/<id>/data` or a folder), or split from the recipe."""
    if not data_uri:
        prepared = recipe_split(recipe)
        return prepared.train, prepared.valid
    folder = fetch_artifacts(data_uri)
    return read_prepared(folder / "train.parquet"), read_prepared(folder / "valid.parquet")


def evaluation_rows(recipe: Recipe, input: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows for the length baseline, labelled rows to score) for evaluate's `input`: the recipe's
    valid split (no input, or a datagen output), capped at `train.max_valid_rows`; or every row of a file."""
    if input and not input.startswith("runs:/") and not Path(input).is_dir():
        train, rows = recipe_split(recipe).train, read_prepared(input)  # a user's file: every row, no cap
    else:
        train, valid = load_split(input, recipe)
        rows = subsample(valid, recipe.train.max_valid_rows, recipe.data.seed)
    if (rows["label"] < 0).any():
        raise DataError(f"{input or 'valid split'}: evaluate needs labelled rows (winner_* columns)")
    return train, rows


def log_rows_dataset(rows: pd.DataFrame, source: str | Path, name: str, context: str):
    """Log rows as an MLflow dataset input of the active run; returns the MLflow dataset (its digest
    covers every column, turns included; metrics measured on it can name it)."""
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
    return dataset
