"""`arenaflow <verb>`: one verb per pipeline stage; MLproject entry points call these."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ArenaflowError
from .metrics import ROWS_KAGGLE_TEST
from .recipe import load_recipe, show

DEFAULT_RECIPE = "experiments/cpu-smollm2.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe under experiments/")
    _overrides(parser)


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override recipe keys (repeatable; space-separated pairs also accepted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arenaflow", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("datagen", help="ingest labelled files (+ LLM-generated, teacher-labelled pairs per "
                         "generate.modes) -> train/valid parquet (MLflow dataset)")
    _common(p)
    p.add_argument("--input", default="", help="one file (csv/parquet/jsonl) instead of the recipe's data.files")
    p.add_argument("--prompts-file", default="", help="prompts for generate.modes respond (jsonl/csv, `prompt` column); "
                   "default: the recipe's generate.prompts_file, else the ingested train prompts")

    p = verbs.add_parser("finetune", help="QLoRA / LoRA on the answer token; logs the adapter")
    _common(p)
    p.add_argument("--data", default="", help="datagen output (runs:/<id>/data or a folder); default: split the recipe's files")

    p = verbs.add_parser("quantize", help="merge the adapter, AWQ-quantize, evaluate both, register a version")
    _common(p)
    p.add_argument("--adapter", required=True, help="finetune output (runs:/<id>/adapter or a folder)")
    p.add_argument("--data", default="", help="datagen output for calibration + validation rows")

    p = verbs.add_parser("evaluate", help="score labelled rows; log log_loss, plots, predictions")
    _common(p)
    p.add_argument("--input", default="", help="labelled file, or datagen output (runs:/<id>/data); default: the recipe's valid split")
    p.add_argument("--model", default="", help="checkpoint dir, runs:/, models:/name@alias, gguf:…, hub id; default: the champion")

    p = verbs.add_parser("promote", help="move the champion alias to a better version")
    _common(p)
    p.add_argument("--version", default="latest", help="candidate version number (default: the latest)")

    p = verbs.add_parser("infer", help="Kaggle submission from the champion (resumable)")
    _common(p)
    p.add_argument("--input", required=True, help="rows to score (csv/parquet/jsonl, Kaggle columns)")
    p.add_argument("--output", default="submission.csv", help="submission CSV to write")
    p.add_argument("--model", default="", help="default: models:/<registry.model_name>@<registry.alias>")

    p = verbs.add_parser("recipe", help="recipe tools (no MLflow run)")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("show", help="print the resolved recipe (after --set) as YAML, each key under its meaning")
    p.add_argument("file", help="YAML recipe, e.g. experiments/cpu-smollm2.yaml")
    _overrides(p)

    p = verbs.add_parser("ui", help="MLflow web UI over the tracking store (127.0.0.1; Ctrl-C stops it)")
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (0: a free one)")

    p = verbs.add_parser("main", help="datagen -> finetune -> quantize -> evaluate -> promote -> infer")
    _common(p)
    p.add_argument("--infer-input", default="data/sample_test.csv", help="rows the final infer step scores")

    p = verbs.add_parser("bench", help="time every scoring engine (or, with --train, training steps) on one model and one row set")
    _common(p)
    p.add_argument("--model", default="", help="checkpoint, gguf:…, tiny:llama, random:<arch> (e.g. random:llama-3-8b); default: the recipe's base")
    p.add_argument("--rows", type=int, default=64, help="real valid rows to score (ignored with --synthetic); "
                   "--train: held-out rows validated after training (synthetic ones too)")
    p.add_argument("--engines", default="", help="comma-separated [label=]backend[:key=value…] (default: all four backends)")
    p.add_argument("--synthetic", default="", metavar="N:LO-HI", help="N random-token prompts of LO-HI tokens instead of real rows "
                   "(--train: N training rows of LO-HI tokens with random labels)")
    p.add_argument("--warmup", type=int, default=8, help="untimed prompts (not in the timed set) per engine before timing")
    p.add_argument("--train", nargs="?", const="true", default="false", choices=("true", "false"),
                   help="time training steps instead: the project's finetune step against plain transformers + peft")
    p.add_argument("--variants", default="", help="--train: comma-separated peft-baseline, project, label=key=value[:key=value…] "
                   "(TrainConfig overrides of the project), label=peft-baseline:key=value (default: peft-baseline,project)")
    p.add_argument("--steps", type=int, default=10, help="--train: timed optimizer steps per variant")
    p.add_argument("--warmup-steps", type=int, default=2, help="--train: untimed optimizer steps per variant before timing")

    p = verbs.add_parser("plan", help="predict memory fit and wall time of a recipe on N GPUs")
    _common(p)
    p.add_argument("--rows", type=int, default=ROWS_KAGGLE_TEST, help="rows to score")
    p.add_argument("--gpu", default="T4", help="T4, L4, A100, A100-40GB, H100, H200")
    p.add_argument("--count", type=int, default=2, help="GPUs in the machine")
    p.add_argument("--model", default="", help="model reference (default: the recipe's base)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ArenaflowError, FileNotFoundError) as err:
        print(f"arenaflow {args.verb}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.verb == "ui":  # needs no recipe
        from .stages.ui import serve

        return serve(args.tracking_uri or None, port=args.port)
    if args.verb == "recipe":  # show
        print(show(load_recipe(args.file, args.overrides)), end="")
        return 0
    recipe = load_recipe(args.recipe, args.overrides)  # a typo fails here, before the slow imports below
    # verb -> stages.<verb>.run, imported now: the stages import mlflow and torch, `--help` should not wait
    stage = importlib.import_module(f"{__package__}.stages.{args.verb}")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "recipe", "overrides")}
    if args.verb == "main":
        kwargs["overrides"] = args.overrides  # handed down to every step
    stage.run(recipe, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
