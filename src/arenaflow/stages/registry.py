"""The model registry: register versions, promote a champion, resolve model references.

A model version is an MLflow Model (servable.py: pyfunc, the checkpoint in its artifacts, what scoring needs
from the recipe in its model config), logged by the run that made it and registered from its LoggedModel.
Evaluation figures are metrics of that LoggedModel, each tied to the dataset it was measured on (MLflow's
Models view lists them side by side). `promote` moves the `champion` alias to a candidate only when its
log_loss is strictly lower than the holder's on the same dataset (same digest), and records why on the
version (`promotion` tag). `infer` and `evaluate` turn `models:/arenaflow@champion` into the local
checkpoint with `resolve_model_uri`; `mlflow.pyfunc.load_model` and `mlflow models serve` use the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ..calibration import Calibrator
from ..errors import ArenaflowError
from ..models import ModelRef, dense_checkpoint, resolve_model
from ..recipe import Recipe

PROMOTION_TAG = "promotion"
MAKE_ONE_HINT = "run `mlflow run . -e main --env-manager local` (or evaluate + promote) to make one"


class RegistryError(ArenaflowError, ValueError):
    """A registry operation that cannot be done as asked (missing alias, version, run, figures...)."""


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())


def _missing(exc: MlflowException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def register_model(checkpoint: Path, name: str, recipe: Recipe, example: pd.DataFrame, tags: dict,
                   description: str = "", calibrator=None) -> ModelVersion:
    """Log `checkpoint` as the active run's MLflow Model (servable.log_model) and register it as a new
    version of `name`, linked to its LoggedModel (`version.model_id`).

    The registered model is created when missing. Tags (quantization, base model...) are stringified and
    set with the version in one call. On failure, the version and (if this call created it) the
    registered model are deleted again; the run keeps its logged model.
    """
    from ..servable import log_model

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise RegistryError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    run = mlflow.active_run()
    if run is None:
        raise RegistryError("register_model needs an active MLflow run (wrap it in mlflow.start_run())")
    run_id = run.info.run_id
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    info = log_model(checkpoint, recipe, example, calibrator)

    client = _client()
    created_model = False
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        try:
            client.create_registered_model(name)
            created_model = True
        except MlflowException as exc2:  # made by someone else in between: use theirs
            if getattr(exc2, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
    before = _versions_from(client, name, run_id)
    version = None
    try:
        version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=str_tags,
                                              description=description or None, model_id=info.model_id)
        if version.status != "READY":
            raise RegistryError(f"{name} version {version.version} ended as {version.status}: {version.status_message}")
        # What mlflow.register_model does for a LoggedModel: the Models view links the model to its version.
        client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [{"name": name, "version": str(version.version)}])})
        return version
    except BaseException:
        _cleanup(client, name, run_id, before, created_model)
        raise


def _versions_from(client: MlflowClient, name: str, run_id: str) -> set[str]:
    return {str(v.version) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")}


def _cleanup(client: MlflowClient, name: str, run_id: str, before: set[str], created_model: bool) -> None:
    """Best-effort removal of what a failed `register_model` made (never masks the first error).

    The versions made are found by run id (a create call can fail after the version exists, e.g. while
    awaiting its READY status, without returning it)."""
    try:
        for made in _versions_from(client, name, run_id) - before:
            client.delete_model_version(name, made)
        # a model this call created goes too, unless a parallel run registered a version in it meanwhile
        if created_model and not client.search_model_versions(f"name = '{name}'", max_results=1):
            client.delete_registered_model(name)
    except Exception:  # noqa: BLE001 - the original error is the one worth raising
        pass


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name:  # `models:/m-<id>` (a logged model id): no name/version to check
        return rest, None, None
    return name, None, version


def _version_for_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None when the model or the alias is missing.

    Read from the registered model's alias map: MLflow 3.17's sqlite store reports a missing alias as
    INVALID_PARAMETER_VALUE (a missing model as RESOURCE_DOES_NOT_EXIST), too loose to catch by code.
    """
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def alias_version(name: str, alias: str = "champion") -> str | None:
    """The version number `name@alias` points at, as a string; None when there is none."""
    found = _version_for_alias(_client(), name, alias)
    return None if found is None else str(found.version)


def latest_version(name: str) -> str:
    """The highest version number of `name`; RegistryError when it has none."""
    versions = _client().search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"model {name} has no registered version; {MAKE_ONE_HINT}")
    return str(max(int(v.version) for v in versions))


