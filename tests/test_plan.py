"""arenaflow plan: the seed's 34B recipe fits 2x T4 and scores 25k rows in < 9 h; 70B fp16 does not fit a T4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arenaflow.plan import ARCHITECTURES, EFFICIENCY, PlanError, gpu_spec, make_plan, model_dims, plan
from arenaflow.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_kaggle_34b_recipe_fits_two_t4():
    recipe = load_recipe(ROOT / "experiments" / "kaggle-2xt4-34b.yaml")
    p = plan(recipe, rows=25_000, gpu="T4", count=2)  # lengths: bundled data through the prompt builder
    assert p.tp == 2 and p.fits, p.table()
    assert p.memory_gib["total"] < 15.0
    assert p.mean_tokens <= 1024


# Measured with `arenaflow bench` on random:llama-3-8b, vLLM bf16, prompts of 600-1400 tokens (BENCHMARKS.md,
# session 2: runs C and B); EFFICIENCY was calibrated on another figure (42.5 samples/s), not on these.
@pytest.mark.parametrize("count, tp, dp, measured", [(1, 1, 1, 42.04), (2, 2, 1, 70.81), (2, 1, 2, 82.66)])
def test_plan_predicts_the_measured_h200_speed_within_15_percent(count, tp, dp, measured):
    p = make_plan(ARCHITECTURES["llama-3-8b"], np.full(1000, 1000), gpu=gpu_spec("H200"), count=count, tp=tp, dp=dp,
                  rows=1000)
    assert abs(1 / p.seconds_per_row / measured - 1) < 0.15, p.table()


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


def _checkpoint(tmp_path: Path, quantization: dict | None = None) -> Path:
    """A config.json with Llama-3-8B dims (what engine_plan reads), optionally compressed-tensors."""
    import json

    config = {**ARCHITECTURES["llama-3-8b"].to_config(), "hidden_size": 4096, "model_type": "llama"}
    if quantization:
        config["quantization_config"] = quantization
    folder = tmp_path / ("q" if quantization else "bf16")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_engine_plan_follows_the_checkpoint_precision_and_parallelism(tmp_path):
    from arenaflow.plan import PRECISION_FACTOR, engine_plan
    from arenaflow.recipe import EngineConfig

    w4 = {"config_groups": {"g": {"weights": {"num_bits": 4, "group_size": 128}}}}
    bf16, quant = _checkpoint(tmp_path), _checkpoint(tmp_path, w4)
    engine, lengths = EngineConfig(dtype="bfloat16"), np.full(100, 1000)
    one = engine_plan(bf16, engine, lengths, "NVIDIA H200", 1)
    assert one.precision == "bf16" and one.bound == "compute"
    w4a16 = engine_plan(quant, engine, lengths, "NVIDIA H200", 1)
    assert w4a16.precision == "W4A16"
    assert w4a16.seconds_per_row == pytest.approx(one.seconds_per_row / PRECISION_FACTOR["W4A16"])
    fp8 = engine_plan(bf16, EngineConfig(dtype="bfloat16", quantization="fp8"), lengths, "NVIDIA H200", 1)
    assert fp8.seconds_per_row < one.seconds_per_row
    dp2 = engine_plan(bf16, EngineConfig(dtype="bfloat16", data_parallel_size=2), lengths, "NVIDIA H200", 2)
    assert dp2.seconds_per_row == pytest.approx(one.seconds_per_row / 2)
    # No plan for a CPU, a card outside the table, or a non-vLLM engine (the efficiency is vLLM's).
    assert engine_plan(bf16, engine, lengths, "CPU x86_64 (2 threads)", 0) is None
    assert engine_plan(bf16, engine, lengths, "Some Other GPU", 1) is None
    assert engine_plan(bf16, EngineConfig(backend="transformers"), lengths, "NVIDIA H200", 1) is None


def test_infer_speed_figures_get_the_plan_next_to_them_on_a_gpu(tmp_path, monkeypatch):
    from arenaflow import plan as plan_mod
    from arenaflow.recipe import EngineConfig

    checkpoint, engine = _checkpoint(tmp_path), EngineConfig(dtype="bfloat16")
    monkeypatch.setattr(plan_mod, "card_name", lambda: "CPU x86_64 (2 threads)")
    monkeypatch.setattr(plan_mod, "gpu_count", lambda: 0)
    assert plan_mod.planned_speed(checkpoint, engine, prompts=20, tokens=20_000, rows=10) == {}  # a CPU host
    monkeypatch.setattr(plan_mod, "card_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(plan_mod, "gpu_count", lambda: 1)
    with_tta = plan_mod.planned_speed(checkpoint, engine, prompts=20, tokens=20_000, rows=10)
    without = plan_mod.planned_speed(checkpoint, engine, prompts=10, tokens=10_000, rows=10)
    assert 0 < with_tta["plan_samples_per_s"] == pytest.approx(without["plan_samples_per_s"] / 2, rel=1e-6)
    assert with_tta["plan_projected_hours_25k_rows"] > 0
