"""Near-duplicates by MinHash LSH (datasketch) against an exact brute-force Jaccard reference, on real text."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from arenaflow.datagen import clean

DATA = Path(__file__).resolve().parents[1] / "data"


def real_texts(n: int) -> list[str]:
    """n distinct real English texts from the bundled CSVs: every prompt, then responses."""
    out: dict[str, None] = {}
    frames = [pd.read_csv(DATA / f) for f in ("pandalm_test.csv", "mtbench_human_turn1.csv")]
    for column in ("prompt", "response_a"):
        for frame in frames:
            for value in frame[column]:
                text = "\n".join(json.loads(value))
                if len(clean.normalize(text)) >= 30:
                    out.setdefault(text, None)
    assert len(out) >= n
    return list(out)[:n]


def edit(text: str, rng: random.Random, k: int) -> str:
    words = text.split(" ")
    for _ in range(k):
        i = rng.randrange(len(words))
        if rng.random() < 0.5:
            del words[i]
        else:
            words.insert(i, rng.choice(["kindly", "really", "now", "the"]))
    return " ".join(words)


def planted(n_real: int = 200, n_near: int = 60, n_exact: int = 15, seed: int = 0) -> list[str]:
    """Real texts with near-duplicates (1 to 12 words edited: some stay above 0.8, some fall under it)
    and exact ones (upper-cased, punctuation added) inserted after their source."""
    rng = random.Random(seed)
    texts = real_texts(n_real)
    for _ in range(n_near):
        j = rng.randrange(len(texts))
        texts.insert(rng.randint(j + 1, len(texts)), edit(texts[j], rng, rng.choice([1, 1, 2, 2, 3, 4, 8, 12])))
    for _ in range(n_exact):
        j = rng.randrange(len(texts))
        texts.insert(rng.randint(j + 1, len(texts)), texts[j].upper() + " !!")
    return texts


def reference(texts: list[str], threshold: float, size: int = 5, seen: tuple[str, ...] = (),
              within: bool = True) -> tuple[list[int], dict[str, int]]:
    """Every row against every kept row and `seen` text, exact Jaccard, first of a cluster kept."""
    def sh(t: str) -> set[str]:
        return {t[i:i + size] for i in range(max(1, len(t) - size + 1))}

    seen_norm = [clean.normalize(s) for s in seen]
    exact = set(seen_norm)
    kept_sets = [sh(s) for s in dict.fromkeys(seen_norm)]
    keep, counts = [], {"exact": 0, "near": 0}
    for i, text in enumerate(clean.normalize(t) for t in texts):
        if text in exact:
            counts["exact"] += 1
            continue
        mine = sh(text)
        if any((common := len(mine & k)) / (len(mine) + len(k) - common) >= threshold for k in kept_sets):
            counts["near"] += 1
            continue
        if within:
            kept_sets.append(mine)
            exact.add(text)
        keep.append(i)
    return keep, counts


def frame(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [[t] for t in texts]})


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return planted()


@pytest.mark.parametrize("threshold", [0.7, 0.8, 0.9])
def test_lsh_drops_the_same_rows_as_brute_force(texts, threshold):
    keep, counts = reference(texts, threshold)
    # the planted duplicates are found, and some edited copies fall under the threshold (kept):
    # both sides of it are checked
    assert counts["exact"] >= 10 and 10 <= counts["near"] < 60
    kept, found = clean.dedup_rows(frame(texts), threshold, 5)
    assert found == counts
    assert list(kept.index) == keep


def test_seen_and_within_false_match_brute_force(texts):
    seen = tuple(texts[:150])
    rows = texts[100:]
    for within in (True, False):
        keep, counts = reference(rows, 0.8, seen=seen, within=within)
        kept, found = clean.dedup_rows(frame(rows), 0.8, 5, seen=seen, within=within)
        assert found == counts and list(kept.index) == keep
        assert counts["exact"] >= 50  # the 50 rows that are in `seen`


def test_candidates_are_confirmed_with_the_exact_jaccard(texts, monkeypatch):
    """An LSH that returns every kept row as a candidate drops nothing more: the threshold means
    the exact shingle Jaccard, not the MinHash estimate."""
    import datasketch

    def every_key(self, minhash):
        return list(self.keys.keys())

    monkeypatch.setattr(datasketch.MinHashLSH, "query", every_key)
    keep, counts = reference(texts[:200], 0.6)
    kept, found = clean.dedup_rows(frame(texts[:200]), 0.6, 5)
    assert found == counts and list(kept.index) == keep


def test_low_threshold_falls_back_to_the_exact_index(texts):
    assert clean.lsh_bands(0.05) is None and clean.lsh_bands(0.0) is None
    keep, counts = reference(texts[:120], 0.05)
    kept, found = clean.dedup_rows(frame(texts[:120]), 0.05, 5)
    assert found == counts and list(kept.index) == keep
    assert counts["near"] > 10


def test_lsh_bands_bound_the_miss_chance():
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0):
        b, r = clean.lsh_bands(threshold)
        assert b * r <= clean.MINHASH_PERM and b >= 2
        assert (1 - threshold ** r) ** b <= clean.LSH_MISS
        if r < clean.MINHASH_PERM // 2:  # one more row per band would miss more than LSH_MISS
            assert (1 - threshold ** (r + 1)) ** (clean.MINHASH_PERM // (r + 1)) > clean.LSH_MISS
    assert clean.lsh_bands(0.8) == (32, 4)


def test_deterministic_in_process_and_across_hash_seeds(texts):
    rows = frame(texts)
    first = clean.dedup_rows(rows, 0.8, 5)
    second = clean.dedup_rows(rows, 0.8, 5)
    assert list(first[0].index) == list(second[0].index) and first[1] == second[1]
    # MinHash values do not depend on Python's per-process str hash (shingles are hashed with crc32)
    code = ("from arenaflow.datagen import clean; i = clean._NearIndex(0.8, 5); "
            "print(i._minhash(clean.shingles(clean.normalize(%r), 5)).hashvalues.tolist())" % texts[0])
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another str hash than this process's
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
    here = clean._NearIndex(0.8, 5)._minhash(clean.shingles(clean.normalize(texts[0]), 5)).hashvalues.tolist()
    assert there == f"{here}\n" and len(here) == clean.MINHASH_PERM
