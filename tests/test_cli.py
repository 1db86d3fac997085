import importlib
import inspect
import pkgutil

import arenaflow
from arenaflow.errors import ArenaflowError


def test_every_project_error_is_an_arenaflow_error():
    """`cli.main` catches ArenaflowError alone, so an error class outside it would end in a traceback."""
    errors = set()
    for module in pkgutil.walk_packages(arenaflow.__path__, "arenaflow."):
        if module.name == "arenaflow.mlflow_model":  # the MLflow models-from-code entry: runs on import
            continue
        for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__.startswith("arenaflow."):
                errors.add(cls)
    assert len(errors) >= 15
    assert [cls.__qualname__ for cls in errors if not issubclass(cls, ArenaflowError)] == []
