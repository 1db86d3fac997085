"""Scoring on Ray (`engine.executor: ray`, scoring/ray_actors.py) on a local Ray instance with 2 CPU actors:
the same probabilities as the in-process engine, every row once and in input order, a dead actor
replaced and its batch retried, a run that cannot go on stopped with a clear error, infer resumable.

The vLLM parity test runs vLLM inside the actors; the others use the transformers engine inside them
(the same Scorer code path, a few seconds per actor start instead of ~15 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PANDALM, RECIPE, TINY, VLLM_TEST_ENGINE

from arenaflow.scoring.engines import ScoringError
from arenaflow.data import load_rows
from arenaflow.models import load_tokenizer
from arenaflow.prompts import PromptBuilder
from arenaflow.scoring.ray_actors import RETRIES, RayScorer, RowGather, actor_plan
from arenaflow.recipe import EngineConfig, PromptConfig, RecipeError, load_recipe
from arenaflow.scoring import Scorer, ShardPredictor, predict
from arenaflow.shards import run_shards

TOL = 1e-5
TRANSFORMERS = EngineConfig(backend="transformers", dtype="float32", max_model_len=1024)


def on_ray(engine: EngineConfig, **kw) -> EngineConfig:
    return dataclasses.replace(engine, **{"executor": "ray", "ray_actors": 2, **kw})


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (RAY_ADDRESS unset), shut down after this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        from arenaflow.scoring.ray_actors import connect

        ray = connect()
        assert ray.cluster_resources().get("CPU", 0) >= 2
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(100, 40000, size=n).tolist() for n in rng.permutation(np.linspace(3, 300, 30).astype(int))]


@pytest.fixture(scope="module")
def rows():
    return load_rows(PANDALM).head(24)


# --- no Ray needed -----------------------------------------------------------------------------------

def test_ray_is_imported_only_when_asked():
    code = ("import sys; import arenaflow.stages.main, arenaflow.scoring, arenaflow.scoring.ray_actors; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_actor_plan_one_actor_per_gpu_group_or_cpu_group():
    gpus = {"CPU": 64.0, "GPU": 8.0}
    assert actor_plan(EngineConfig(), gpus) == (8, {"num_cpus": 1, "num_gpus": 1})
    assert actor_plan(EngineConfig(tensor_parallel_size=2), gpus) == (4, {"num_cpus": 1, "num_gpus": 2})
    assert actor_plan(EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2), gpus)[0] == 2
    # vLLM's own Ray executor places the stages: the actor holds no GPU
    spread = EngineConfig(tensor_parallel_size=8, pipeline_parallel_size=2, distributed_executor_backend="ray")
    assert actor_plan(spread, {"CPU": 128.0, "GPU": 16.0}) == (1, {"num_cpus": 1, "num_gpus": 0})
    assert actor_plan(EngineConfig(ray_actors=3), gpus)[0] == 3
    assert actor_plan(EngineConfig(), {"CPU": 2.0}) == (2, {"num_cpus": 1})
    assert actor_plan(EngineConfig(ray_cpus_per_actor=2), {"CPU": 5.0}) == (2, {"num_cpus": 2})
    with pytest.raises(ScoringError, match="fits 2 scorer actor"):
        actor_plan(EngineConfig(ray_actors=3), {"CPU": 2.0})
    with pytest.raises(ScoringError, match="fits 0"):
        actor_plan(EngineConfig(tensor_parallel_size=4), {"CPU": 8.0, "GPU": 2.0})


def test_row_gather_refuses_lost_and_twice_returned_rows():
    gather = RowGather(5)
    gather.add(np.array([3, 1]), np.full((2, 3), 1 / 3))
    with pytest.raises(ScoringError, match=r"row\(s\) \[1\] came back twice"):
        gather.add(np.array([1]), np.full((1, 3), 1 / 3))
    with pytest.raises(ScoringError, match="2 of 2 rows never came back"):
        RowGather(2).check_complete()
    gather.add(np.array([0, 2, 4]), np.tile([0.5, 0.25, 0.25], (3, 1)))
    np.testing.assert_allclose(gather.check_complete()[[0, 3]], [[0.5, 0.25, 0.25], [1 / 3] * 3])


def test_ray_settings_are_checked(tiny_checkpoint):
    with pytest.raises(RecipeError, match="engine.executor: 'dask' is not one of local, ray"):
        Scorer(tiny_checkpoint, dataclasses.replace(TRANSFORMERS, executor="dask"))
    with pytest.raises(ScoringError, match="data_parallel_size=1"):
        Scorer(tiny_checkpoint, dataclasses.replace(TRANSFORMERS, executor="ray", data_parallel_size=2))


# --- local Ray, 2 CPU actors ----------------------------------------------------------------------------

def test_vllm_on_ray_matches_the_in_process_engine(ray_local, tiny_checkpoint, tiny_vllm, prompts):
    reference = tiny_vllm.score(prompts, progress=False).probs
    with Scorer(tiny_checkpoint, on_ray(VLLM_TEST_ENGINE, ray_batch_rows=4)) as scorer:
        assert scorer._impl.actors == 2 and scorer._impl.resources == {"num_cpus": 1}
        result = scorer.score(prompts, progress=False)
    assert result.probs.shape == (len(prompts), 3)
    assert np.abs(result.probs - reference).max() <= TOL


def test_rows_come_back_once_in_input_order(ray_local, tiny_checkpoint, prompts):
    with Scorer(tiny_checkpoint, TRANSFORMERS) as local:
        reference = local.score(prompts, progress=False).probs
    with Scorer(tiny_checkpoint, on_ray(TRANSFORMERS, ray_batch_rows=3)) as scorer:
        seen = []
        gather = RowGather(len(prompts))
        for index, probs in scorer.stream(prompts):
            seen.extend(index.tolist())
            gather.add(index, probs)
        assert sorted(seen) == list(range(len(prompts)))  # each row exactly once (in whatever order)
        np.testing.assert_allclose(gather.check_complete(), reference, atol=TOL)
        too_long = [[5] * 1030]
        with pytest.raises(ScoringError, match="max_model_len=1024"):  # checked before Ray is asked
            scorer.score(too_long, progress=False)


class _Dies:
    """A scorer whose process exits at its first batch, `times` times in all (counted in marker files)."""

    def __init__(self, marker: str, times: int, make_scorer):
        self.marker, self.times, self.scorer = Path(marker), times, make_scorer()

    def score(self, prompts, progress=False):
        deaths = len(list(self.marker.parent.glob(self.marker.name + "-*")))
        if deaths < self.times:
            self.marker.with_name(f"{self.marker.name}-{deaths}").write_text("died")
            os._exit(1)  # the worker process dies, as on a lost node
        return self.scorer.score(prompts, progress=progress)


def _dying_scorer(tmp_path, checkpoint, times: int, actors: int) -> RayScorer:
    from ray import cloudpickle  # Ray's own copy pickles the actors' arguments

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    make = functools.partial(_Dies, str(tmp_path / "died"), times, functools.partial(Scorer, str(checkpoint), TRANSFORMERS))
    return RayScorer(make, on_ray(TRANSFORMERS, ray_batch_rows=4, ray_actors=actors), str(checkpoint), 1024)


def test_a_dead_actor_is_replaced_and_its_batch_scored_again(ray_local, tiny_checkpoint, prompts, tmp_path):
    with Scorer(tiny_checkpoint, TRANSFORMERS) as local:
        reference = local.score(prompts, progress=False).probs
    probs = _dying_scorer(tmp_path, tiny_checkpoint, times=1, actors=2)(prompts, False)
    assert len(list(tmp_path.glob("died-*"))) == 1
    np.testing.assert_allclose(probs, reference, atol=TOL)


def test_an_actor_dying_every_time_stops_the_run_with_a_clear_error(ray_local, tiny_checkpoint, prompts, tmp_path):
    scorer = _dying_scorer(tmp_path, tiny_checkpoint, times=10**6, actors=1)
    with pytest.raises(ScoringError, match="scoring on Ray failed.*ActorDiedError"):
        scorer(prompts, False)
    assert len(list(tmp_path.glob("died-*"))) == RETRIES + 1  # the first start and RETRIES restarts


def test_shards_resume_and_match_the_in_process_engine(ray_local, tiny_checkpoint, rows, tmp_path):
    """A run killed after two shards keeps them; the next run scores only the rest, in one Ray run."""
    builder = PromptBuilder(load_tokenizer(tiny_checkpoint), PromptConfig(max_length=128))
    with Scorer(tiny_checkpoint, TRANSFORMERS) as local:
        reference = predict(local, builder, rows, swap_tta=True, progress=False)
    scorer = Scorer(tiny_checkpoint, on_ray(TRANSFORMERS, ray_batch_rows=5))
    computed = []

    class Killed(Exception):
        pass

    def run(stop_after: int | None):
        shards = ShardPredictor(lambda: (scorer, builder), rows, swap_tta=True)

        def compute(lo, hi):
            if stop_after is not None and len(computed) == stop_after:
                raise Killed
            computed.append(lo)
            result = shards(lo, hi)
            return {"probs": result.probs.tolist(), "one_order": result.probs_one_order.tolist()}

        try:
            return run_shards(tmp_path, {"test": "ray"}, len(rows), 6, compute, "test", progress=False)
        finally:
            shards.close()

    with scorer:
        with pytest.raises(Killed):
            run(stop_after=2)
        assert computed == [0, 6]
        shards, todo = run(stop_after=None)
    assert todo == [2, 3] and computed == [0, 6, 12, 18]
    probs = np.array([p for s in shards for p in s["probs"]])
    np.testing.assert_allclose(probs, reference.probs, atol=TOL)
    np.testing.assert_allclose(np.array([p for s in shards for p in s["one_order"]]), reference.probs_one_order,
                               atol=TOL)


def test_infer_on_ray_writes_the_same_submission(ray_local, store, tmp_path):
    from arenaflow.stages import infer

    pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(20).to_csv(tmp_path / "test.csv", index=False)
    local = load_recipe(RECIPE, TINY)
    infer.run(local, str(tmp_path / "test.csv"), str(tmp_path / "local.csv"), model="tiny:llama")
    ray_recipe = load_recipe(RECIPE, TINY + ["engine.executor=ray", "engine.ray_actors=2", "engine.ray_batch_rows=6"])
    infer.run(ray_recipe, str(tmp_path / "test.csv"), str(tmp_path / "ray.csv"), model="tiny:llama")
    expected, got = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert list(got["id"]) == list(expected["id"])
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=TOL)


# --- models larger than a node: vLLM's Ray executor and pipeline stages ------------------------------

def _llm_kwargs(monkeypatch, checkpoint, **engine) -> dict:
    """The kwargs `LLM(...)` gets from the vLLM backend (a stand-in vllm module records them)."""
    import types

    from arenaflow.scoring.engines import VllmEngine

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=1024))

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("arenaflow.scoring.engines._on_cuda", lambda: True)  # the GPU path; nothing is started
    VllmEngine(Path(checkpoint), EngineConfig(**engine), [1, 2, 3], None, 1024, False)
    return seen


def test_multi_node_settings_reach_vllm_only_when_set(monkeypatch, tiny_checkpoint):
    plain = _llm_kwargs(monkeypatch, tiny_checkpoint)
    assert "pipeline_parallel_size" not in plain and "distributed_executor_backend" not in plain
    spread = _llm_kwargs(monkeypatch, tiny_checkpoint, tensor_parallel_size=8, pipeline_parallel_size=2,
                         distributed_executor_backend="ray")
    assert (spread["tensor_parallel_size"], spread["pipeline_parallel_size"]) == (8, 2)
    assert spread["distributed_executor_backend"] == "ray"


def test_plan_divides_the_layers_over_pipeline_stages():
    from arenaflow.plan import ARCHITECTURES, NODE_LINK_GBS, PlanError, gpu_spec, make_plan, plan

    dims, lengths, h100 = ARCHITECTURES["llama-3-70b"], np.full(200, 1000), gpu_spec("H100")
    one_node = make_plan(dims, lengths, gpu=h100, count=8, tp=8)
    two_nodes = make_plan(dims, lengths, gpu=h100, count=16, tp=8, pp=2, stage_link_gbs=NODE_LINK_GBS)
    m1, m2 = one_node.memory_gib, two_nodes.memory_gib
    # each GPU holds half the layers' weights and KV cache, and one of the two vocabulary matrices
    assert m2["weights"] == pytest.approx(m1["weights"] / 2)
    assert m2["kv_cache"] == pytest.approx(m1["kv_cache"] / 2)
    # twice the GPUs, a bit less than twice the speed: activations cross the node link, the bubble
    assert one_node.seconds_per_row / 2 < two_nodes.seconds_per_row < one_node.seconds_per_row / 1.9
    inside = make_plan(dims, lengths, gpu=h100, count=16, tp=8, pp=2)  # stages over NVLink: cheaper
    assert inside.seconds_per_row < two_nodes.seconds_per_row
    assert "pipeline parallel 2" in two_nodes.table() and any("bubble" in n for n in two_nodes.notes)
    with pytest.raises(PlanError, match="needs 32 GPUs"):
        make_plan(dims, lengths, gpu=h100, count=16, tp=8, pp=2, dp=2)
    # a recipe's engine keys: the ray backend puts the stages on different nodes
    recipe = load_recipe(RECIPE, ["engine.tensor_parallel_size=8", "engine.pipeline_parallel_size=2",
                                  "engine.distributed_executor_backend=ray"])
    planned = plan(recipe, rows=1000, gpu="H100", count=16, model="llama-3-70b", lengths=lengths)
    assert planned.pp == 2 and planned.tp == 8 and any(f"{NODE_LINK_GBS:.0f} GB/s" in n for n in planned.notes)
