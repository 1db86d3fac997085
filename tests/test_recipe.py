import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from arenaflow import cli
from arenaflow.cli import build_parser
from arenaflow.recipe import SECTIONS, Recipe, RecipeError, flatten, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"cpu-smollm2", "kaggle-2xt4-34b"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.path == str(path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_key_has_a_comment(path):
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[a-z_0-9]+:", line):
            is_section = line.rstrip().endswith(":")
            commented = "#" in line or (number > 0 and lines[number - 1].strip().startswith("#"))
            assert is_section or commented, f"{path.name}:{number + 1} key without a comment: {line!r}"


def test_kaggle_recipe_is_the_seed_recipe():
    recipe = load_recipe(Path(__file__).parents[1] / "experiments" / "kaggle-2xt4-34b.yaml")
    assert "34B" in recipe.model.base
    assert recipe.train.load_in_4bit and recipe.quant.scheme == "W4A16" and recipe.quant.method == "awq"
    assert recipe.engine.dtype == "float16" and recipe.engine.tensor_parallel_size == 2


def test_overrides_are_typed_and_nested():
    recipe = load_recipe(None, ["train.epochs=2 train.load_in_4bit=false", "data.files=a.csv,b.csv",
                                "data.max_rows=null", "prompt.max_length=128"])
    assert recipe.train.epochs == 2.0 and recipe.train.load_in_4bit is False
    assert recipe.data.files == ["a.csv", "b.csv"] and recipe.data.max_rows is None
    assert recipe.prompt.max_length == 128
    assert flatten(recipe)["data.files"] == "a.csv,b.csv"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=2", "unknown key"),
    ("prompt.max_length=long", "expected int"),
    ("train.load_in_4bit=maybe", "expected true/false"),
    ("prompt.max_length=1.5", "expected int"),
    ("nonsense", "expected section.key=value"),
    ('model.base="my model', 'unbalanced " quote'),
    ("model.base='my model", "unbalanced ' quote"),
    ("model.base=my model", "override 'model': expected section.key=value"),
    ('model.base=my"model"', "quote the whole value"),
    ('model.base="my"model', "unexpected 'm' after the value of model.base"),
    ("data.files=[a.csv b.csv]", "has a space; quote it or add the missing comma"),
    ("data.files=[a.csv, b.csv", r"unclosed \["),
    ("data.files=[a.csv,,b.csv]", "empty list element"),
    ("data.files=[[a.csv]]", "lists do not nest"),
    ("data.group_column=[a, b]", "expected a string"),
    ("train=1 train.epochs=2", "train was set to a value, not a section"),
])
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_mlproject_overrides_string_with_spaces_and_quotes():
    """One `-P overrides=...` string, quoted into the MLproject command the way MLflow does."""
    overrides = ('train.epochs=2 generate.prompts_file="my prompts.jsonl" '
                 "model.base='/models/a \"judge\" model' data.files=a.csv,b.csv")
    mlproject = yaml.safe_load((Path(__file__).parents[1] / "MLproject").read_text())
    command = mlproject["entry_points"]["finetune"]["command"].format(
        recipe="experiments/cpu-smollm2.yaml", data="out", overrides=shlex.quote(overrides))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.overrides == [overrides]
    recipe = load_recipe(None, args.overrides)
    assert recipe.generate.prompts_file == "my prompts.jsonl"
    assert recipe.model.base == '/models/a "judge" model'
    assert recipe.train.epochs == 2.0 and recipe.data.files == ["a.csv", "b.csv"]


def test_list_elements_may_hold_commas():
    recipe = load_recipe(None, ['data.files=[a.csv, "b,c.csv", \'d e.csv\']',
                                "generate.temperatures=[0.5,1]", "generate.modes=[]"])
    assert recipe.data.files == ["a.csv", "b,c.csv", "d e.csv"]
    assert recipe.generate.temperatures == [0.5, 1.0] and recipe.generate.modes == []
    assert load_recipe(None, ['data.files="b,c.csv"']).data.files == ["b,c.csv"]  # one quoted file
    assert load_recipe(None, ["data.files=b,c.csv"]).data.files == ["b", "c.csv"]  # bare: split


@pytest.mark.parametrize("value, expected", [
    ("none", None), ("null", None), ("NULL", None), ("", None),
    ('"none"', "none"), ("'none'", "none"), ('"null"', "null"), ('""', ""), ("prompt", "prompt"),
])
def test_quoted_none_is_a_string_for_optional_fields(value, expected):
    recipe = load_recipe(None, [f"data.group_column={value}"])
    assert recipe.data.group_column == expected


def test_bare_none_stays_a_string_for_plain_str_fields():
    assert load_recipe(None, ["quant.scheme=none"]).quant.scheme == "none"
    assert load_recipe(None, ['quant.scheme="none"']).quant.scheme == "none"


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_show_loads_back_to_the_same_recipe(path, tmp_path, capsys):
    overrides = ["train.epochs=2 data.files=[a.csv,b.csv] engine.quantization=fp8"]
    assert cli.main(["recipe", "show", str(path), "--set", *overrides]) == 0
    shown = capsys.readouterr().out
    (tmp_path / path.name).write_text(shown)
    again, expected = load_recipe(tmp_path / path.name), load_recipe(path, overrides)
    assert dataclasses.asdict(again) | {"path": None} == dataclasses.asdict(expected) | {"path": None}
    lines = shown.splitlines()
    keys = [n for n, line in enumerate(lines) if re.match(r"^\s*[a-z_0-9]+: ", line)]
    assert len(keys) == len(flatten(expected))  # every key, sections aside
    assert all(lines[n - 1].lstrip().startswith("# ") for n in keys)
    assert "  # Grouped cross-fitting folds (prompt groups, within sources) [>= 2]\n  folds: 5\n" in shown


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_say_why_not_what(path):
    """A key's meaning lives on its dataclass field; a recipe's comment says why the recipe sets it."""
    docs = {f.metadata["doc"].lower() for cls in [Recipe, *SECTIONS] for f in dataclasses.fields(cls) if "doc" in f.metadata}
    comments = {line.strip().lstrip("#").strip().rstrip(".").lower() for line in path.read_text().splitlines()
                if line.strip().startswith("#")}
    assert comments & docs == set()
