"""What a step of `main` depends on, as digests: the recipe sections it reads (resolved, after overrides),
the content of its input files, the identities of the steps before it, and the code version. Two runs
of a step with the same identity do the same work, so `main` reuses a finished one.

The code version is the commit plus a digest of the uncommitted changes under `src/` (how people
iterate), so an edit of the code re-runs everything, and an edit of a recipe value re-runs the stage
that reads it and those after it, not those before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from pathlib import Path

from .recipe import Recipe
from .shards import digest

# The recipe sections each stage reads. `name` is left out on purpose: it names, it changes no work.
STAGE_SECTIONS = {
    "datagen": ("data", "generate"),
    "finetune": ("data", "model", "prompt", "train", "engine"),
    "quantize": ("data", "model", "prompt", "train", "quant", "calibration", "engine", "registry"),
    "evaluate": ("data", "prompt", "train", "calibration", "engine", "registry"),
    "promote": ("registry",),
    "infer": ("prompt", "engine", "registry"),
}
# datagen with generate.modes beyond ingest also runs models (responses, the teacher's labels).
GENERATING_SECTIONS = ("model", "prompt", "engine")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes ('missing' for a file that is not there: the step will say so itself)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def code_version(root: Path | None = None) -> str:
    """`<commit>` or `<commit>+<digest of the uncommitted changes under src/>`; 'unknown' outside git."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changes = git("diff", "HEAD", "--", "src")
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "src").split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not changes and not untracked:
        return commit
    extra = [changes] + [f"{name}:{file_digest(root / name)}" for name in sorted(untracked)]
    return f"{commit}+{digest(extra)[:12]}"


def step_inputs(stage: str, recipe: Recipe, *, upstream: dict[str, str] | None = None,
                files: list[str | Path] = (), code: str = "", extra: dict | None = None) -> dict[str, str]:
    """{component: digest} of what `stage` depends on (`STAGE_SECTIONS`, the files' bytes, the upstream
    steps' identities, the code version, anything else the caller names in `extra`)."""
    sections = list(STAGE_SECTIONS[stage])
    if stage == "datagen" and set(recipe.generate.modes) != {"ingest"}:
        sections += GENERATING_SECTIONS
    inputs = {f"recipe.{s}": digest(dataclasses.asdict(getattr(recipe, s))) for s in sections}
    inputs.update({f"file:{f}": file_digest(Path(f)) for f in files})
    inputs.update({f"step:{name}": key for name, key in (upstream or {}).items()})
    inputs.update({k: digest(v) for k, v in (extra or {}).items()})
    inputs["code"] = code
    return inputs


def step_key(inputs: dict[str, str]) -> str:
    return digest(inputs)[:32]


def changed(inputs: dict[str, str], before: dict[str, str]) -> list[str]:
    """The components whose digest differs from an earlier run's (new or gone ones too)."""
    return sorted(k for k in set(inputs) | set(before) if inputs.get(k) != before.get(k))
