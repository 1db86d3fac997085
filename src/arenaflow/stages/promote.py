"""`arenaflow promote`: move the champion alias when the candidate's log_loss is lower on the same dataset."""

from __future__ import annotations

import mlflow

from ..recipe import Recipe
from . import registry
from .runs import stage_run


def run(recipe: Recipe, version: str = "latest"):
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
