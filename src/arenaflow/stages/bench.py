"""`arenaflow bench`: every scoring engine timed on one model and prompt set (bench.py), or with `--train` the
training step, the project's against plain peft (bench_train.py); one MLflow run either way."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from ..bench import (BenchReport, DEFAULT_ENGINES, EngineFigures, card_peak_tflops, metric_prefix, parse_engine_spec,
                     run_bench, synthetic_lengths, synthetic_prompts)
from ..bench_train import prepare_train_bench, run_train_bench
from ..data import subsample
from ..hardware import card_name
from ..models import load_tokenizer, resolve_model
from ..prompts import PromptBuilder
from ..recipe import Recipe
from .datasets import evaluation_rows
from .registry import local_reference
from .runs import stage_run


def run(recipe: Recipe, model: str = "", rows: int = 64, engines: str = "", synthetic: str = "", warmup: int = 8,
          train: str | bool = False, variants: str = "", steps: int = 10, warmup_steps: int = 2):
    """Time every scoring engine on one model and one prompt set (see bench.py), or with `train` training
    steps, the project's against plain peft (bench_train.py); one MLflow run."""
    model = local_reference(model or recipe.model.base, recipe)
    if str(train).lower() != "true":
        return _engines(recipe, model=model, rows=rows, engines=engines, synthetic=synthetic, warmup=warmup)
    setup = prepare_train_bench(recipe, model, variants, rows=rows, steps=steps, warmup_steps=warmup_steps,
                                synthetic=synthetic_lengths(synthetic) if synthetic else None)
    with stage_run(recipe, "bench", model=setup.reference, precision="train") as run:
        mlflow.set_tags({"bench_mode": "train", "bench_model_note": f"{setup.reference}; {setup.rows.note}",
                         "bench_variants": ",".join(v.label for v in setup.variants)})

        def log_variant(fig) -> None:  # as each variant ends: a killed bench keeps these
            mlflow.log_metrics(fig.metrics())
            mlflow.set_tag(f"{metric_prefix(fig.label)}_settings", fig.settings)
            if fig.error:
                mlflow.set_tag(f"{metric_prefix(fig.label)}_error", fig.error[:4000])

        report = run_train_bench(setup, peak_tflops=card_peak_tflops(card_name()), on_variant=log_variant)
        mlflow.set_tag("card", report.card)
        mlflow.log_metrics(report.metrics())
        table = report.table()
        mlflow.log_text(table + "\n", "bench_train.txt")
        print(table)
        print(f"(MLflow run {run.info.run_id})")
        return report


def _engines(recipe: Recipe, model: str = "", rows: int = 64, engines: str = "", synthetic: str = "",
                warmup: int = 8) -> BenchReport:
    """Every scoring engine on one model and prompt set: one MLflow run, metrics per engine, the table printed and logged."""
    specs = [parse_engine_spec(s) for s in (engines.split(",") if engines.strip() else DEFAULT_ENGINES)]
    reference = model or recipe.model.base
    checkpoint, note = resolve_model(reference), reference
    tokenizer = load_tokenizer(checkpoint, recipe.model.trust_remote_code)
    builder = PromptBuilder(tokenizer, recipe.prompt)
    labels = None
    if synthetic:
        n, lo, hi = synthetic_lengths(synthetic)
        prompts = synthetic_prompts(n, lo, hi, len(tokenizer), builder.suffix, seed=1)
        warm = synthetic_prompts(warmup, lo, hi, len(tokenizer), builder.suffix, seed=2) if warmup else None
        data_note = f"{n} synthetic prompts of {lo}-{hi} tokens"
    else:
        _, valid = evaluation_rows(recipe, "")
        chosen = subsample(valid, rows, recipe.data.seed)
        prompts = builder.build_rows(chosen)
        labels = chosen["label"].to_numpy() if (chosen["label"] >= 0).all() else None
        others = valid.drop(chosen.index)
        if warmup and len(others):
            warm = builder.build_rows(subsample(others, warmup, recipe.data.seed))
        elif warmup:  # every row is timed: warm up on random prompts of the same lengths instead
            lengths = sorted(len(p) for p in prompts)
            warm = synthetic_prompts(warmup, lengths[0], lengths[-1], len(tokenizer), builder.suffix, seed=2)
        else:
            warm = None
        data_note = f"{len(prompts)} real valid rows (prompt builder, max_length {recipe.prompt.max_length})"
    with stage_run(recipe, "bench", model=reference, precision=recipe.engine.dtype) as run:
        mlflow.set_tags({"bench_model_note": f"{note}; {data_note}", "bench_engines": ",".join(s.label for s in specs)})

        def log_engine(fig: EngineFigures) -> None:  # as each engine finishes: a killed bench keeps these
            mlflow.log_metrics(fig.metrics())
            if fig.error:
                mlflow.set_tag(f"{metric_prefix(fig.label)}_error", fig.error[:4000])

        report = run_bench(checkpoint, prompts, specs, recipe.engine, warmup_prompts=warm, labels=labels,
                           max_model_len=recipe.engine.max_model_len, model_note=f"{note}; {data_note}",
                           trust_remote_code=recipe.model.trust_remote_code, on_engine=log_engine)
        mlflow.set_tags({"card": report.card, "bench_reference": report.reference})
        metrics = {"matmul_tflops": report.matmul_tflops, "matmul_burst_tflops": report.matmul_burst_tflops,
                   "params": float(report.params),
                   "rows": float(report.rows), "prompt_tokens": float(report.prompt_tokens)}
        if report.peak_tflops:
            metrics["peak_tflops"] = report.peak_tflops
        for fig in report.engines:  # again, now with max_prob_diff against the reference engine
            metrics.update(fig.metrics())
        mlflow.log_metrics(metrics)
        table = report.table()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "bench.txt").write_text(table + "\n")
            mlflow.log_artifact(str(Path(tmp) / "bench.txt"))
        print(table)
        print(f"(MLflow run {run.info.run_id})")
        return report
