import dataclasses
import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import arenaflow
from arenaflow import cli
from arenaflow.errors import ArenaflowError
from arenaflow.recipe import SECTIONS

RECIPE = str(Path(__file__).parents[1] / "experiments" / "cpu-smollm2.yaml")


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


def typo_cases() -> list[tuple[str, str, list[str]]]:
    """(key path, a value it refuses, what the error must name: the path, the value, the allowed) for every key with a closed set
    or a range, read from the dataclasses (their `choices`/`within` and Literal types): a key checked
    tomorrow is walked without editing this list."""
    cases = []
    for cls, section in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            scalar = next(a for a in (typing.get_args(tp) or (tp,)) if a is not type(None))
            if typing.get_origin(scalar) is list:
                (scalar,) = typing.get_args(scalar)
            choices, within = f.metadata.get("choices", ()), f.metadata.get("within")
            literals = [v for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
            key = f"{section}.{f.name}"
            where = f"{key}[0]: " if typing.get_origin(tp) is list else f"{key}: "  # a list key: its element
            if within is not None:  # just outside the low end
                bad = str(scalar(within.low if within.low_open else within.low - 1))
                cases.append((key, bad, [where + bad, *map(str, choices), str(within)]))
            elif choices:
                bad = f"{choices[0]}x"
                cases.append((key, bad, [where + repr(bad), *map(str, choices)]))
            elif literals:
                bad = f"{literals[0]}x"
                cases.append((key, bad, [where, repr(bad), "true/false", *map(str, literals)]))
    return cases


CASES = typo_cases()


def test_the_walk_covers_the_closed_keys():
    keys = {key for key, _, _ in CASES}
    assert {"calibration.method", "quant.scheme", "quant.method", "quant.fallback_schemes", "train.head",
            "train.bnb_4bit_compute_dtype", "train.gradient_checkpointing", "engine.backend", "engine.executor",
            "generate.modes", "prompt.prompt_share", "train.batch_size", "engine.gpu_memory_utilization"} <= keys
    assert len(keys) > 50


@pytest.mark.parametrize("key, bad, named", CASES, ids=[case[0] for case in CASES])
def test_a_typo_in_any_closed_key_stops_the_cli_before_work(key, bad, named, capsys):
    assert cli.main(["plan", "--recipe", RECIPE, "--set", f"{key}={bad}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("arenaflow plan: error: ") and error.count("\n") == 1 and "Traceback" not in error
    assert [text for text in named if text not in error] == [], error


def test_the_console_script_prints_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "arenaflow.cli", "plan", "--recipe", RECIPE,
                           "--set", "calibration.method=vectr"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("arenaflow plan: error: " + RECIPE + ": calibration.method: 'vectr' is not one of "
                           "auto, none, temperature, vector, shrinkage, stacker\n")
