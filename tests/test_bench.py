"""arenaflow bench on CPU: every engine in one table, probabilities agree, MFU computed (no timing asserts)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from arenaflow.bench import (
    DEFAULT_ENGINES, BenchError, bench_stage, choose_precision, engine_config, pack_rtn_checkpoint,
    parse_engine_spec, synthetic_lengths, synthetic_prompts,
)
from arenaflow.recipe import EngineConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_engine_specs():
    spec = parse_engine_spec("tuned=vllm:max_num_batched_tokens=32768:enable_prefix_caching=false")
    assert (spec.label, spec.backend) == ("tuned", "vllm")
    engine = engine_config(EngineConfig(), spec)
    assert engine.max_num_batched_tokens == 32768 and engine.enable_prefix_caching is False
    assert parse_engine_spec("w4=vllm:model=/ckpt").model == "/ckpt"
    assert parse_engine_spec("transformers-naive").label == "transformers-naive"
    with pytest.raises(BenchError):
        parse_engine_spec("nosuch")
    with pytest.raises(BenchError):
        engine_config(EngineConfig(), parse_engine_spec("vllm:no_such_field=1"))


def test_synthetic_prompts_and_precision_choice():
    n, lo, hi = synthetic_lengths("20:600-1400")
    prompts = synthetic_prompts(n, lo, hi, vocab=49152, suffix=[7, 8, 9])
    assert len(prompts) == 20 and all(lo <= len(p) <= hi and p[-3:] == [7, 8, 9] for p in prompts)
    figures = {"bf16": (40.0, 1.000), "fp8": (60.0, 1.004), "w4a16": (70.0, 1.020)}
    assert choose_precision(figures, "bf16") == "fp8"  # w4a16 is fastest but loses 0.02 log-loss


def test_pack_rtn_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    out = pack_rtn_checkpoint(tiny_checkpoint, tmp_path / "w8", bits=8, group_size=64)
    packed = load_file(str(next(out.glob("*.safetensors"))))
    ref = load_file(str(tiny_checkpoint / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    rows, cols = packed[name + ".weight_shape"].tolist()
    p = packed[name + ".weight_packed"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(p >> (8 * i)) & 0xFF for i in range(4)], -1).reshape(rows, cols) - 128
    deq = (q.float().reshape(rows, -1, 64) * packed[name + ".weight_scale"].float()[..., None]).reshape(rows, cols)
    w = ref[name + ".weight"].float()
    assert (deq - w).norm() / w.norm() < 0.01


def test_bench_all_engines_on_cpu(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    recipe = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml",
                         ["engine.dtype=float32", "engine.cpu_kv_cache_gib=0.25", "engine.enforce_eager=true"])
    report = bench_stage(recipe, model=str(tiny_checkpoint), synthetic="12:40-200", warmup=2)
    labels = [e.label for e in report.engines]
    assert labels == list(DEFAULT_ENGINES)
    for e in report.engines:
        assert not e.error, e.error
        assert e.samples_per_s > 0 and e.tokens_per_s > 0 and e.startup_seconds > 0
        assert math.isfinite(e.mfu_matmul) and e.mfu_matmul > 0 and e.gpus == 0  # 0: the CPU
        assert e.max_prob_diff < 1e-4  # float32, same weights: the engines agree
    assert report.matmul_tflops > 0 and report.peak_tflops is None  # a CPU has no datasheet rate here
    assert report.matmul_burst_tflops == report.matmul_tflops  # one measurement on CPU
    table = report.table()
    assert all(label in table for label in labels) and "MFU" in table
    import mlflow

    run = mlflow.search_runs(experiment_names=[recipe.name], output_format="list")[0]
    assert {f"{p.replace('-', '_')}_samples_per_s" for p in labels} <= set(run.data.metrics)
    assert np.isfinite(run.data.metrics["transformers_naive_tokens_per_s"])
