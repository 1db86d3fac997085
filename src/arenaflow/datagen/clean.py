"""Text cleaning for generated data: normalisation, length/language filters, exact and near-duplicates."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
import zlib
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


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


# Permutations per MinHash. 128 gives 32 bands of 4 rows at threshold 0.8 (see lsh_bands): a pair at 0.8 is
# missed with chance 5e-8, and a row among 50k English prompts meets ~6 candidates (~2 after a size check).
# 256 would cut chance candidates further (6-row bands) but double the hashing, already most of the time.
MINHASH_PERM = 128
MINHASH_SEED = 1  # fixed permutations: the same rows are dropped on every run and machine
LSH_MISS = 1e-6  # at most this chance that LSH misses a pair whose Jaccard is exactly the threshold


def lsh_bands(threshold: float, num_perm: int = MINHASH_PERM, miss: float = LSH_MISS) -> tuple[int, int] | None:
    """(bands, rows per band) for a MinHash LSH at `threshold`: the most rows per band (the fewest chance
    candidates to confirm) whose chance of missing a pair of Jaccard `threshold`, (1 - t**r)**b with
    b = num_perm // r, is at most `miss`; a more similar pair is missed even less often. None when no
    split reaches it (a threshold under about 0.1 with 128 permutations).

    0.8 -> (32, 4): a pair at 0.8 is missed with chance 5e-8, one at 0.3 is a candidate with chance 0.23,
    one at 0.05 (a typical pair of unrelated English prompts) with chance 2e-4."""
    if not 0.0 < threshold <= 1.0:
        return None
    best = None
    for r in range(1, num_perm // 2 + 1):  # MinHashLSH wants at least 2 bands
        b = num_perm // r
        if (1.0 - threshold ** r) ** b <= miss:
            best = (b, r)
    return best


class _NearIndex:
    """Kept shingle sets; `near(sh)`: is the shingle Jaccard with one of them >= threshold?

    Candidates come from a MinHash LSH (datasketch; fixed seed, banding from `lsh_bands`), each confirmed
    with the exact Jaccard, so nothing under the threshold is ever dropped; a pair at or above it is missed
    only when it shares no LSH band (chance <= LSH_MISS). Memory: the kept texts and their LSH keys, not
    their shingle sets (a candidate's set is rebuilt from its text). A threshold too low for LSH
    (lsh_bands is None) falls back to an exact inverted shingle index, whose cost grows with n squared."""

    def __init__(self, threshold: float, shingle_size: int):
        self.threshold, self.size = threshold, shingle_size
        self.texts: list[str] = []
        self.lengths: list[int] = []  # shingle-set sizes: Jaccard <= min/max size skips a candidate unbuilt
        bands = lsh_bands(threshold)
        if bands is None:
            self.sets: list[frozenset[str]] = []
            self.index: dict[str, list[int]] = {}
            self.lsh = None
        else:
            from datasketch import MinHash, MinHashLSH
            self.lsh = MinHashLSH(num_perm=MINHASH_PERM, params=bands)
            self.template = MinHash(num_perm=MINHASH_PERM, seed=MINHASH_SEED, hashfunc=zlib.crc32)

    def _minhash(self, sh: frozenset[str]):
        m = self.template.copy()
        m.update_batch([s.encode("utf-8") for s in sh])
        return m

    def add(self, text: str, sh: frozenset[str], minhash=None) -> None:
        key = len(self.texts)
        self.texts.append(text)
        self.lengths.append(len(sh))
        if self.lsh is None:
            self.sets.append(sh)
            for s in sh:
                self.index.setdefault(s, []).append(key)
        else:
            self.lsh.insert(key, minhash if minhash is not None else self._minhash(sh), check_duplication=False)

    def near(self, sh: frozenset[str]) -> tuple[bool, object]:
        """(is near, the MinHash of `sh` to pass on to `add`)."""
        if self.lsh is None:
            shared = Counter(j for s in sh for j in self.index.get(s, ()))
            return any(inter / (len(sh) + len(self.sets[j]) - inter) >= self.threshold
                       for j, inter in shared.items()), None
        minhash = self._minhash(sh)
        n = len(sh)
        for j in sorted(self.lsh.query(minhash)):
            m = self.lengths[j]
            if min(n, m) / max(n, m) < self.threshold:  # Jaccard <= min/max size: cannot reach it
                continue
            if jaccard(sh, shingles(self.texts[j], self.size)) >= self.threshold:
                return True, minhash
        return False, minhash


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

    Deterministic: rows are visited in order and the first of a cluster is kept (a row is compared with
    the kept rows and `seen`, not with dropped rows). Near-duplicate candidates come from a MinHash LSH
    and are confirmed with the exact Jaccard (see _NearIndex): no row under the threshold is dropped,
    and the cost grows about linearly with the rows, not with n squared.
    """
    texts = _dedup_text(rows, columns)
    seen_norm = [normalize(s) for s in seen]
    exact_seen = set(seen_norm)
    near = threshold is not None and threshold <= 1.0
    index = _NearIndex(threshold, shingle_size) if near else None
    if near:
        for text in dict.fromkeys(seen_norm):
            index.add(text, shingles(text, shingle_size))
    keep = np.zeros(len(rows), dtype=bool)
    counts = {"exact": 0, "near": 0}
    for i, text in enumerate(texts):
        if text in exact_seen:
            counts["exact"] += 1
            continue
        if near:
            sh = shingles(text, shingle_size)
            is_near, minhash = index.near(sh)
            if is_near:
                counts["near"] += 1
                continue
            if within:
                index.add(text, sh, minhash)
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

