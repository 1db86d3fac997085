"""Shared session fixtures: model checkpoints and the (slow to start) vLLM engines, one per model."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from arenaflow import registry

from arenaflow.models import resolve_model
from arenaflow.recipe import EngineConfig

# float32 so that vLLM and the transformers reference can be compared tightly; 1024 fits the recipes'
# prompt.max_length (512) + 8.
VLLM_TEST_ENGINE = EngineConfig(backend="vllm", dtype="float32", max_model_len=1024, cpu_kv_cache_gib=0.25)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    return resolve_model("tiny:llama")


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    return resolve_model("gguf:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_vllm(tiny_checkpoint):
    """The one vLLM engine (logprob backend) on the tiny model that every test shares."""
    from arenaflow.scoring import Scorer

    with Scorer(tiny_checkpoint, VLLM_TEST_ENGINE) as scorer:
        yield scorer


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2_checkpoint):
    """The one vLLM engine (logprob backend) on SmolLM2-135M-Instruct."""
    from arenaflow.scoring import Scorer

    with Scorer(smollm2_checkpoint, VLLM_TEST_ENGINE) as scorer:
        yield scorer


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite file (creating the tables takes seconds: done once, copied)."""
    root = tmp_path_factory.mktemp("mlflow-template")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the Default experiment's artifact root is fixed here as <cwd>/mlruns: keep it in tmp
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments()
        client.search_registered_models()
    assert client.get_experiment("0").artifact_location.startswith(str(root))
    return root / "mlflow.db"


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """Tracking + registry in a fresh copy of `empty_db` in tmp_path; globals restored after."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri writes it
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # and mlflow.set_experiment this one
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = registry.setup_tracking()
    mlflow.set_experiment(experiment_id="0")  # forget an experiment made active by an earlier test's store
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
