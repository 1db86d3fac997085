"""Text cleaning for generated data: normalisation, length/language filters, exact and near-duplicates."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


def normalize(text: str) -> str:
    """Lower-cased NFKC text with every run of non-alphanumerics collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def row_text(turns: Sequence[str | None]) -> str:
    return "\n".join(t for t in turns if t)


def shingles(text: str, size: int) -> frozenset[str]:
    """Character shingles of normalised text; a text shorter than `size` is one shingle."""
    if len(text) <= size:
        return frozenset([text])
    return frozenset(text[i:i + size] for i in range(len(text) - size + 1))


def ascii_share(text: str) -> float:
    """Share of ASCII characters among the letters (1.0 with no letters: code, numbers)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def _dedup_text(rows: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [normalize("\n\n".join(row_text(turns) for turns in parts)) for parts in zip(*(rows[c] for c in columns))]


def dedup_rows(rows: pd.DataFrame, threshold: float | None, shingle_size: int = 5,
               seen: Sequence[str] = (), columns: Sequence[str] = ("prompt",),
               within: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop rows whose normalised text (of `columns`) equals an earlier row's or one in `seen`
    (exact), or whose shingle Jaccard with one of them is >= `threshold` (near; None: exact only).
    `within=False` compares rows with `seen` only, not with each other.

    Deterministic: rows are visited in order and the first of a cluster is kept. Candidates come from
    an inverted shingle index, so the cost grows with shared shingles, not with n squared.
    """
    texts = _dedup_text(rows, columns)
    seen_norm = [normalize(s) for s in seen]
    exact_seen = set(seen_norm)
    near = threshold is not None and threshold <= 1.0
    index: dict[str, list[int]] = {}
    kept_sets: list[frozenset[str]] = []

    def add(sh: frozenset[str]) -> None:
        kept_sets.append(sh)
        for s in sh:
            index.setdefault(s, []).append(len(kept_sets) - 1)

    def is_near(sh: frozenset[str]) -> bool:
        shared = Counter(j for s in sh for j in index.get(s, ()))
        return any(inter / (len(sh) + len(kept_sets[j]) - inter) >= threshold for j, inter in shared.items())

    if near:
        for text in dict.fromkeys(seen_norm):
            add(shingles(text, shingle_size))
    keep = np.zeros(len(rows), dtype=bool)
    counts = {"exact": 0, "near": 0}
    for i, text in enumerate(texts):
        if text in exact_seen:
            counts["exact"] += 1
            continue
        if near:
            sh = shingles(text, shingle_size)
            if is_near(sh):
                counts["near"] += 1
                continue
            if within:
                add(sh)
        if within:
            exact_seen.add(text)
        keep[i] = True
    return rows[keep], counts


@dataclass
class FilterBounds:
    min_prompt_chars: int = 0
    max_prompt_chars: int | None = None
    min_response_chars: int = 0
    max_response_chars: int | None = None
    min_ascii_share: float = 0.0

    @classmethod
    def of(cls, generate) -> FilterBounds:
        return cls(**{f.name: getattr(generate, f.name) for f in dataclasses.fields(cls)})


def filter_rows(rows: pd.DataFrame, bounds: FilterBounds) -> tuple[pd.DataFrame, dict[str, int]]:
    """Length and language filters on the text columns present (prompt; response_a/b if any).

    A row is counted under the first rule it fails: prompt_short, prompt_long, response_short,
    response_long, non_ascii, identical_responses.
    """
    responses = [c for c in ("response_a", "response_b") if c in rows.columns]
    counts = dict.fromkeys(("prompt_short", "prompt_long", "response_short", "response_long", "non_ascii",
                            "identical_responses"), 0)
    keep = np.ones(len(rows), dtype=bool)
    for i, row in enumerate(rows[["prompt", *responses]].itertuples(index=False)):
        prompt, *answers = (row_text(turns) for turns in row)
        lengths = [len(a) for a in answers]
        checks = (
            ("prompt_short", len(prompt) < bounds.min_prompt_chars),
            ("prompt_long", bounds.max_prompt_chars is not None and len(prompt) > bounds.max_prompt_chars),
            ("response_short", any(n < bounds.min_response_chars for n in lengths)),
            ("response_long", bounds.max_response_chars is not None and any(n > bounds.max_response_chars for n in lengths)),
            ("non_ascii", any(ascii_share(t) < bounds.min_ascii_share for t in (prompt, *answers))),
            ("identical_responses", len(answers) == 2 and normalize(answers[0]) == normalize(answers[1])),
        )
        failed = next((name for name, bad in checks if bad), None)
        if failed:
            counts[failed] += 1
            keep[i] = False
    if not responses:  # a prompt pool: response rules do not apply
        counts = {k: v for k, v in counts.items() if k.startswith("prompt") or k == "non_ascii"}
    return rows[keep], counts

