"""`arenaflow <verb>`: one verb per pipeline stage; MLproject entry points call these."""

from __future__ import annotations

import argparse
import sys

from .recipe import RecipeError, load_recipe

DEFAULT_RECIPE = "experiments/cpu-smollm2.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe under experiments/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override recipe keys (repeatable; space-separated pairs also accepted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arenaflow", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("datagen", help="ingest labelled files -> train/valid parquet (MLflow dataset)")
    _common(p)
    p.add_argument("--input", default="", help="one file (csv/parquet/jsonl) instead of the recipe's data.files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import pipeline
    from .data import DataError
    from .models import ModelError
    from .prompts import PromptError
    from .registry import RegistryError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        handler = getattr(pipeline, args.verb)
        kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "recipe", "overrides")}
        handler(recipe, **kwargs)
    except (RecipeError, DataError, ModelError, PromptError, RegistryError, FileNotFoundError) as err:
        print(f"arenaflow {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
