"""The code file of every registered version's MLflow Model (models from code: loaded without unpickling)."""

from mlflow.models import set_model

from arenaflow.servable import PreferenceModel

set_model(PreferenceModel())
