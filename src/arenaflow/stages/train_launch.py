"""finetune past one process: `train.processes > 1` runs `train.finetune` under `accelerate launch` (DDP:
one process per GPU, each on its shard of the rows; on a CPU machine, gloo processes for a smoke test).

The caller's process keeps everything else (zero-shot scoring, the MLflow run, the adapter's upload). The
workers read one job folder (rows as parquet, settings as JSON); rank 0 joins the caller's MLflow run
(`MLFLOW_RUN_ID`), so the loss curve and the validation figures are logged once, and rank 0 alone saves
the adapter and writes the result. Models that do not fit one GPU need FSDP or DeepSpeed ZeRO-3 instead
of DDP (README, "Past one machine"); that is not wired here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from ..data import read_prepared, write_parquet
from ..recipe import PromptConfig, TrainConfig
from ..train import TrainResult, finetune
from ..train_log import TrainError
from .runs import log_to_run


def launch(base_checkpoint: Path, train_rows: pd.DataFrame, valid_rows: pd.DataFrame, prompt_cfg: PromptConfig,
           train_cfg: TrainConfig, out_dir: Path, *, trust_remote_code: bool = False) -> TrainResult:
    """`train.finetune` in `train_cfg.processes` processes under `accelerate launch`; its TrainResult."""
    import torch

    job = Path(out_dir) / "job"
    job.mkdir(parents=True, exist_ok=True)
    write_parquet(train_rows, job / "train.parquet")
    write_parquet(valid_rows, job / "valid.parquet")
    (job / "job.json").write_text(json.dumps({
        "base_checkpoint": str(base_checkpoint), "prompt": dataclasses.asdict(prompt_cfg),
        "train": dataclasses.asdict(train_cfg), "out_dir": str(out_dir), "trust_remote_code": trust_remote_code}))
    # --multi_gpu is accelerate's torch.distributed launcher; without CUDA the workers join with gloo
    # (PartialState(cpu=True) below; accelerate's own --cpu flag starts a single process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(train_cfg.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # one thread per process, or they fight over the cores
    run = _active_run_id()
    if run:
        env["MLFLOW_RUN_ID"] = run
    completed = subprocess.run([*command, "-m", "arenaflow.stages.train_launch", str(job)], env=env)
    result_file = job / "result.json"
    if completed.returncode != 0 or not result_file.exists():
        raise TrainError(f"finetune under accelerate launch ({train_cfg.processes} processes) failed with exit "
                         f"code {completed.returncode}; the workers' output is above")
    values = json.loads(result_file.read_text())
    return TrainResult(**{**values, "adapter_dir": Path(values["adapter_dir"])})


def _active_run_id() -> str | None:
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow else None
    return run.info.run_id if run else None


def worker(job: Path) -> None:
    """One `accelerate launch` process: train; rank 0 logs into the caller's run and writes the result."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # before the Trainer: it reuses this state
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)  # the 4-bit base loads onto this process's GPU
    spec = json.loads((job / "job.json").read_text())
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    logging_run = None
    if state.is_main_process and run_id:
        import mlflow

        logging_run = mlflow.start_run(run_id=run_id)  # the train log callback logs into the active run
    try:
        result = finetune(Path(spec["base_checkpoint"]), read_prepared(job / "train.parquet"),
                          read_prepared(job / "valid.parquet"), PromptConfig(**spec["prompt"]),
                          TrainConfig(**spec["train"]), Path(spec["out_dir"]),
                          trust_remote_code=spec["trust_remote_code"],
                          log_metrics=log_to_run if logging_run is not None else None)
    finally:
        if logging_run is not None:
            import mlflow

            mlflow.end_run(status="RUNNING")  # the run is the caller's: it ends it, not this worker
    if state.is_main_process:
        values = {**dataclasses.asdict(result), "adapter_dir": str(result.adapter_dir)}
        (job / "result.json").write_text(json.dumps(values, default=float))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
