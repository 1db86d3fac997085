"""`arenaflow bench --train` on CPU with the tiny random Llama: the plain-peft baseline and the project's
finetune step on the same rows, figures that must agree with each other, the lever keys as train.py
builds them (no timing assertions: the CPU is shared)."""

from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from arenaflow import bench_train, cli
from arenaflow.stages import bench
from arenaflow.bench_train import (
    BASELINE, PROJECT, TrainBenchError, parse_variant, parse_variants, variant_config,
)
from arenaflow.models import load_tokenizer, resolve_model
from arenaflow.prompts import PromptBuilder
from arenaflow.recipe import PromptConfig, RecipeError, TrainConfig, load_recipe
from arenaflow.train import AnswerCollator, TrainError, answer_examples, build_trainer

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = ROOT / "experiments" / "cpu-smollm2.yaml"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model("tiny:llama")


# ----------------------------------------------------------------------------- variant specs

def test_variant_specs_parse_type_and_refuse():
    assert parse_variant("peft-baseline") == bench_train.TrainVariant(BASELINE, BASELINE, {})
    assert parse_variant(" project ").kind == PROJECT
    fast = parse_variant("fast=bnb_4bit_compute_dtype=bfloat16:adapter_dtype=float32:upcast_layer_norms=false")
    assert (fast.label, fast.kind) == ("fast", PROJECT)
    assert fast.overrides == {"bnb_4bit_compute_dtype": "bfloat16", "adapter_dtype": "float32",
                              "upcast_layer_norms": "false"}
    cfg = variant_config(TrainConfig(epochs=3, max_train_rows=10, keep_best_epoch=True), fast)
    assert (cfg.adapter_dtype, cfg.upcast_layer_norms, cfg.bnb_4bit_compute_dtype) == ("float32", False, "bfloat16")
    assert (cfg.epochs, cfg.max_train_rows, cfg.keep_best_epoch) == (1.0, None, False)  # one epoch of exactly the rows
    wide = parse_variant("b16=peft-baseline:batch_size=16:gradient_checkpointing=true")
    assert (wide.label, wide.kind) == ("b16", BASELINE)
    base = variant_config(TrainConfig(), wide)
    assert (base.batch_size, base.gradient_checkpointing, base.bnb_4bit_compute_dtype) == (16, True, "bfloat16")
    assert variant_config(TrainConfig(), parse_variant(PROJECT)).bnb_4bit_compute_dtype == "float32"  # the recipe's
    assert [v.label for v in parse_variants("")] == [BASELINE, PROJECT]

    for spec, message in (("nosuch", "expected"), ("fast=adapter_dtype", "key=value"), ("=project", "expected"),
                          ("a b=lora_r=8", "expected")):
        with pytest.raises(TrainBenchError, match=message):
            parse_variant(spec)
    with pytest.raises(TrainBenchError, match="distinct"):
        parse_variants("project,project:lora_r=8")
    with pytest.raises(TrainBenchError, match="no key 'no_such_key'"):
        variant_config(TrainConfig(), parse_variant("x=no_such_key=1"))
    with pytest.raises(TrainBenchError, match="lever of the project"):
        variant_config(TrainConfig(), parse_variant("b=peft-baseline:padding_free=true"))
    with pytest.raises(RecipeError, match="train.adapter_dtype: 'float8' is not one of compute"):
        variant_config(TrainConfig(), parse_variant("x=adapter_dtype=float8"))
    with pytest.raises(TrainError, match="optim"):
        variant_config(TrainConfig(), parse_variant("x=optim=sgdd"))
    with pytest.raises(TrainError, match="float32 adapters"):
        variant_config(TrainConfig(), parse_variant("x=autocast=float16:adapter_dtype=bfloat16"))
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="no backward on CPU"):
            variant_config(TrainConfig(), parse_variant("x=attn_implementation=flex_attention"))
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(TrainError, match="liger-kernel"):
            variant_config(TrainConfig(), parse_variant("x=use_liger_kernel=true"))


def test_cli_refuses_a_bad_variant_before_loading_anything(capsys):
    code = cli.main(["bench", "--train", "--recipe", str(CPU_RECIPE), "--variants", "x=lora_rank=8"])
    assert code == 2
    assert "no key 'lora_rank'" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["bench", "--train", "--steps", "3", "--warmup-steps", "0"])
    assert (args.train, args.steps, args.warmup_steps) == ("true", 3, 0)
    assert cli.build_parser().parse_args(["bench"]).train == "false"


def test_mlproject_bench_entry_point_passes_the_train_parameters():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["bench"]
    values = {k: v.get("default", "") for k, v in entry["parameters"].items()}
    values.update(train="true", variants="peft-baseline,fast=padding_free=true:optim=adamw_torch", steps=20)
    command = entry["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()})  # as MLflow quotes
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert (args.verb, args.train, args.steps, args.warmup_steps) == ("bench", "true", 20, 2)
    assert [v.label for v in parse_variants(args.variants)] == [BASELINE, "fast"]


# ----------------------------------------------------------------------------- the levers in train.py

def _trainer(tiny, tmp_path, **changes):
    tokenizer = load_tokenizer(tiny)
    builder = PromptBuilder(tokenizer, PromptConfig(max_length=64))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=n).tolist() + builder.suffix for n in (20, 31, 9, 44)]
    dataset = Dataset.from_dict(answer_examples(prompts, builder.label_ids, np.eye(3)[[0, 1, 2, 0]]))
    cfg = TrainConfig(**{"lora_dropout": 0.0, "batch_size": 4, **changes})
    return build_trainer(tiny, dataset, tokenizer, builder.label_ids, cfg, tmp_path)[0], dataset


