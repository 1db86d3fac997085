import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arenaflow.data import DataError, label_distribution, load_rows, prepare, read_prepared, swap_ab

DATA = Path(__file__).parents[1] / "data"
WINNERS = ("winner_model_a", "winner_model_b", "winner_tie")
MTBENCH = DATA / "mtbench_human_turn1.csv"
PANDALM = DATA / "pandalm_test.csv"


@pytest.fixture(scope="module")
def raw():
    return pd.read_csv(MTBENCH, dtype=str, keep_default_na=False)


def write_csv(frame, path):
    frame.to_csv(path, index=False)
    return path


def test_real_files_keep_every_row_and_parse_turns():
    for path, n in ((MTBENCH, 1689), (PANDALM, 999)):
        rows = load_rows(path)
        assert len(rows) == n
        assert rows["id"].is_unique
        assert all(isinstance(t, list) and t for t in rows["prompt"])
        assert set(rows["label"]) <= {0, 1, 2}
    soft = load_rows(PANDALM)[["p_a", "p_b", "p_tie"]].to_numpy()
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-3)


def test_split_is_grouped_by_prompt_and_loses_nothing():
    prepared = prepare([MTBENCH, PANDALM], valid_fraction=0.2, seed=0, swap_augment=False)
    train, valid = prepared.train, prepared.valid
    assert len(train) + len(valid) == 1689 + 999 == prepared.counts["rows_in"]
    assert not set(train["group"]) & set(valid["group"])
    prompts = lambda rows: {json.dumps(p) for p in rows["prompt"]}
    assert not prompts(train) & prompts(valid)
    keys = lambda rows: set(zip(rows["source"], rows["id"]))
    assert len(keys(train) | keys(valid)) == 2688


def test_swap_augmentation_swaps_labels_and_texts():
    rows = load_rows(PANDALM).head(50)
    swapped = swap_ab(rows)
    assert (swapped["response_a"].map(tuple) == rows["response_b"].map(tuple)).all()
    assert list(swapped["label"]) == [{0: 1, 1: 0, 2: 2}[x] for x in rows["label"]]
    np.testing.assert_array_equal(swapped["p_a"], rows["p_b"])
    assert swapped["swapped"].all()
    prepared = prepare([PANDALM], 0.2, 0, swap_augment=True)
    assert prepared.counts["rows_train_augmented"] == 2 * prepared.counts["rows_train"]
    shares = label_distribution(prepared.train)
    assert shares["share_a"] == pytest.approx(shares["share_b"])


def test_parquet_and_jsonl_give_the_same_rows(tmp_path, raw):
    head = raw.head(20)
    from_csv = load_rows(write_csv(head, tmp_path / "x.csv"))
    native = head.assign(**{c: head[c].map(json.loads) for c in ("prompt", "response_a", "response_b")})
    native.to_parquet(tmp_path / "x.parquet")
    native.to_json(tmp_path / "x.jsonl", orient="records", lines=True)
    for other in (load_rows(tmp_path / "x.parquet"), load_rows(tmp_path / "x.jsonl")):
        assert list(other["prompt"].map(list)) == list(from_csv["prompt"])
        assert list(other["label"]) == list(from_csv["label"])


def test_null_turns_are_kept(tmp_path, raw):
    head = raw.head(3).copy()
    head.loc[0, "response_a"] = json.dumps(["first", None])
    rows = load_rows(write_csv(head, tmp_path / "nulls.csv"))
    assert rows["response_a"].iloc[0] == ["first", None]


def test_prepared_parquet_roundtrip(tmp_path):
    prepared = prepare([PANDALM], 0.2, 0, swap_augment=False)
    prepared.valid.to_parquet(tmp_path / "valid.parquet")
    back = read_prepared(tmp_path / "valid.parquet")
    assert list(back["prompt"]) == list(prepared.valid["prompt"])
    assert len(back) == len(prepared.valid)


@pytest.mark.parametrize("corrupt, message", [
    (lambda f: f.drop(columns=["response_b"]), r"missing column\(s\) \['response_b'\]"),
    (lambda f: f.assign(prompt=f["prompt"].where(f.index != 4, "[not json")), r"row 5 \(id=4\), column 'prompt'"),
    (lambda f: f.assign(response_a=f["response_a"].where(f.index != 2, '{"a": 1}')), r"row 3 \(id=2\), column 'response_a'"),
    (lambda f: f.assign(**{c: f[c].where(f.index != 7, "0") for c in WINNERS}), r"row 8 \(id=7\).*one-hot"),
    (lambda f: f.assign(**{c: f[c].where(f.index != 6, "1") for c in WINNERS}), r"row 7 \(id=6\).*one-hot"),
    (lambda f: f.assign(winner_tie=f["winner_tie"].where(f.index != 1, "x")), r"row 2 \(id=1\), column 'winner_tie'"),
    (lambda f: f.assign(id=f["id"].where(f.index != 9, "3")), r"duplicate id '3' in rows \[4, 10\]"),
    (lambda f: f.drop(columns=["winner_tie"]), r"label columns must be all of"),
    (lambda f: f.head(0), r"no data rows|empty"),
])
def test_malformed_csv_is_named_precisely(tmp_path, raw, corrupt, message):
    path = write_csv(corrupt(raw.head(12).copy()), tmp_path / "bad.csv")
    with pytest.raises(DataError, match=message) as err:
        load_rows(path)
    assert "bad.csv" in str(err.value)


def test_empty_and_non_utf8_files(tmp_path, raw):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="empty.csv: empty file"):
        load_rows(tmp_path / "empty.csv")
    text = write_csv(raw.head(5), tmp_path / "latin.csv").read_bytes()
    lines = text.split(b"\n")
    lines[3] = lines[3].replace(b"the", b"th\xe9", 1)
    (tmp_path / "latin.csv").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"latin.csv, line 4: not UTF-8"):
        load_rows(tmp_path / "latin.csv")


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl, line 2: invalid JSON"):
        load_rows(tmp_path / "x.jsonl")


def test_bad_soft_labels(tmp_path):
    frame = pd.read_csv(PANDALM, dtype=str, keep_default_na=False).head(6)
    frame.loc[2, "soft_a"] = "0.9"
    with pytest.raises(DataError, match=r"row 3 \(id=2\).*sum to 1"):
        load_rows(write_csv(frame, tmp_path / "soft.csv"))


def test_unlabelled_rows_get_label_minus_one(tmp_path, raw):
    path = write_csv(raw.head(4).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]), tmp_path / "t.csv")
    assert list(load_rows(path)["label"]) == [-1] * 4


def test_valid_files_hold_out_whole_sources():
    prepared = prepare([MTBENCH, PANDALM], 0.2, 42, swap_augment=False, valid_files=[PANDALM])
    assert set(prepared.valid["source"]) == {PANDALM.name} and set(prepared.train["source"]) == {MTBENCH.name}
    assert len(prepared.train) + len(prepared.valid) == prepared.counts["rows_in"]
    with pytest.raises(DataError, match="not among the ingested files"):
        prepare([MTBENCH], 0.2, 42, swap_augment=False, valid_files=[PANDALM])
    with pytest.raises(DataError, match="nothing is left to train on"):
        prepare([MTBENCH, PANDALM], 0.2, 42, swap_augment=False, valid_files=[MTBENCH, PANDALM])
