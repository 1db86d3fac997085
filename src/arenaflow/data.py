"""Ingest Kaggle-format preference data into one canonical table; swap augmentation; grouped split.

Canonical columns (one row per input row, input order kept):
  id (str), source (file name), prompt / response_a / response_b (list of str|None, one per turn),
  label (0 = A wins, 1 = B wins, 2 = tie, -1 = unlabelled), p_a / p_b / p_tie (soft labels, NaN when
  absent), group (split key), swapped (bool), plus every extra input column as it came.
Bad input raises DataError naming the file, row and column; no row is ever dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ArenaflowError
from .recipe import Recipe

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
WINNER_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
SOFT_COLUMNS = ("p_a", "p_b", "p_tie")
SOFT_ALIASES = {"soft_a": "p_a", "soft_b": "p_b", "soft_tie": "p_tie"}
CANONICAL = ("id", "source", *TEXT_COLUMNS, "label", *SOFT_COLUMNS, "group", "swapped")
SOFT_SUM_TOLERANCE = 1e-3


class DataError(ArenaflowError, ValueError):
    """Input that cannot be ingested as it is; the message names file, row and column."""


def _where(path: Path, row: int | None = None, column: str | None = None, row_id=None) -> str:
    text = str(path)
    if row is not None:
        text += f", row {row + 1}"  # 1-based data row (the header is not a row)
        if row_id is not None:
            text += f" (id={row_id})"
    if column:
        text += f", column {column!r}"
    return text


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object per line")
        records.append(record)
    return pd.DataFrame.from_records(records)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a .csv / .parquet / .jsonl file as it is (no validation yet)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json"):
            frame = _read_jsonl(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (csv, parquet, jsonl)")
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:  # pandas reports offsets within a chunk: decode the whole file to locate the byte
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
        raise
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    return frame


def _turns(value, path: Path, row: int, column: str, row_id) -> list[str | None]:
    """A cell of a text column -> list of turns. CSV cells are JSON lists of strings (or nulls)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{_where(path, row, column, row_id)}: not a JSON list of strings ({err.msg})") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{_where(path, row, column, row_id)}: expected a non-empty list of strings, got {type(value).__name__}")
    for turn in value:
        if turn is not None and not isinstance(turn, str):
            raise DataError(f"{_where(path, row, column, row_id)}: turn {turn!r} is not a string or null")
    return value


def _number(value, path, row, column, row_id) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{_where(path, row, column, row_id)}: {value!r} is not a number") from None
    if not np.isfinite(number):
        raise DataError(f"{_where(path, row, column, row_id)}: {value!r} is not a finite number")
    return number