def resolve_model_uri(uri: str, dst_path: str | Path | None = None) -> Path:
    """A local directory -> itself; `runs:/...`, `models:/name@alias`, `models:/name/version` -> a
    downloaded local checkpoint directory (into `dst_path`, or a fresh temporary directory)."""
    text = str(uri)
    if not text.startswith(("runs:/", "models:/")):
        path = Path(text).expanduser()
        if path.is_dir():
            return path
        raise RegistryError(f"{text!r} is neither a local directory nor a runs:/ or models:/ URI")
    client = _client()
    target = text
    if text.startswith("runs:/") and "/" not in text[len("runs:/") :].strip("/"):
        from ..servable import MODEL_ARTIFACT

        target = f"runs:/{text[len('runs:/') :].strip('/')}/{MODEL_ARTIFACT}"  # a bare run: its model
    if text.startswith("models:/"):
        name, alias, version = parse_models_uri(text)
        if alias is not None:
            found = _version_for_alias(client, name, alias)
            if found is None:
                raise RegistryError(
                    f"no model is registered as {name}@{alias}; {MAKE_ONE_HINT} (registry: {mlflow.get_registry_uri()})"
                )
            target = f"models:/{name}/{found.version}"  # pin it: the alias may move while we download
        elif version is not None and version.isdigit():
            try:
                client.get_model_version(name, version)
            except MlflowException as exc:
                if not _missing(exc):
                    raise
                raise RegistryError(
                    f"no version {version} of model {name}; {MAKE_ONE_HINT} (registry: {mlflow.get_registry_uri()})"
                ) from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=target,
                                                         dst_path=str(dst_path) if dst_path else None))
    except MlflowException as exc:
        raise RegistryError(f"cannot download {text}: {exc.message}") from exc
    return model_checkpoint(local)


