"""One model-reference resolver for every stage: a registered version is a base finetune starts from."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from conftest import RECIPE, TINY

from arenaflow.stages import finetune, registry
from arenaflow.stages.datasets import fetch_artifacts
from arenaflow.models import dense_checkpoint, read_config
from arenaflow.quantize import quantize_checkpoint
from arenaflow.recipe import QuantConfig, load_recipe


def test_a_quantized_checkpoint_is_dequantized_into_a_plain_one(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    assert dense_checkpoint(tiny_checkpoint) == tiny_checkpoint  # a plain checkpoint is its own base
    quantized = quantize_checkpoint(tiny_checkpoint, tmp_path / "w4", QuantConfig(scheme="W4A16", method="rtn",
                                                                                  group_size=32))
    dense = dense_checkpoint(quantized)
    assert "quantization_config" not in read_config(dense) and dense_checkpoint(quantized) == dense  # cached
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert set(original.state_dict()) == set(loaded.state_dict())
    weight = "model.layers.1.mlp.down_proj.weight"
    gap = (original.state_dict()[weight] - loaded.state_dict()[weight]).abs()
    # int4 rounding with one scale per 32 weights: within half a step, and not the identity
    step = original.state_dict()[weight].abs().reshape(-1, 32).amax(dim=1).max() / 7
    assert 0 < gap.max() <= step / 2 + 1e-6


@pytest.mark.parametrize("reference", ["models:/arenaflow@champion", "models:/arenaflow/{version}"])
def test_finetune_starts_from_a_registered_version(champion, reference):
    ref = reference.format(version=champion)
    recipe = load_recipe(RECIPE, TINY + [f"model.base={ref}", "train.max_train_rows=4", "train.batch_size=2",
                                         "train.gradient_accumulation_steps=1", "train.load_in_4bit=false"])
    base = registry.training_base(recipe)
    assert base.parent.name == "artifacts" and "/models/m-" in str(base)  # the version's MLflow Model checkpoint
    run = MlflowClient().get_run(finetune.run(recipe))
    trained = json.loads((fetch_artifacts(f"runs:/{run.info.run_id}/adapter") / "arenaflow_train.json").read_text())
    assert trained["base_checkpoint"] == str(base) and run.data.metrics["rows_trained"] == 4
