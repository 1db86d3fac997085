import re
from pathlib import Path

import pytest

from arenaflow.recipe import Recipe, RecipeError, flatten, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"cpu-smollm2", "kaggle-2xt4-34b"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
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
])
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