def _lora_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


def test_levers_change_what_train_builds(tiny, tmp_path):
    # QLoRA with bf16 compute: the adapters follow the compute dtype unless adapter_dtype says otherwise.
    qlora = dict(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    trainer, _ = _trainer(tiny, tmp_path, **qlora)
    assert _lora_dtypes(trainer.model) == {torch.bfloat16}
    norms = {p.dtype for n, p in trainer.model.named_parameters() if "norm" in n}
    assert norms == {torch.float32}  # prepare_model_for_kbit_training's upcast
    assert (trainer.args.bf16, trainer.args.fp16) == (False, False)  # no autocast for 4-bit (as before)
    trainer, _ = _trainer(tiny, tmp_path, **qlora, adapter_dtype="float32", upcast_layer_norms=False,
                          autocast="bfloat16", optim="adamw_torch", group_by_length=True, torch_compile=True)
    assert _lora_dtypes(trainer.model) == {torch.float32}
    assert {p.dtype for n, p in trainer.model.named_parameters() if "norm" in n} == {torch.bfloat16}
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    assert trainer.args.bf16 and trainer.args.optim == "adamw_torch" and trainer.args.torch_compile
    assert trainer.args.train_sampling_strategy == "group_by_length"
    # The default keys build what finetune built before them.
    trainer, _ = _trainer(tiny, tmp_path)
    assert _lora_dtypes(trainer.model) == {torch.float32} and trainer.args.optim == "adamw_torch_fused"
    assert trainer.args.train_sampling_strategy == "random" and not trainer.args.torch_compile


def test_padding_free_batches_give_the_padded_loss(tiny, tmp_path):
    """One packed row with position_ids (no pad token, no attention mask) and the right-padded batch
    give the same answer-token loss on the same model."""
    trainer, dataset = _trainer(tiny, tmp_path, padding_free=True)
    examples = [dataset[i] for i in range(len(dataset))]
    packed = trainer.data_collator(examples)
    padded = AnswerCollator(trainer.processing_class.pad_token_id)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(map(len, dataset["input_ids"])))
    assert packed["position_ids"][0].tolist()[:21] == list(range(21))  # the first row: 20 tokens + suffix..
    assert padded["input_ids"].numel() == 4 * max(map(len, dataset["input_ids"]))
    trainer.model.train()
    with torch.no_grad():
        losses = [float(trainer.compute_loss(trainer.model, batch)) for batch in (packed, padded)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


# ----------------------------------------------------------------------------- the bench

def test_train_bench_baseline_and_project_on_the_same_rows(tiny, store, monkeypatch):
    seen = []
    validator = bench_train.make_validator

    def recording(ids, *args, **kwargs):
        seen.append(ids)
        return validator(ids, *args, **kwargs)

    monkeypatch.setattr(bench_train, "make_validator", recording)
    recipe = load_recipe(CPU_RECIPE, ["train.batch_size=2 train.gradient_accumulation_steps=1 train.lora_dropout=0"])
    variants = (f"{BASELINE},{PROJECT}:gradient_accumulation_steps=2,"
                "pf=padding_free=true:gradient_checkpointing=true:gradient_accumulation_steps=2")
    report = bench.run(recipe, model=str(tiny), rows=6, synthetic="24:12-40", train="true", variants=variants,
                            steps=2, warmup_steps=1)
    assert [v.label for v in report.variants] == [BASELINE, PROJECT, "pf"]
    setup_rows = bench_train.synthetic_rows(24, 12, 40, 12, 6, PromptBuilder(load_tokenizer(tiny), recipe.prompt),
                                            len(load_tokenizer(tiny)))
    lengths = [len(ids) for ids in setup_rows.train["input_ids"]]
    assert all(12 <= n <= 40 for n in lengths)
    for v, accumulation in zip(report.variants, (1, 2, 2)):
        assert not v.error, v.error
        pool, timed = 3 * 2 * accumulation, 2 * 2 * accumulation  # steps x batch x accumulation, warm-up apart
        assert v.steps == 2 and v.rows == timed
        assert sum(sorted(lengths[:pool])[:timed]) <= v.tokens <= sum(sorted(lengths[:pool])[-timed:])
        assert math.isnan(v.peak_gib) and math.isnan(v.mfu_peak)  # CPU: no allocator peak, no datasheet rate
        assert math.isfinite(v.train_loss) and math.isfinite(v.valid_log_loss)
    baseline, project, packed = report.variants
    assert baseline.tokens == sum(lengths[2:6])  # the baseline walks the pool in order: step 1 is the warm-up
    assert baseline.padded_tokens > baseline.tokens and project.padded_tokens > project.tokens  # padding apart
    assert packed.padded_tokens == packed.tokens  # padding-free: no pad token at all
    assert (baseline.checkpointing, project.checkpointing, packed.checkpointing) == (False, False, True)
    assert len(seen) == 3 and all(ids == seen[0] for ids in seen) and len(seen[0]) == 6  # same held-out rows
    table = report.table()
    assert all(label in table for label in (BASELINE, PROJECT, "pf")) and "| 1.00 " in table

    run = mlflow.search_runs(experiment_names=[recipe.name], output_format="list")[0]
    assert run.data.tags["bench_mode"] == "train"
    assert run.data.tags["pf_settings"] == "padding_free=true:gradient_checkpointing=true:gradient_accumulation_steps=2"
    assert run.data.metrics["peft_baseline_rows_per_s"] == pytest.approx(baseline.rows_per_s)
    assert run.data.metrics["pf_valid_log_loss"] == pytest.approx(packed.valid_log_loss)
