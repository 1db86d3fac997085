"""arenaflow bench on CPU: every engine in one table, probabilities agree, MFU computed (no timing asserts)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from arenaflow.stages import bench as bench_stage
from arenaflow.bench import (
    DEFAULT_ENGINES, BenchError, engine_config,
    parse_engine_spec, synthetic_lengths, synthetic_prompts,
)
from arenaflow.hardware import gpu_count
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


def test_synthetic_prompts():
    n, lo, hi = synthetic_lengths("20:600-1400")
    prompts = synthetic_prompts(n, lo, hi, vocab=49152, suffix=[7, 8, 9])
    assert len(prompts) == 20 and all(lo <= len(p) <= hi and p[-3:] == [7, 8, 9] for p in prompts)
    assert len({tuple(p[:8]) for p in prompts}) == 20  # distinct prefixes: prefix caching cannot flatter
    with pytest.raises(BenchError, match="N:LO-HI"):
        synthetic_lengths("20:1400")


@pytest.mark.slow
def test_bench_all_engines_on_cpu(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    recipe = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml",
                         ["engine.dtype=float32", "engine.cpu_kv_cache_gib=0.25", "engine.enforce_eager=true"])
    report = bench_stage.run(recipe, model=str(tiny_checkpoint), synthetic="12:40-200", warmup=2)
    labels = [e.label for e in report.engines]
    assert labels == list(DEFAULT_ENGINES)
    for e in report.engines:
        assert not e.error, e.error
        # tokens/s over samples/s is the mean prompt length of the set every engine scored
        assert e.tokens_per_s / e.samples_per_s == pytest.approx(report.prompt_tokens / report.rows, rel=1e-9)
        assert math.isfinite(e.mfu_matmul) and e.mfu_matmul > 0 and e.gpus == gpu_count()
        assert e.max_prob_diff < 1e-4  # float32, same weights: the engines agree
    assert report.matmul_tflops > 0
    if gpu_count() == 0:
        assert report.peak_tflops is None  # a CPU has no datasheet rate
    table = report.table()
    assert all(label in table for label in labels) and "MFU" in table
    import mlflow

    run = mlflow.search_runs(experiment_names=[recipe.name], output_format="list")[0]
    assert {f"{p.replace('-', '_')}_samples_per_s" for p in labels} <= set(run.data.metrics)
    assert np.isfinite(run.data.metrics["transformers_naive_tokens_per_s"])