def canonicalize(frame: pd.DataFrame, path: Path, group_column: str | None = None) -> pd.DataFrame:
    """Validate a raw table and turn it into canonical columns (see module doc)."""
    frame = frame.rename(columns=SOFT_ALIASES)
    missing = [c for c in ("id", *TEXT_COLUMNS) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    present = [c for c in WINNER_COLUMNS if c in frame.columns]
    if present and len(present) != 3:
        raise DataError(f"{path}: label columns must be all of {list(WINNER_COLUMNS)}; found only {present}")
    soft_present = [c for c in SOFT_COLUMNS if c in frame.columns]
    if soft_present and len(soft_present) != 3:
        raise DataError(f"{path}: soft-label columns must be all of {list(SOFT_COLUMNS)}; found only {soft_present}")
    if group_column and group_column not in frame.columns:
        raise DataError(f"{path}: group column {group_column!r} not found")

    ids = frame["id"].astype(str)
    duplicated = ids[ids.duplicated(keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        rows = [int(i) + 1 for i in np.flatnonzero(ids.to_numpy() == first)]
        raise DataError(f"{path}: duplicate id {first!r} in rows {rows} (column 'id')")

    out = frame.copy()
    out["id"] = ids
    out["source"] = path.name
    for column in TEXT_COLUMNS:
        out[column] = [_turns(v, path, i, column, ids.iat[i]) for i, v in enumerate(frame[column])]

    labels = np.full(len(frame), -1, dtype=np.int64)
    if present:
        onehot = np.array([[_number(frame[c].iat[i], path, i, c, ids.iat[i]) for c in WINNER_COLUMNS]
                           for i in range(len(frame))])
        valid = np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1)
        if not valid.all():
            i = int(np.flatnonzero(~valid)[0])
            raise DataError(f"{_where(path, i, None, ids.iat[i])}, columns {list(WINNER_COLUMNS)}: "
                            f"labels must be one-hot (exactly one 1), got {onehot[i].tolist()}")
        labels = onehot.argmax(axis=1)
    out["label"] = labels

    for column in SOFT_COLUMNS:
        out[column] = (np.nan if not soft_present else
                       [_number(v, path, i, column, ids.iat[i]) for i, v in enumerate(frame[column])])
    if soft_present:
        soft = out[list(SOFT_COLUMNS)].to_numpy()
        bad = ((soft < 0) | (soft > 1)).any(axis=1) | (np.abs(soft.sum(axis=1) - 1) > SOFT_SUM_TOLERANCE)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{_where(path, i, None, ids.iat[i])}, columns {list(SOFT_COLUMNS)}: "
                            f"soft labels must be in [0, 1] and sum to 1, got {soft[i].tolist()}")

    keys = frame[group_column] if group_column else out["prompt"].map(json.dumps)
    out["group"] = path.name + ":" + keys.astype(str)  # astype: an empty frame's mapped column is float
    out["swapped"] = False
    return out[list(CANONICAL) + [c for c in out.columns if c not in CANONICAL]]


def load_rows(path: str | Path, group_column: str | None = None) -> pd.DataFrame:
    """Read and validate one file into canonical rows."""
    path = Path(path)
    return canonicalize(read_table(path), path, group_column)


def swap_ab(rows: pd.DataFrame) -> pd.DataFrame:
    """The same rows with responses A and B exchanged and their labels exchanged to match."""
    swapped = rows.copy()
    swapped["response_a"], swapped["response_b"] = rows["response_b"], rows["response_a"]
    swapped["p_a"], swapped["p_b"] = rows["p_b"], rows["p_a"]
    swapped["label"] = rows["label"].map({0: 1, 1: 0, 2: 2, -1: -1})
    for a, b in (("model_a", "model_b"), ("winner_model_a", "winner_model_b")):
        if a in rows.columns and b in rows.columns:
            swapped[a], swapped[b] = rows[b], rows[a]
    swapped["swapped"] = ~rows["swapped"]
    return swapped


def grouped_split(rows: pd.DataFrame, valid_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train/valid split by `group` so no prompt (or group) lands on both sides."""
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < valid_fraction < 1:
        raise DataError(f"data.valid_fraction must be in (0, 1), got {valid_fraction}")
    if rows["group"].nunique() < 2:
        raise DataError("cannot split: every row is in one group (need at least 2 distinct prompts)")
    splitter = GroupShuffleSplit(n_splits=1, test_size=valid_fraction, random_state=seed)
    train_idx, valid_idx = next(splitter.split(rows, groups=rows["group"]))
    return rows.iloc[np.sort(train_idx)], rows.iloc[np.sort(valid_idx)]


@dataclass
class Prepared:
    train: pd.DataFrame
    valid: pd.DataFrame
    counts: dict[str, int]


def split_rows(rows: pd.DataFrame, valid_fraction: float, seed: int,
               valid_files: list[str | Path] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid): the rows of `valid_files` (whole sources held out: a figure on data the model never
    saw) against the rest, or a grouped split by `valid_fraction`."""
    if not valid_files:
        return grouped_split(rows, valid_fraction, seed)
    held = {Path(f).name for f in valid_files}
    unknown = sorted(held - set(rows["source"]))
    if unknown:
        raise DataError(f"data.valid_files {unknown} are not among the ingested files {sorted(set(rows['source']))}")
    is_valid = rows["source"].isin(held).to_numpy()
    if is_valid.all():
        raise DataError("data.valid_files holds every file: nothing is left to train on")
    return rows[~is_valid], rows[is_valid]


def prepare(files: list[str | Path], valid_fraction: float, seed: int, swap_augment: bool,
            max_rows: int | None = None, group_column: str | None = None,
            valid_files: list[str | Path] | None = None) -> Prepared:
    """Ingest files, optionally subsample (by the user's request), split (by group, or by held-out
    files), augment train."""
    rows, counts = ingest(files, group_column, max_rows, seed)
    train, valid = split_rows(rows, valid_fraction, seed, valid_files)
    counts.update(rows_train=len(train), rows_valid=len(valid))
    assert len(train) + len(valid) == len(rows), "split lost or duplicated rows"
    if swap_augment:
        train = pd.concat([train, swap_ab(train)], ignore_index=True)
    counts["rows_train_augmented"] = len(train)
    return Prepared(train.reset_index(drop=True), valid.reset_index(drop=True), counts)


def ingest(files: list[str | Path], group_column: str | None = None, max_rows: int | None = None,
           seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every file's rows, concatenated, then at most `max_rows` of them (`subsample`); with the row
    counts per file, in all and selected."""
    tables = [load_rows(f, group_column) for f in files]
    rows = pd.concat(tables, ignore_index=True)
    counts = {f"rows_in.{Path(f).name}": len(t) for f, t in zip(files, tables)}
    counts["rows_in"] = len(rows)
    rows = subsample(rows, max_rows, seed)
    counts["rows_selected"] = len(rows)
    return rows, counts


def subsample(rows: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most `n` rows, chosen deterministically by `seed`, in their original order."""
    if n is None or len(rows) <= n:
        return rows
    if n < 1:
        raise DataError(f"cannot keep {n} rows")
    keep = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return rows.iloc[np.sort(keep)]


def label_distribution(rows: pd.DataFrame) -> dict[str, float]:
    labelled = rows["label"][rows["label"] >= 0]
    shares = labelled.value_counts(normalize=True).reindex([0, 1, 2], fill_value=0.0)
    return {"share_a": float(shares[0]), "share_b": float(shares[1]), "share_tie": float(shares[2])}


def write_parquet(rows: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)
    return path


def read_prepared(path: str | Path) -> pd.DataFrame:
    """Read a canonical parquet written by datagen (or any input file, ingested on the fly)."""
    path = Path(path)
    frame = read_table(path)
    if set(CANONICAL) <= set(frame.columns):
        for column in TEXT_COLUMNS:
            frame[column] = [list(v) for v in frame[column]]
        return frame
    return canonicalize(frame, path)


# ---------------------------------------------------------------------------------------------
# The recipe's rows

def recipe_split(recipe: Recipe, files: list[str] | None = None) -> Prepared:
    """The recipe's grouped train/valid split of `files` (default: the recipe's data.files)."""
    d = recipe.data
    return prepare(files or d.files, d.valid_fraction, d.seed, d.swap_augment, d.max_rows, d.group_column,
                   d.valid_files)
