"""Registry logic on a throwaway sqlite store with a fake checkpoint (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from arenaflow.stages import registry, runs as tracking
from arenaflow.data import canonicalize
from arenaflow.recipe import Recipe
from arenaflow.stages.registry import RegistryError

NAME = "arenaflow-test"
EXAMPLE = canonicalize(pd.DataFrame({"id": ["1"], "prompt": ['["Hi"]'], "response_a": ['["a"]'],
                                     "response_b": ['["b"]']}), Path("example.csv"))
DATASETS = {name: mlflow.data.from_pandas(pd.DataFrame({"rows": [name]}), name=name) for name in ("d1", "d2")}


def fake_checkpoint(root: Path, tag: str) -> Path:
    ckpt = root / f"ckpt-{tag}"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    (ckpt / "sub" / "weights.bin").write_bytes(tag.encode() * 8)
    return ckpt


def register(tmp_path: Path, tag: str, log_loss: float | None = None, digest: str = "d1") -> str:
    with mlflow.start_run():
        mv = registry.register_model(fake_checkpoint(tmp_path, tag), NAME, Recipe(), EXAMPLE,
                                     {"quantization": "W4A16", "base_model": "tiny"}, f"ckpt {tag}")
        if log_loss is not None:
            registry.log_version_metrics(NAME, mv.version, {"log_loss": log_loss, "accuracy": 0.5}, DATASETS[digest])
    return str(mv.version)


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri() == "sqlite:///elsewhere.db"


def test_register_sets_source_tags_description(store, tmp_path):
    version = register(tmp_path, "one")
    mv = MlflowClient().get_model_version(NAME, version)
    assert mv.source.startswith("models:/m-")  # an MLflow Model, not run artifacts
    assert mlflow.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == mv.run_id
    assert mv.tags["quantization"] == "W4A16" and mv.tags["base_model"] == "tiny"
    assert mv.description == "ckpt one"
    assert register(tmp_path, "two") == str(int(version) + 1)


def test_register_needs_active_run_and_checkpoint(store, tmp_path):
    with pytest.raises(RegistryError, match="active MLflow run"):
        registry.register_model(fake_checkpoint(tmp_path, "x"), NAME, Recipe(), EXAMPLE, {}, "")
    with mlflow.start_run(), pytest.raises(RegistryError, match="config.json"):
        registry.register_model(tmp_path / "nothing", NAME, Recipe(), EXAMPLE, {}, "")
    assert not MlflowClient().search_registered_models()


def test_failed_registration_leaves_no_registered_model(store, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("store down")

    real = MlflowClient.create_model_version

    def made_then_fails(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("store down")

    monkeypatch.setattr(MlflowClient, "create_model_version", made_then_fails)
    with mlflow.start_run(), pytest.raises(RuntimeError, match="store down"):
        registry.register_model(fake_checkpoint(tmp_path, "x"), NAME, Recipe(), EXAMPLE, {}, "")
    assert not MlflowClient().search_registered_models()
    monkeypatch.setattr(MlflowClient, "create_model_version", real)
    register(tmp_path, "kept")
    monkeypatch.setattr(MlflowClient, "create_model_version", boom)
    with mlflow.start_run(), pytest.raises(RuntimeError, match="store down"):
        registry.register_model(fake_checkpoint(tmp_path, "y"), NAME, Recipe(), EXAMPLE, {}, "")
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{NAME}'")] == ["1"]


def test_promotion_rules(store, tmp_path):
    client = MlflowClient()
    v1 = register(tmp_path, "one", log_loss=1.05)
    first = registry.promote(NAME, v1)
    assert first.promoted and first.previous_version is None
    assert registry.alias_version(NAME) == v1
    assert client.get_model_version(NAME, v1).tags["promotion"].startswith("promoted")

    worse = registry.promote(NAME, register(tmp_path, "worse", log_loss=1.2))
    assert not worse.promoted and worse.previous_version == v1
    assert "1.2" in worse.reason and "1.05" in worse.reason
    assert registry.alias_version(NAME) == v1
    assert client.get_model_version(NAME, worse.version).tags["promotion"].startswith("rejected")

    tie = registry.promote(NAME, register(tmp_path, "tie", log_loss=1.05))
    assert not tie.promoted  # strictly better only

    d1, d2 = DATASETS["d1"].digest, DATASETS["d2"].digest
    other_data = registry.promote(NAME, register(tmp_path, "other", log_loss=0.5, digest="d2"))
    assert not other_data.promoted and "same data" in other_data.reason and d2 in other_data.reason
    asked_other = registry.promote(NAME, register(tmp_path, "asked", log_loss=0.5), eval_digest=d2)
    assert not asked_other.promoted and d2 in asked_other.reason

    v_better = register(tmp_path, "better", log_loss=0.9)
    better = registry.promote(NAME, v_better, eval_digest=d1)
    assert better.promoted and better.previous_version == v1
    assert "0.9" in better.reason and "1.05" in better.reason
    assert registry.alias_version(NAME) == v_better
    assert better.figures == {"candidate_log_loss": 0.9, "champion_log_loss": 1.05, "dataset_digest": d1}
    again = registry.promote(NAME, v_better)
    assert not again.promoted and "already" in again.reason
    assert client.get_model_version(NAME, v_better).tags["promotion"].startswith("promoted")


def test_promotion_tag_failure_puts_alias_back(store, tmp_path, monkeypatch):
    v1 = register(tmp_path, "one", log_loss=1.0)
    registry.promote(NAME, v1)
    v2 = register(tmp_path, "two", log_loss=0.5)
    real = MlflowClient.set_model_version_tag

    def flaky(self, name, version=None, key=None, value=None, stage=None):
        if key == "promotion":
            raise RuntimeError("tag write failed")
        return real(self, name, version, key, value, stage)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", flaky)
    with pytest.raises(RuntimeError, match="tag write failed"):
        registry.promote(NAME, v2)
    assert registry.alias_version(NAME) == v1


def test_version_metrics_reject_non_finite(store, tmp_path):
    version = register(tmp_path, "one")
    with mlflow.start_run(), pytest.raises(RegistryError, match="finite"):
        registry.log_version_metrics(NAME, version, {"accuracy": 0.5, "log_loss": float("nan")}, DATASETS["d1"])
    model_id = MlflowClient().get_model_version(NAME, version).source.removeprefix("models:/")
    assert not mlflow.get_logged_model(model_id).metrics


def test_resolve_uris(store, tmp_path):
    version = register(tmp_path, "one", log_loss=1.0)
    registry.promote(NAME, version)
    for uri in (f"models:/{NAME}@champion", f"models:/{NAME}/{version}"):
        local = registry.resolve_model_uri(uri, dst_path=tmp_path / "dl" / uri.replace("/", "_").replace(":", ""))
        assert json.loads((local / "config.json").read_text())["tag"] == "one"
        assert (local / "sub" / "weights.bin").read_bytes() == b"one" * 8
    run_id = MlflowClient().get_model_version(NAME, version).run_id
    assert (registry.resolve_model_uri(f"runs:/{run_id}", dst_path=tmp_path / "dl-run") / "config.json").is_file()
    ckpt = fake_checkpoint(tmp_path, "local")
    assert registry.resolve_model_uri(str(ckpt)) == ckpt


def test_resolve_missing_alias_is_clear(store, tmp_path):
    with pytest.raises(RegistryError, match=r"no model is registered as arenaflow@champion;.*mlflow run \. -e main"):
        registry.resolve_model_uri("models:/arenaflow@champion")
    register(tmp_path, "one")  # registered model exists, alias does not
    with pytest.raises(RegistryError, match=f"no model is registered as {NAME}@champion"):
        registry.resolve_model_uri(f"models:/{NAME}@champion")
    with pytest.raises(RegistryError, match="no version 7"):
        registry.resolve_model_uri(f"models:/{NAME}/7")
    with pytest.raises(RegistryError, match="neither a local directory"):
        registry.resolve_model_uri(str(tmp_path / "absent"))
