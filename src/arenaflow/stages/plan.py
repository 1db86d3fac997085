"""`arenaflow plan`: memory fit and wall time of every stage of a recipe on N GPUs (no MLflow run)."""

from __future__ import annotations

from ..metrics import ROWS_KAGGLE_TEST
from ..plan import plan_stage
from ..recipe import Recipe
from .registry import local_reference


def run(recipe: Recipe, rows: int = ROWS_KAGGLE_TEST, gpu: str = "T4", count: int = 2, model: str = ""):
    """Predict whether the recipe fits `count` x `gpu` and how long `rows` rows take (see plan.py)."""
    return plan_stage(recipe, rows=rows, gpu=gpu, count=count, model=local_reference(model or recipe.model.base, recipe))
