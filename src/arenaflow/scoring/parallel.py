"""Data parallel on one host: one spawned engine process per GPU group (`engine.data_parallel_size`),
each scoring a contiguous shard of the prompts; results back in input order."""

from __future__ import annotations

import os
import traceback
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from ..recipe import EngineConfig
from .engines import ScoringError


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank(conn, make_scorer: Callable) -> None:
    """One data-parallel rank (spawned): start a Scorer, then score every shard sent until None."""
    try:
        scorer = make_scorer()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", scorer.max_model_len))
    try:
        while (message := conn.recv()) is not None:
            prompts, progress = message
            try:
                conn.send(("ok", scorer.probabilities(prompts, progress)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        scorer.close()


def _stop_workers(workers: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for proc in workers:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


class DataParallel:
    """`len(device_groups)` spawned engines, `CUDA_VISIBLE_DEVICES=group` each, contiguous shards;
    `make_scorer()` (picklable: a partial of Scorer) opens each rank's engine."""

    def __init__(self, make_scorer: Callable, device_groups: list[str]):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA/tokenizers
        self.workers, self.conns = [], []
        # Not daemonic: a vLLM engine on GPU starts processes of its own.
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self.conns)
        for group in device_groups:
            parent, child = ctx.Pipe()
            with _env(CUDA_VISIBLE_DEVICES=group, TOKENIZERS_PARALLELISM="false"):
                proc = ctx.Process(target=_rank, args=(child, make_scorer), name=f"arenaflow-dp{len(self.workers)}")
                proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        self.max_model_len = min(self._receive(rank, "start") for rank in range(len(self.conns)))

    def _receive(self, rank: int, what: str):
        try:
            status, payload = self.conns[rank].recv()
        except EOFError:
            self.close()
            raise ScoringError(f"data-parallel rank {rank} died during {what} "
                               f"(exit code {self.workers[rank].exitcode})") from None
        if status == "error":
            self.close()
            raise ScoringError(f"data-parallel rank {rank} failed during {what}:\n{payload}")
        return payload

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        bounds = np.linspace(0, len(prompts), len(self.conns) + 1).round().astype(int)
        for rank, conn in enumerate(self.conns):  # one bar is enough: rank 0's
            conn.send((prompts[bounds[rank]:bounds[rank + 1]], progress and rank == 0))
        return np.concatenate([self._receive(rank, "scoring") for rank in range(len(self.conns))])

    def close(self) -> None:
        self._finalizer()


def cuda_device_groups(engine: EngineConfig) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        raise ScoringError(
            f"data_parallel_size={engine.data_parallel_size} runs one engine per GPU and needs CUDA; "
            "on CPU use data_parallel_size=1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    group = engine.tensor_parallel_size * engine.pipeline_parallel_size
    need = engine.data_parallel_size * group
    if need > len(devices):
        raise ScoringError(f"data_parallel_size={engine.data_parallel_size} x tensor_parallel_size="
                           f"{engine.tensor_parallel_size} x pipeline_parallel_size={engine.pipeline_parallel_size}"
                           f" needs {need} GPUs, {len(devices)} visible")
    return [",".join(devices[r * group:(r + 1) * group]) for r in range(engine.data_parallel_size)]
