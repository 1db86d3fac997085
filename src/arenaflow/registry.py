"""The model registry: register checkpoints, promote a champion, resolve URIs.

A model version is a Hugging Face checkpoint directory logged as run artifacts under `checkpoint`
(source `runs:/<run_id>/checkpoint`). Evaluation figures live on the version as tags (`log_loss`,
`eval_dataset_digest`, ...), written by `tag_version_with_eval`. `promote` moves the `champion` alias
to a candidate only when it is strictly better on the same evaluation data, and records why on the
version (`promotion` tag). `infer` turns `models:/arenaflow@champion` into a local directory with
`resolve_model_uri`.

Only calls that work in MLflow 3.17 with a sqlite store are used: `mlflow.register_model` on a
`runs:/` source fails there and leaves an empty registered model, so versions are made with
`MlflowClient.create_model_version`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from .models import resolve_model
from .recipe import Recipe

CHECKPOINT_ARTIFACT = "checkpoint"
DIGEST_TAG = "eval_dataset_digest"
PROMOTION_TAG = "promotion"
MAKE_ONE_HINT = "run `mlflow run . -e main --env-manager local` (or evaluate + promote) to make one"


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked (missing alias, version, run, figures...)."""


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())


def _missing(exc: MlflowException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def register_checkpoint(checkpoint: Path, name: str, tags: dict, description: str = "") -> ModelVersion:
    """Log `checkpoint` into the active run under `checkpoint/` and register it as a new version of `name`.

    The registered model is created when missing. Tags (evaluation figures, quantization, base model...)
    are stringified and set with the version in one call. On failure, the version and (if this call
    created it) the registered model are deleted again; the run keeps its logged artifacts.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise RegistryError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    run = mlflow.active_run()
    if run is None:
        raise RegistryError("register_checkpoint needs an active MLflow run (wrap it in mlflow.start_run())")
    run_id = run.info.run_id
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    mlflow.log_artifacts(str(checkpoint), CHECKPOINT_ARTIFACT)

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
    source = f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}"
    before = _versions_from(client, name, run_id)
    version = None
    try:
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags=str_tags,
            description=description or None,
        )
        if version.status != "READY":
            raise RegistryError(f"{name} version {version.version} ended as {version.status}: {version.status_message}")
        return version
    except BaseException:
        _cleanup(client, name, run_id, before, created_model)
        raise


def _versions_from(client: MlflowClient, name: str, run_id: str) -> set[str]:
    return {str(v.version) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")}


def _cleanup(client: MlflowClient, name: str, run_id: str, before: set[str], created_model: bool) -> None:
    """Best-effort removal of what a failed `register_checkpoint` made (never masks the first error).

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
        target = f"runs:/{text[len('runs:/') :].strip('/')}/{CHECKPOINT_ARTIFACT}"  # a bare run: its checkpoint
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
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dst_path) if dst_path else None)
        )
    except MlflowException as exc:
        raise RegistryError(f"cannot download {text}: {exc.message}") from exc


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def tag_version_with_eval(name: str, version: str | int, metrics: dict, dataset_digest: str) -> None:
    """Write evaluation figures (`log_loss`, ...) and the evaluation data's digest as version tags.

    The digest tag is removed first and written last, so an interrupted call leaves figures without a
    digest, which `promote` refuses to compare, never figures paired with another data set's digest.
    """
    if not dataset_digest:
        raise RegistryError("tag_version_with_eval needs the evaluation data's digest")
    figures = {}
    for key, value in metrics.items():
        number = _number(value)
        if number is None:
            raise RegistryError(f"metric {key}={value!r} is not a finite number")
        figures[str(key)] = number
    client = _client()
    version = str(version)
    try:
        client.delete_model_version_tag(name, version, DIGEST_TAG)
    except MlflowException as exc:
        if not _missing(exc):
            raise
    for key, number in figures.items():
        client.set_model_version_tag(name, version, key, repr(number))
    client.set_model_version_tag(name, version, DIGEST_TAG, str(dataset_digest))


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
    """Move `alias` to `name`/`version` if there is no holder, or if the candidate's `metric` tag is
    strictly lower than the holder's on the same evaluation data (`eval_dataset_digest` tags equal;
    `eval_digest`, when given, must also be the candidate's digest). The alias moves in one
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
    cand_value = _number(candidate.tags.get(metric))
    cand_digest = candidate.tags.get(DIGEST_TAG)
    figures: dict = {f"candidate_{metric}": cand_value, f"candidate_{DIGEST_TAG}": cand_digest}
    if champion is not None:
        figures[f"champion_{metric}"] = _number(champion.tags.get(metric))
        figures[f"champion_{DIGEST_TAG}"] = champion.tags.get(DIGEST_TAG)

    def decide() -> tuple[bool, str]:
        if previous == version:
            return False, f"version {version} already holds {name}@{alias}"
        if eval_digest is not None and cand_digest != eval_digest:
            return False, (
                f"version {version} was evaluated on data {cand_digest or 'unknown'}, "
                f"not on the requested {eval_digest}; evaluate it on that data first"
            )
        if champion is None:
            return True, f"no {name}@{alias} yet; version {version} ({metric} {_fmt(cand_value)}) takes it"
        champ_value = figures[f"champion_{metric}"]
        champ_digest = figures[f"champion_{DIGEST_TAG}"]
        if cand_value is None or not cand_digest:
            return False, f"version {version} has no {metric} or {DIGEST_TAG} tag; evaluate it first"
        if champ_digest != cand_digest:
            return False, (
                f"{alias} version {previous} was evaluated on different data ({champ_digest or 'unknown'}) "
                f"than version {version} ({cand_digest}); evaluate both on the same data before comparing"
            )
        if champ_value is None:
            return False, f"{alias} version {previous} has no {metric} tag on data {cand_digest}; evaluate it first"
        if cand_value < champ_value:
            return True, (
                f"{metric} {_fmt(cand_value)} < {_fmt(champ_value)} of {alias} version {previous} "
                f"on data {cand_digest}"
            )
        return False, (
            f"{metric} {_fmt(cand_value)} is not below {_fmt(champ_value)} of {alias} version {previous} "
            f"on data {cand_digest}"
        )

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


@dataclass
class ModelRef:
    checkpoint: Path  # local checkpoint directory
    uri: str  # the reference as given (or the recipe's champion URI)
    registered_name: str | None = None
    version: str | None = None


def resolve_model_ref(reference: str, recipe: Recipe) -> ModelRef:
    """'' -> the recipe's champion; models:/ and runs:/ URIs via the registry; else models.resolve_model."""
    uri = reference or f"models:/{recipe.registry.model_name}@{recipe.registry.alias}"
    if uri.startswith("models:/"):
        name, alias, version = parse_models_uri(uri)
        version = alias_version(name, alias) if alias else version
        checkpoint = resolve_model_uri(f"models:/{name}/{version}" if version else uri)
        return ModelRef(checkpoint, uri, name, version)
    if uri.startswith("runs:/"):
        return ModelRef(resolve_model_uri(uri), uri)
    return ModelRef(resolve_model(uri), uri)
