"""Resumable work in shards: each shard's result is written atomically (temp file + rename) under a
folder named by the hash of everything the results depend on (the manifest), so a killed run started
again computes only the missing shards and never mixes results of other inputs or settings in."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path


def digest(value) -> str:
    """sha256 of a JSON-able value (keys sorted), stable across processes (Python's hash() is salted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a file exists under its name only once complete


def run_shards(root: Path, manifest: dict, n: int, size: int, compute: Callable[[int, int], dict],
               desc: str, progress: bool = True) -> tuple[list[dict], list[int]]:
    """Split range(n) into shards of `size`; compute the missing ones (each saved atomically as JSON
    under `root/<hash of manifest>/`); return every shard's result in order and the shards computed now."""
    from tqdm.auto import tqdm

    folder = root / digest(manifest)[:20]
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
    paths = [folder / f"shard_{k:05d}.json" for k in range(math.ceil(n / max(size, 1)))]
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    for k in tqdm(todo, desc=desc, unit="shard", disable=not (progress and todo)):
        result = compute(k * size, min(n, (k + 1) * size))
        write_atomically(paths[k], json.dumps(result, ensure_ascii=False))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths], todo