def _pyfunc_flavor(model_dir: Path) -> dict | None:
    """The python_function flavor of the MLflow Model in `model_dir` (artifacts, model config), or None."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.exists():
        return None
    return yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})


def model_checkpoint(local: Path) -> Path:
    """The checkpoint directory inside a downloaded MLflow Model (its `checkpoint` artifact); a plain
    checkpoint directory is returned as it is."""
    flavor = _pyfunc_flavor(local)
    if flavor is None:
        return local
    path = (flavor.get("artifacts") or {}).get("checkpoint", {}).get("path")
    if not path:
        raise RegistryError(f"{local}: an MLflow Model without a `checkpoint` artifact; not an arenaflow version")
    return local / path


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _model_id(mv: ModelVersion | None) -> str | None:
    """The LoggedModel behind a version: its `model_id`, which MLflow 3.17's sqlite store leaves empty,
    else the `models:/m-...` source it was registered from (None for a version of run artifacts)."""
    if mv is None:
        return None
    source = mv.source or ""
    return mv.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def log_version_metrics(name: str, version: str | int, metrics: dict, dataset) -> None:
    """Log evaluation figures into the active run, against the version's LoggedModel and the MLflow
    dataset they were measured on (MLflow's Models view shows them per model and dataset)."""
    figures = {}
    for key, value in metrics.items():
        number = _number(value)
        if number is None:
            raise RegistryError(f"metric {key}={value!r} is not a finite number")
        figures[str(key)] = number
    model_id = _model_id(_client().get_model_version(name, str(version)))
    if not model_id:
        raise RegistryError(f"{name} version {version} has no MLflow Model (registered before versions were "
                            "MLflow Models); register it again with quantize")
    mlflow.log_metrics(figures, model_id=model_id, dataset=dataset)


def _metric_by_dataset(client: MlflowClient, mv: ModelVersion | None, metric: str) -> dict[str, float]:
    """{dataset digest: latest value} of a version's LoggedModel metric ({} without a model)."""
    model_id = _model_id(mv)
    if not model_id:
        return {}
    latest: dict[str, tuple[int, float]] = {}
    for m in client.get_logged_model(model_id).metrics or []:
        if m.key == metric and m.dataset_digest and math.isfinite(m.value):
            if m.dataset_digest not in latest or m.timestamp >= latest[m.dataset_digest][0]:
                latest[m.dataset_digest] = (m.timestamp, m.value)
    return {digest: value for digest, (_, value) in sorted(latest.items(), key=lambda kv: kv[1][0])}


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    previous_version: str | None  # the alias holder before the call (None: there was none)
    version: str = ""  # the candidate
    figures: dict = field(default_factory=dict)  # candidate_/champion_ metric and digest


def promote(
    name: str,
    version: str | int,
    metric: str = "log_loss",
    eval_digest: str | None = None,
    alias: str = "champion",
) -> PromotionDecision:
    """Move `alias` to `name`/`version` if there is no holder, or if the candidate's `metric` (a metric of
    its LoggedModel) is strictly lower than the holder's on the same dataset (same digest: `eval_digest`
    when given, else the candidate's latest dataset that the holder was also measured on). The alias moves in one
    `set_registered_model_alias` call; the decision is then tagged on the candidate (`promotion`), and
    the alias is put back if that tag cannot be written.
    """
    client = _client()
    version = str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise RegistryError(f"no version {version} of model {name} to promote") from None
    champion = _version_for_alias(client, name, alias)
    previous = str(champion.version) if champion is not None else None
    cand_values = _metric_by_dataset(client, candidate, metric)
    champ_values = _metric_by_dataset(client, champion, metric)
    # The dataset both were measured on: the requested one, else the candidate's latest shared with the champion.
    shared = [d for d in cand_values if d in champ_values]
    digest = eval_digest or (shared[-1] if shared else next(reversed(cand_values), None))
    cand_value, champ_value = cand_values.get(digest), champ_values.get(digest)
    figures: dict = {f"candidate_{metric}": cand_value, f"champion_{metric}": champ_value, "dataset_digest": digest}

    def decide() -> tuple[bool, str]:
        if previous == version:
            return False, f"version {version} already holds {name}@{alias}"
        if eval_digest is not None and cand_value is None:
            return False, (f"version {version} has no {metric} on dataset {eval_digest}; evaluate it on that data first")
        if champion is None:
            return True, f"no {name}@{alias} yet; version {version} ({metric} {_fmt(cand_value)}) takes it"
        if cand_value is None:
            return False, f"version {version} has no {metric} on any dataset; evaluate it first"
        if champ_value is None:
            return False, (f"{alias} version {previous} has no {metric} on dataset {digest} (version {version}'s "
                           "latest evaluation); evaluate both on the same data before comparing")
        if cand_value < champ_value:
            return True, (f"{metric} {_fmt(cand_value)} < {_fmt(champ_value)} of {alias} version {previous} "
                          f"on dataset {digest}")
        return False, (f"{metric} {_fmt(cand_value)} is not below {_fmt(champ_value)} of {alias} version "
                       f"{previous} on dataset {digest}")

    promoted, reason = decide()
    decision = PromotionDecision(promoted, reason, previous, version, figures)
    if previous == version:
        return decision  # nothing changes; keep the tag of the promotion that made it champion
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    try:
        client.set_model_version_tag(name, version, PROMOTION_TAG, ("promoted: " if promoted else "rejected: ") + reason)
    except BaseException:
        if promoted:  # undo the move so the registry never shows an alias without its recorded reason
            if previous is not None:
                client.set_registered_model_alias(name, alias, previous)
            else:
                client.delete_registered_model_alias(name, alias)
        raise
    return decision


def stored_calibrator(checkpoint: Path) -> Calibrator:
    """The calibrator in the model config of the MLflow Model a checkpoint was downloaded with (none else)."""
    flavor = _pyfunc_flavor(checkpoint.parent.parent) if checkpoint.parent.name == "artifacts" else None
    return Calibrator.from_dict(((flavor or {}).get("config") or {}).get("calibration"))


def resolve_model_ref(reference: str, recipe: Recipe) -> ModelRef:
    """'' -> the recipe's champion; models:/ and runs:/ URIs via the registry; else models.resolve_model."""
    uri = reference or f"models:/{recipe.registry.model_name}@{recipe.registry.alias}"
    if uri.startswith("models:/"):
        name, alias, version = parse_models_uri(uri)
        version = alias_version(name, alias) if alias else version
        checkpoint = resolve_model_uri(f"models:/{name}/{version}" if version else uri)
        return ModelRef(checkpoint, uri, name, version, stored_calibrator(checkpoint))
    if uri.startswith("runs:/"):
        checkpoint = resolve_model_uri(uri)
        return ModelRef(checkpoint, uri, calibrator=stored_calibrator(checkpoint))
    return ModelRef(resolve_model(uri), uri)


def training_base(recipe: Recipe) -> Path:
    """`model.base` as finetune and quantize start from it: any model reference (a path, hub id, gguf:,
    tiny:, random:, runs:/, models:/name/version or models:/name@alias), a registered quantized version
    dequantized (models.dense_checkpoint)."""
    return dense_checkpoint(resolve_model_ref(recipe.model.base, recipe).checkpoint)


def local_reference(reference: str, recipe: Recipe) -> str:
    """A registry or run URI as the local checkpoint it resolves to (resolve_model_ref); other references as
    given, for the library to resolve (models.resolve_model, the same rules) and to name in its reports."""
    if reference.startswith(("models:/", "runs:/")):
        return str(resolve_model_ref(reference, recipe).checkpoint)
    return reference
