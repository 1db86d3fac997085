"""LLM data generation: respond / label / dedup / filter, the dataset it writes, and resume.

Engines: the session's `tiny_vllm` (random tiny Llama, SmolLM2's tokenizer) generates and teaches;
its text is garbage but the structure is real. No extra engine is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import VLLM_TEST_ENGINE

from arenaflow.datagen import DatagenError, clean, engines, label, respond
from arenaflow.datagen import dataset as stage
from arenaflow.stages import datagen as datagen_stage
from arenaflow.data import CANONICAL, SOFT_COLUMNS, read_prepared
from arenaflow.recipe import DataConfig, GenerateConfig, PromptConfig, Recipe, RecipeError

DATA = Path(__file__).resolve().parents[1] / "data"


# --- pure functions -------------------------------------------------------------------------------

def test_dedup_exact_and_near_are_counted_and_keep_the_first():
    base = "Write a short poem about the sea and the wind at night, please."
    rows = pd.DataFrame({"prompt": [[base], ["  WRITE a short poem about the sea, and the wind at night please!! "],
                                    [base.replace(", please", "")], ["Explain quicksort in two sentences."],
                                    ["What is the capital of France?"]]})
    kept, counts = clean.dedup_rows(rows, threshold=0.8, shingle_size=5)
    assert counts == {"exact": 1, "near": 1}
    assert [p[0] for p in kept["prompt"]] == [base, "Explain quicksort in two sentences.", "What is the capital of France?"]
    kept, counts = clean.dedup_rows(rows, threshold=None)  # exact only
    assert counts == {"exact": 1, "near": 0} and len(kept) == 4
    kept, counts = clean.dedup_rows(rows, threshold=0.8, seen=["what is the capital of france"])
    assert counts == {"exact": 2, "near": 1} and len(kept) == 2
    kept, counts = clean.dedup_rows(rows, threshold=0.8, seen=["What is the capital of France ?"], within=False)
    assert counts == {"exact": 1, "near": 0} and len(kept) == 4  # against `seen` only


def test_filters_count_the_first_failed_rule():
    rows = pd.DataFrame({
        "prompt": [["hi"], ["A fine prompt here"], ["Ein schöner Prompt? Ja, größtenteils äöü"], ["Another fine prompt"],
                   ["Yet another prompt"], ["x" * 50]],
        "response_a": [["ok answer"], [""], ["fine"], ["same answer"], ["good"], ["fine"]],
        "response_b": [["ok answer 2"], ["fine"], ["fine"], ["Same answer."], ["also good"], ["fine too"]],
    })
    bounds = clean.FilterBounds(min_prompt_chars=5, max_prompt_chars=40, min_response_chars=1,
                             max_response_chars=100, min_ascii_share=0.95)
    kept, counts = clean.filter_rows(rows, bounds)
    assert counts == {"prompt_short": 1, "prompt_long": 1, "response_short": 1, "response_long": 0,
                      "non_ascii": 1, "identical_responses": 1}
    assert [p[0] for p in kept["prompt"]] == ["Yet another prompt"]


def test_prompts_file_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": ["turn 1", "turn 2"]}\n{"prompt": "plain text"}\n{"prompt": "[not json"}\n')
    pool = respond.read_prompts_file(jsonl)
    assert list(pool["prompt"]) == [["turn 1", "turn 2"], ["plain text"], ["[not json"]]
    assert pool["group"].str.startswith("p.jsonl:").all()
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ['["a", "b"]', "just text"]}).to_csv(csv, index=False)
    assert list(respond.read_prompts_file(csv)["prompt"]) == [["a", "b"], ["just text"]]
    (tmp_path / "bad.csv").write_text("question\nhello\n")
    with pytest.raises(DatagenError, match="no `prompt` column"):
        respond.read_prompts_file(tmp_path / "bad.csv")


def test_apply_teacher_soft_labels_sum_to_one_and_threshold():
    rows = pd.DataFrame({"id": ["a", "b", "c"], "label": [-1, -1, -1], "p_a": np.nan, "p_b": np.nan, "p_tie": np.nan})
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [2.0, 6.0, 2.0]])  # the last one is unnormalised
    out, counts = label.apply_teacher(rows, probs, threshold=0.6)
    np.testing.assert_allclose(out[list(SOFT_COLUMNS)].sum(axis=1), 1.0, atol=1e-12)
    assert out["label"].tolist() == [0, -1, 1]
    assert counts == {"rows_labelled": 3, "rows_hard_labelled": 2, "rows_unconfident": 1, "rows_unconfident_dropped": 0}
    out, counts = label.apply_teacher(rows, probs, threshold=0.6, drop_unconfident=True)
    assert out["id"].tolist() == ["a", "c"] and counts["rows_unconfident_dropped"] == 1
    out, _ = label.apply_teacher(rows, probs, threshold=None)
    assert (out["label"] == -1).all()
    with pytest.raises(DatagenError):
        label.apply_teacher(rows, probs[:2], threshold=0.6)


def test_pairs_are_canonical_and_balanced():
    pool = pd.DataFrame({"prompt": [[f"prompt {i}"] for i in range(40)], "group": [f"g{i}" for i in range(40)]})
    variants = [respond.Variant("tiny:llama", 0.3), respond.Variant("tiny:llama", 1.0), respond.Variant("gguf:smollm2-135m-instruct", 0.7)]
    texts = {v: [[f"{v.name} says {i}"] for i in range(40)] for v in variants}
    texts[variants[0]][5] = None  # did not fit: both of its pairs are skipped
    pairs, counts = respond.make_pairs(pool, variants, texts, seed=1)
    assert counts == {"pairs": 40 * 3 - 2, "pairs_skipped_too_long": 2}
    assert list(pairs.columns[:len(CANONICAL)]) == list(CANONICAL)
    assert pairs["id"].is_unique and (pairs["label"] == -1).all() and pairs["p_a"].isna().all()
    assert set(pairs["model_a"]) == {v.name for v in variants}
    assert 0.3 < (pairs["model_a"] == "llama@t0.3").sum() / (pairs["model_a"].str.endswith("t0.3") | pairs["model_b"].str.endswith("t0.3")).sum() < 0.7
    for row in pairs.itertuples():
        assert row.response_a == [f"{row.model_a} says {int(row.prompt[0].split()[1])}"]
    again, _ = respond.make_pairs(pool, variants, texts, seed=1)
    pd.testing.assert_frame_equal(pairs, again)


def test_unknown_mode_is_refused():
    with pytest.raises(RecipeError, match=r"generate.modes\[1\]: 'respnd' is not one of ingest, respond"):
        stage.check_modes(GenerateConfig(modes=["ingest", "respnd"]))
    with pytest.raises(DatagenError, match="generate.modes is empty"):
        stage.check_modes(GenerateConfig(modes=[]))


# --- with the tiny engine -------------------------------------------------------------------------

def test_respond_on_tiny_model(tiny_vllm, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [["Hello there"], ["First turn", "Second turn"], ["word " * 300]]
    kwargs = dict(top_p=0.95, max_tokens=6, seed=3, max_prompt_tokens=128, max_model_len=tiny_vllm.max_model_len,
                  progress=False)
    out = respond.respond(engines.vllm_of(tiny_vllm), tokenizer, prompts, temperature=1.0, salt="v", **kwargs)
    assert len(out.texts) == 3 and out.texts[2] is None  # 300 words > max_prompt_tokens
    assert len(out.texts[0]) == 1 and len(out.texts[1]) == 2 and all(isinstance(t, str) for t in out.texts[1])
    assert 0 < out.generated_tokens <= 6 * 3 and out.prompt_tokens > 0 and out.seconds > 0
    # per-request seeds: the same prompt gives the same text alone or in a batch
    alone = respond.respond(engines.vllm_of(tiny_vllm), tokenizer, prompts[:1], temperature=1.0, salt="v", **kwargs)
    assert alone.texts[0] == out.texts[0]


@pytest.fixture
def small_data(tmp_path):
    """12 real rows (distinct prompts) from the bundled data, as a Kaggle CSV."""
    frame = pd.read_csv(DATA / "pandalm_test.csv", dtype=str, keep_default_na=False)
    frame = frame.drop_duplicates("prompt").head(12)
    path = tmp_path / "small.csv"
    frame.to_csv(path, index=False)
    return path


def tiny_recipe(data: Path, work_dir: Path, **generate) -> Recipe:
    settings = dict(modes=["ingest", "respond", "label", "dedup", "filter"], generators=["tiny:llama"],
                    temperatures=[0.5, 1.0], max_tokens=6, n_prompts=4, shard_size=2, max_prompt_tokens=200,
                    teacher="models:/arenaflow@champion", teacher_fallback="tiny:llama", confidence_threshold=0.34,
                    min_response_chars=0, min_ascii_share=0.0, work_dir=str(work_dir))
    return Recipe(name="t-datagen", data=DataConfig(files=[str(data)], valid_fraction=0.25, seed=1),
                  prompt=PromptConfig(max_length=256), engine=VLLM_TEST_ENGINE,
                  generate=GenerateConfig(**{**settings, **generate}))


def test_generate_dataset_end_to_end(tiny_vllm, tiny_checkpoint, small_data, tmp_path, store):
    import mlflow

    recipe = tiny_recipe(small_data, tmp_path / "work")
    with mlflow.start_run() as run:  # `store` (conftest): a fresh tracking store, tracking set up
        ds = datagen_stage.generate_dataset(recipe, engines={tiny_checkpoint: tiny_vllm}, progress=False)
    c = ds.counts
    # no champion in this fresh store: the fallback teacher, with the reason
    assert ds.teacher.uri == "tiny:llama" and "arenaflow@champion" in ds.teacher.fallback_reason
    # prompts: 9 train prompts -> filters/dedup -> 4 used; 2 variants -> one pair each
    assert c["rows_train"] + c["rows_valid"] == 12 and c["prompts_used"] == 4
    assert c["responses_generated"] + c["pairs_skipped_too_long"] * 2 == 8 and c["responses_resumed"] == 0
    filtered = sum(v for k, v in c.items() if k.startswith("pairs_filtered_"))
    assert c["pairs"] - filtered == c["rows_generated"] == len(ds.generated) > 0
    gen = ds.generated
    assert list(gen.columns[:len(CANONICAL)]) == list(CANONICAL) and gen["id"].is_unique
    assert (gen["source"] == "generated").all() and set(gen["model_a"]) | set(gen["model_b"]) <= {"llama@t0.5", "llama@t1"}
    np.testing.assert_allclose(gen[list(SOFT_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    assert gen["label"].isin([-1, 0, 1, 2]).all() and c["rows_hard_labelled"] == (gen["label"] >= 0).sum()
    # generated rows train only, with their prompt's group; validation stays human-labelled
    assert not set(gen["group"]) & set(ds.valid["group"]) and (ds.valid["label"] >= 0).all()
    assert c["rows_train_augmented"] == 2 * (c["rows_train"] + len(gen))
    assert ds.speed["samples_per_s"] > 0 and ds.speed["generated_tokens_per_s"] > 0
    # MLflow: metrics, teacher tags, dataset inputs, artifacts that finetune reads
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.tags["teacher"] == "tiny:llama" and logged.data.tags["teacher_fallback_reason"]
    assert logged.data.metrics["rows_train.generated"] == 2 * len(gen) and "generated_tokens_per_s" in logged.data.metrics
    assert {i.dataset.name for i in logged.inputs.dataset_inputs} == {"t-datagen-train", "t-datagen-valid", "t-datagen-generated"}
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/data"))
    train = read_prepared(folder / "train.parquet")
    assert len(train) == c["rows_train_augmented"] and (train["source"] == "generated").sum() == 2 * len(gen)
    samples = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/samples"))
    lines = (samples / "samples.jsonl").read_text().splitlines()
    assert len(lines) == min(8, len(gen)) and json.loads(lines[0])["id"] == gen["id"].iloc[0]
    assert "<table>" in (samples / "samples.html").read_text()


def test_resume_does_not_duplicate_rows(tiny_vllm, tiny_checkpoint, small_data, tmp_path, store, monkeypatch):
    recipe = tiny_recipe(small_data, tmp_path / "work", modes=["ingest", "respond", "label"], temperatures=[0.7, 1.3],
                         max_prompt_tokens=1000)
    engines = {tiny_checkpoint: tiny_vllm}
    stage_settings = {"engines": engines, "progress": False, "teacher_of": datagen_stage.resolve_teacher}
    real_respond, calls = respond.respond, []

    def killed_after_one_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")
        return real_respond(*args, **kwargs)

    monkeypatch.setattr(respond, "respond", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        stage.build_dataset(recipe, **stage_settings)
    monkeypatch.setattr(respond, "respond", real_respond)

    resumed = stage.build_dataset(recipe, **stage_settings)
    c = resumed.counts
    # shard 0 of the first variant (2 prompts) was saved before the kill; the other 3 shards run now
    assert (c["responses_resumed"], c["responses_generated"], c["pairs_skipped_too_long"]) == (2, 6, 0)
    assert resumed.generated["id"].is_unique and resumed.train["id"].value_counts().max() == 2  # itself + its swap
    again = stage.build_dataset(recipe, **stage_settings)  # everything from the shards now
    assert again.counts["responses_generated"] == 0 and again.counts["rows_label_resumed"] == c["rows_to_label"]
    pd.testing.assert_frame_equal(again.train, resumed.train)
    changed = stage.build_dataset(tiny_recipe(small_data, tmp_path / "work", modes=["ingest", "respond", "label"],
                                           temperatures=[0.7, 0.9], max_prompt_tokens=1000), **stage_settings)
    assert (changed.counts["responses_resumed"], changed.counts["responses_generated"]) == (4, 4)  # t0.7 reused


def test_distill_datagen_labels_with_a_w8a16_champion(tiny_vllm, tiny_checkpoint, small_data, tmp_path, store):
    """The README's second step: the distill recipe's datagen after main made a W8A16 champion. vLLM's CPU
    backend runs no 8-bit weights; the teacher is scored by the transformers engine (one engine decision)."""
    import mlflow
    from mlflow import MlflowClient

    from arenaflow.stages import registry
    from arenaflow.quantize import quantize_checkpoint
    from arenaflow.recipe import QuantConfig, load_recipe
    from arenaflow.stages.runs import stage_run

    w8 = quantize_checkpoint(tiny_checkpoint, tmp_path / "w8a16", QuantConfig(scheme="W8A16", method="rtn", group_size=64))
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "experiments" / "cpu-smollm2-distill.yaml", [
        f"data.files={small_data}", "data.valid_fraction=0.25", "generate.generators=tiny:llama",
        "generate.teacher_fallback=tiny:llama", "generate.n_prompts=4", "generate.max_tokens=6",
        "generate.shard_size=2", "generate.max_prompt_tokens=200", "generate.min_response_chars=0",
        "generate.min_ascii_share=0", f"generate.work_dir={tmp_path / 'work'}", "engine.max_model_len=1024",
        "engine.cpu_kv_cache_gib=0.25"])
    with stage_run(recipe, "quantize", model="tiny:llama"):
        example = read_prepared(small_data).head(2)
        version = str(registry.register_model(w8, "arenaflow", recipe, example, tags={"quantization": "W8A16"}).version)
    MlflowClient().set_registered_model_alias("arenaflow", "champion", version)
    with stage_run(recipe, "datagen") as run:  # the stage's run: it tags the engine fallback
        ds = datagen_stage.generate_dataset(recipe, engines={tiny_checkpoint: tiny_vllm}, progress=False)
    assert ds.teacher.version == version and ds.teacher.fallback_reason is None
    assert "8]-bit weights" in mlflow.get_run(run.info.run_id).data.tags["engine_fallback"]
    assert ds.counts["rows_labelled"] > 0
    np.testing.assert_allclose(ds.generated[list(SOFT_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)


def test_datagen_cli_generates_for_the_prompts_of_prompts_file(tiny_vllm, tiny_checkpoint, small_data, tmp_path,
                                                               store, monkeypatch):
    import mlflow

    from arenaflow import cli
    from arenaflow.stages import datagen as datagen_door

    prompts = [[f"Name {n} things that are {colour}."] for n, colour in zip(range(2, 7), ("red", "blue", "green",
                                                                                          "round", "loud"))]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    real = datagen_door.generate_dataset
    monkeypatch.setattr(datagen_door, "generate_dataset",  # the session's engine, not a new one
                        lambda recipe, files: real(recipe, files, engines={tiny_checkpoint: tiny_vllm}, progress=False))
    recipe = Path(__file__).resolve().parents[1] / "experiments" / "cpu-smollm2-distill.yaml"
    overrides = [f"data.files={small_data}", "data.valid_fraction=0.25", "generate.generators=tiny:llama",
                 "generate.teacher_fallback=tiny:llama", "generate.n_prompts=4", "generate.max_tokens=6",
                 "generate.shard_size=2", "generate.max_prompt_tokens=200", "generate.min_response_chars=0",
                 "generate.min_ascii_share=0", f"generate.work_dir={tmp_path / 'work'}", "engine.max_model_len=1024",
                 "engine.cpu_kv_cache_gib=0.25"]
    args = ["datagen", "--recipe", str(recipe), *[a for o in overrides for a in ("--set", o)],
            "--prompts-file", str(prompts_file)]
    assert cli.main(args) == 0
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    train = read_prepared(Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/data")) / "train.parquet")
    generated = train[train["source"] == "generated"]
    assert len(generated) > 0 and {json.dumps(p) for p in generated["prompt"]} <= {json.dumps(p) for p in prompts}
