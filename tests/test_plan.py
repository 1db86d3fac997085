"""arenaflow plan: the seed's 34B recipe fits 2x T4 and scores 25k rows in < 9 h; 70B fp16 does not fit a T4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arenaflow.plan import ARCHITECTURES, EFFICIENCY, PlanError, gpu_spec, make_plan, model_dims, plan
from arenaflow.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_kaggle_34b_recipe_fits_two_t4_and_finishes_in_9_hours():
    recipe = load_recipe(ROOT / "experiments" / "kaggle-2xt4-34b.yaml")
    p = plan(recipe, rows=25_000, gpu="T4", count=2)  # lengths: bundled data through the prompt builder
    assert p.tp == 2 and p.fits, p.table()
    assert p.memory_gib["total"] < 15.0
    assert p.hours < 9.0, p.table()
    assert 0.3 < p.seconds_per_row < 1.3  # the seed's published ~1.3 s/row is the upper end
    assert p.mean_tokens <= 1024


def test_70b_fp16_does_not_fit_one_t4():
    p = make_plan(ARCHITECTURES["llama-3-70b"], [1000] * 10, gpu=gpu_spec("T4"), count=1, weight_bits=16,
                  compute="fp16")
    assert not p.fits and p.memory_gib["weights"] > 100


def test_dims_gpus_and_parallelism_checks():
    dims, source = model_dims("01-ai/Yi-1.5-34B-Chat")
    assert source.startswith("table") and 33e9 < dims.params < 36e9
    assert 7.9e9 < model_dims("meta-llama/Meta-Llama-3-8B")[0].params < 8.1e9
    assert 130e6 < model_dims("gguf:smollm2-135m-instruct")[0].params < 140e6
    assert gpu_spec("NVIDIA H100 80GB HBM3").name == "H100" and gpu_spec("NVIDIA H200").name == "H200"
    with pytest.raises(PlanError):
        make_plan(dims, [100], gpu=gpu_spec("T4"), count=1, tp=2)
    assert 0 < EFFICIENCY <= 1


def test_bigger_batches_and_more_gpus_are_faster():
    dims = ARCHITECTURES["llama-3-8b"]
    lengths = np.full(100, 1000)
    one = make_plan(dims, lengths, gpu=gpu_spec("H100"), count=1)
    two = make_plan(dims, lengths, gpu=gpu_spec("H100"), count=2, dp=2)
    assert two.seconds_per_row == pytest.approx(one.seconds_per_row / 2)
    assert one.bound == "compute"
