"""Shared session fixtures: model checkpoints and the (slow to start) vLLM engines, one per model."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from arenaflow.calibration import Calibrator
from arenaflow.stages import evaluate, promote, registry, runs as tracking
from arenaflow.data import load_rows
from arenaflow.models import resolve_model
from arenaflow.recipe import EngineConfig, load_recipe
from arenaflow.stages.runs import stage_run

# Tests never touch the user's model cache: converted and built checkpoints go to a per-session folder.
_CACHE = tempfile.mkdtemp(prefix="arenaflow-test-cache-")
os.environ["ARENAFLOW_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]
MTBENCH = ROOT / "data" / "mtbench_human_turn1.csv"
PANDALM = ROOT / "data" / "pandalm_test.csv"
RECIPE = str(ROOT / "experiments" / "cpu-smollm2.yaml")
TINY = [f"data.files={MTBENCH},{PANDALM}", "model.base=tiny:llama", "engine.backend=transformers",
        "train.max_valid_rows=16", "prompt.max_length=128", "engine.shard_rows=8"]


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


@contextlib.contextmanager
def _fresh_store(root: Path, empty_db: Path):
    """Tracking + registry in a fresh copy of `empty_db` under `root`; MLflow's globals restored after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        shutil.copyfile(empty_db, root / "mlflow.db")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri writes it
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # and mlflow.set_experiment this one
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        uri = tracking.setup_tracking()
        mlflow.set_experiment(experiment_id="0")  # forget an experiment made active by an earlier store
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.fixture
def store(tmp_path, empty_db):
    """A throwaway MLflow store for one test."""
    with _fresh_store(tmp_path, empty_db) as uri:
        yield uri


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, empty_db):
    """A throwaway MLflow store shared by the tests of one module (for module-scoped fixtures in it)."""
    with _fresh_store(tmp_path_factory.mktemp("store"), empty_db) as uri:
        yield uri


@pytest.fixture(autouse=True)
def no_mlflow_state_leaks():
    """Whatever a test did to MLflow's process-wide state (active run, tracking/registry URI) ends with it."""
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


SLOW_FIXTURES = {"smollm2_checkpoint", "smollm2_vllm", "tiny_vllm"}


def pytest_collection_modifyitems(items):
    """`slow`: tests that need the real SmolLM2 model or a vLLM engine (`pytest -m "not slow"` skips them)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The champion's stored calibration: a stacker on [log p (3), the length features (4)] that moves every
# row (longer A -> A, longer B -> B), so that a path which forgets to apply it scores visibly otherwise.
CHAMPION_STACKER = Calibrator("stacker", coef=[[1, 0, 0, 0, 0, 2, 0], [0, 1, 0, 0, 0, -2, 0], [0, 0, 1, 0, 0, 0, -1]],
                              intercept=[0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def champion(module_store, tiny_checkpoint):
    """The tiny checkpoint registered with CHAMPION_STACKER, evaluated and promoted once per module (in
    `module_store`): models:/arenaflow@champion exists."""
    recipe = load_recipe(RECIPE, TINY)
    with stage_run(recipe, "quantize", model="tiny:llama"):
        rows = load_rows(PANDALM).head(3)
        version = str(registry.register_model(tiny_checkpoint, recipe.registry.model_name, recipe, rows,
                                              tags={"quantization": "none"}, calibrator=CHAMPION_STACKER).version)
    evaluate.run(recipe, model=f"models:/{recipe.registry.model_name}/{version}")
    assert promote.run(recipe, version).promoted
    return version
