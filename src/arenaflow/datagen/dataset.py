"""Every mode of `generate.modes` in order -> train/valid rows (`build_dataset`), their metrics and output files;
stages/datagen.py runs it in an MLflow run."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import data as data_mod
from ..data import CANONICAL, SOFT_COLUMNS, TEXT_COLUMNS
from ..models import ModelRef, local_model_ref
from ..recipe import GenerateConfig, Recipe, check_section
from . import DatagenError
from .clean import FilterBounds, dedup_rows, filter_rows, row_text
from .engines import Engines
from .label import Teacher, apply_teacher, label_with_teacher, teacher_from, unlabelled
from .respond import generate_rows, prompt_pool, read_prompts_file


@dataclass
class GeneratedDataset:
    train: pd.DataFrame  # swap-augmented when data.swap_augment
    valid: pd.DataFrame
    generated: pd.DataFrame  # the generated rows (after filter/label), before augmentation
    counts: dict[str, float] = field(default_factory=dict)  # every count, logged as metrics
    speed: dict[str, float] = field(default_factory=dict)  # samples_per_s, generated_tokens_per_s, ...
    teacher: Teacher | None = None
    files: list[str] = field(default_factory=list)


def check_modes(generate: GenerateConfig) -> set[str]:
    """The modes to run; RecipeError for an unknown one (a section built in code), DatagenError for none."""
    check_section(generate)
    modes = generate.modes
    if not modes:
        raise DatagenError("generate.modes is empty; e.g. [ingest] or [ingest, respond, label, dedup, filter]")
    return set(modes)


def _clean(rows: pd.DataFrame, modes: set[str], recipe: Recipe, counts: dict, prefix: str,
           columns: Sequence[str], seen: Sequence[str] = ()) -> pd.DataFrame:
    g = recipe.generate
    if "filter" in modes:
        rows, found = filter_rows(rows, FilterBounds.of(g))
        counts.update({f"{prefix}_filtered_{k}": v for k, v in found.items()})
    if "dedup" in modes:
        rows, found = dedup_rows(rows, g.dedup_threshold, g.shingle_size, seen=seen, columns=columns)
        counts.update({f"{prefix}_dedup_{k}": v for k, v in found.items()})
    return rows



def build_dataset(recipe: Recipe, files: Sequence[str | Path] | None = None, *,
                  engines: Mapping[str | Path, object] | None = None, progress: bool = True,
                  teacher_of: Callable[[Recipe], Teacher] | None = None,
                  resolve: Callable[[str], ModelRef] = local_model_ref) -> GeneratedDataset:
    """Every mode of `recipe.generate.modes` (see the module doc) -> train/valid canonical rows.

    `engines` maps checkpoint dirs to already started Scorers to use (never closed here); `teacher_of(recipe)`
    resolves `generate.teacher` for label and `resolve(reference)` the generators of respond (the stage's read
    the registry; without teacher_of the teacher is `generate.teacher` through `resolve`). No MLflow here."""
    g, d = recipe.generate, recipe.data
    modes = check_modes(g)
    files = [str(f) for f in (files or d.files)]
    counts: dict[str, float] = {}
    speed: dict[str, float] = {}
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in CANONICAL})
    real = train_real = valid_real = None
    if "ingest" in modes or ("respond" in modes and not g.prompts_file):
        real, ingested = data_mod.ingest(files, d.group_column, d.max_rows, d.seed)
        counts.update(ingested)
    if "ingest" in modes:
        if "respond" not in modes:
            real = _clean(real, modes, recipe, counts, "rows", TEXT_COLUMNS)
        train_real, valid_real = data_mod.split_rows(real, d.valid_fraction, d.seed, d.valid_files)
        counts.update(rows_train=len(train_real), rows_valid=len(valid_real))

    generated = empty.iloc[0:0].copy()
    teacher = None
    with Engines(engines, recipe.model.trust_remote_code) as pool_engines:
        if "respond" in modes:
            pool = read_prompts_file(g.prompts_file) if g.prompts_file else \
                prompt_pool(train_real if train_real is not None else real)
            counts["prompts_distinct"] = len(pool)
            valid_prompts = [row_text(p) for p in prompt_pool(valid_real)["prompt"]] if valid_real is not None else []
            if valid_prompts:  # never generate for a prompt that validation holds
                pool, found = dedup_rows(pool, g.dedup_threshold if "dedup" in modes else None, g.shingle_size,
                                         seen=valid_prompts, within=False)
                counts["prompts_in_valid_dropped"] = found["exact"] + found["near"]
            pool = _clean(pool, modes, recipe, counts, "prompts", ("prompt",))
            pool = data_mod.subsample(pool, g.n_prompts, g.seed).reset_index(drop=True)
            counts["prompts_used"] = len(pool)
            if pool.empty:
                raise DatagenError("respond: no prompt left after the valid-overlap, filter and dedup steps "
                                   f"({ {k: v for k, v in counts.items() if k.startswith('prompts')} })")
            generated = generate_rows(recipe, pool, pool_engines, counts, speed, progress, resolve)
            if "filter" in modes:
                generated, found = filter_rows(generated, FilterBounds.of(g))
                counts.update({f"pairs_filtered_{k}": v for k, v in found.items()})
        if "label" in modes:
            parts = {"generated": generated, "train": train_real, "valid": valid_real}
            todo = {k: v for k, v in parts.items() if v is not None and len(v) and unlabelled(v).any()}
            counts["rows_to_label"] = sum(int(unlabelled(v).sum()) for v in todo.values())
            if todo:
                teacher = teacher_of(recipe) if teacher_of else teacher_from(resolve(g.teacher), g.teacher)
                stacked = pd.concat([v[unlabelled(v)] for v in todo.values()], ignore_index=True)
                probs = label_with_teacher(recipe, stacked, teacher, pool_engines, counts, speed, progress)
                offset = 0
                for name, part in todo.items():
                    mask = unlabelled(part)
                    n = int(mask.sum())
                    labelled, found = apply_teacher(part[mask], probs[offset:offset + n], g.confidence_threshold,
                                                    g.drop_unconfident)
                    offset += n
                    for k, v in found.items():
                        counts[k] = counts.get(k, 0) + v
                    merged = pd.concat([part[~mask], labelled]).sort_index()
                    if name == "generated":
                        generated = merged
                    elif name == "train":
                        train_real = merged
                    else:
                        valid_real = merged

    generated = generated.reset_index(drop=True)
    counts["rows_generated"] = len(generated)
    if train_real is not None:
        train = pd.concat([train_real, generated], ignore_index=True) if len(generated) else train_real
        valid = valid_real
    elif len(generated):
        train, valid = data_mod.grouped_split(generated, d.valid_fraction, d.seed)
    else:
        raise DatagenError(f"generate.modes={sorted(modes)} produced no rows (add ingest or respond)")
    counts.update(rows_train_total=len(train), rows_valid_total=len(valid))
    if d.swap_augment:
        train = pd.concat([train, data_mod.swap_ab(train)], ignore_index=True)
    counts["rows_train_augmented"] = len(train)
    order = lambda f: f[list(CANONICAL) + [c for c in f.columns if c not in CANONICAL]].reset_index(drop=True)  # noqa: E731
    return GeneratedDataset(order(train), order(valid), generated, counts, speed, teacher, files)


# ---------------------------------------------------------------------------------------------
# outputs

def sample_records(rows: pd.DataFrame, n: int) -> list[dict]:
    columns = [c for c in ("id", "model_a", "model_b", *TEXT_COLUMNS, "label", *SOFT_COLUMNS) if c in rows.columns]
    records = []
    for record in rows.head(n)[columns].to_dict("records"):
        records.append({k: (list(v) if isinstance(v, (list, np.ndarray)) else
                            None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
                        for k, v in record.items()})
    return records


def samples_html(records: list[dict], title: str) -> str:
    if not records:
        return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><p>no rows</p>\n"
    columns = list(records[0])

    def cell(v) -> str:
        text = "\n---\n".join(t or "" for t in v) if isinstance(v, list) else ("" if v is None else str(v))
        return f"<td><pre>{html.escape(text)}</pre></td>"

    body = "".join("<tr>" + "".join(cell(r[c]) for c in columns) + "</tr>\n" for r in records)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>td,th{border:1px solid #ccc;vertical-align:top}pre{white-space:pre-wrap;max-width:40em}</style>"
            f"<table><tr>{head}</tr>\n{body}</table>\n")


def dataset_metrics(dataset: GeneratedDataset) -> dict[str, float]:
    """Counts, per-source row counts, label distributions and speeds, as MLflow metrics."""
    metrics = {k: float(v) for k, v in dataset.counts.items()}
    for split, rows in (("train", dataset.train), ("valid", dataset.valid)):
        for source, n in rows["source"].value_counts().sort_index().items():
            metrics[f"rows_{split}.{source}"] = float(n)
        if (rows["label"] >= 0).any():
            metrics.update({f"{split}_{k}": v for k, v in data_mod.label_distribution(rows).items()})
    gen = dataset.generated
    if len(gen):
        if (gen["label"] >= 0).any():
            metrics.update({f"generated_{k}": v for k, v in data_mod.label_distribution(gen).items()})
        soft = gen[list(SOFT_COLUMNS)].to_numpy(dtype=float)
        if np.isfinite(soft).all():
            metrics.update({f"generated_mean_{c}": float(m) for c, m in zip(SOFT_COLUMNS, soft.mean(axis=0))})
    metrics.update(dataset.speed)
    return metrics


def write_outputs(dataset: GeneratedDataset, out: Path, sample_rows: int = 8) -> list[Path]:
    """train/valid/generated parquet (data/) and generated sample rows (samples/) under `out`."""
    written = [data_mod.write_parquet(dataset.train, out / "data" / "train.parquet"),
               data_mod.write_parquet(dataset.valid, out / "data" / "valid.parquet")]
    if len(dataset.generated):
        written.append(data_mod.write_parquet(dataset.generated, out / "data" / "generated.parquet"))
        records = sample_records(dataset.generated, sample_rows)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        jsonl = out / "samples" / "samples.jsonl"
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        page = out / "samples" / "samples.html"
        page.write_text(samples_html(records, "arenaflow generated rows"), encoding="utf-8")
        written += [jsonl, page]
    return written
