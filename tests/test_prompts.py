from pathlib import Path

import pytest

from arenaflow.data import load_rows
from arenaflow.models import load_tokenizer, resolve_model
from arenaflow.prompts import TRUNCATION_MARKER, PromptBuilder, PromptError, fair_shares
from arenaflow.recipe import PromptConfig

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("gguf:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def rows():
    import pandas as pd

    return pd.concat([load_rows(DATA / "mtbench_human_turn1.csv"), load_rows(DATA / "pandalm_test.csv")])


def test_fair_shares_water_fills():
    assert fair_shares([10, 100, 100], 120) == [10, 55, 55]
    assert fair_shares([10, 20], 100) == [10, 20]
    assert sum(fair_shares([7, 300, 301], 100)) == 100
    assert fair_shares([5, 5], 0) == [0, 0]


@pytest.mark.parametrize("max_length", [128, 256, 1024])
def test_never_exceeds_budget_on_all_real_rows(tokenizer, rows, max_length):
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=max_length))
    lengths = [len(ids) for ids in builder.build_rows(rows)]
    assert max(lengths) <= max_length
    # long rows are filled up to the budget, not cut far below it
    assert max(lengths) >= max_length - 8


def test_prompt_shape_and_answer_position(tokenizer, rows):
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=256))
    row = rows.iloc[0]
    text = tokenizer.decode(builder.build(row["prompt"], row["response_a"], row["response_b"]))
    assert text.index("## Prompt") < text.index("## Response A") < text.index("## Response B")
    assert text.rstrip().endswith("assistant")  # the next token is the answer
    assert TRUNCATION_MARKER.strip() in text  # a long row shows where it was cut
    full = builder.build(["short question?"], ["yes"], ["no"])
    assert TRUNCATION_MARKER.strip() not in tokenizer.decode(full)


def test_truncation_keeps_head_and_tail(tokenizer):
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=200, head_share=0.3))
    long = " ".join(f"w{i}" for i in range(2000))
    text = tokenizer.decode(builder.build(["q"], [long + " FINALWORD"], ["START " + long]))
    a = text.split("## Response A")[1].split("## Response B")[0]
    assert a.strip().startswith("w0") and "FINALWORD" in a
    b = text.split("## Response B")[1]
    assert "START" in b and "w1999" in b


def test_multi_turn_interleaves_and_handles_null_turns(tokenizer):
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=512))
    text = tokenizer.decode(builder.build(["q1", "q2"], ["a1", None], ["b1", "b2"]))
    order = ["Prompt (turn 1)", "Response A (turn 1)", "Response B (turn 1)", "Prompt (turn 2)",
             "Response A (turn 2)", "Response B (turn 2)"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    assert "(empty)" in text.split("Response A (turn 2)")[1]


def test_swap_builds_the_mirrored_prompt(tokenizer, rows):
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=256))
    head = rows.head(3)
    swapped = builder.build_rows(head, swap=True)
    direct = [builder.build(p, b, a) for p, a, b in zip(head["prompt"], head["response_a"], head["response_b"])]
    assert swapped == direct


def test_budget_too_small_is_a_clear_error(tokenizer):
    with pytest.raises(PromptError, match="max_length=40"):
        PromptBuilder(tokenizer, PromptConfig(max_length=40)).build(["q"], ["a"], ["b"])
