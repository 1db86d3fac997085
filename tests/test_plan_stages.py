"""Plans of finetune and quantize (plan_stages.py), gradient_checkpointing=auto, and vLLM's memory share."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from arenaflow import hardware
from arenaflow.scoring import engines as backends
from arenaflow.plan import ARCHITECTURES, model_dims, plan_stage
from arenaflow.plan_stages import GIB, fit_training, padded_tokens, quantize_plan, train_memory, train_seconds
from arenaflow.recipe import EngineConfig, RecipeError, TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = model_dims("random:llama-3-8b")[0]  # Llama-3-8B dims with SmolLM2's 49152-token vocabulary
QLORA_8B = TrainConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16", batch_size=8, gradient_accumulation_steps=1,
                       gradient_checkpointing="auto")


def test_random_arch_plans_with_the_vocabulary_it_is_built_with():
    assert LLAMA_8B.vocab == 49152 and ARCHITECTURES["llama-3-8b"].vocab == 128256
    assert LLAMA_8B.hidden == 4096 and LLAMA_8B.layers == 32


def test_training_memory_matches_the_measured_8b_steps():
    # Measured on H100/H200 at 8 x 1024 tokens (plan_stages doc): ~16 GiB with checkpointing (QLoRA, dropout on);
    # 130.9 GiB without (no dropout, eval mode), which is what ACTIVATION_BYTES was read from.
    with_checkpointing = train_memory(LLAMA_8B, QLORA_8B, 8 * 1024, True).total / GIB
    assert 14 < with_checkpointing < 18
    no_dropout = train_memory(LLAMA_8B, dataclasses.replace(QLORA_8B, lora_dropout=0.0), 8 * 1024, False).total / GIB
    assert 130.9 * 0.9 < no_dropout < 130.9 * 1.1
    # Memory grows with the tokens, and checkpointing always needs less.
    sizes = [train_memory(LLAMA_8B, QLORA_8B, m * 1024, False).total for m in (1, 2, 4, 8)]
    assert sizes == sorted(sizes) and train_memory(LLAMA_8B, QLORA_8B, 2048, True).total < sizes[1]


def test_auto_picks_no_checkpointing_at_the_largest_micro_batch_that_fits_and_keeps_the_optimizer_batch():
    fit = fit_training(LLAMA_8B, QLORA_8B, 1025, capacity_gib=79.2)  # an H100
    assert (fit.micro_batch, fit.accumulation, fit.checkpointing, fit.fits) == (2, 4, False, True), fit
    assert fit.micro_batch * fit.accumulation == QLORA_8B.batch_size * QLORA_8B.gradient_accumulation_steps
    big = fit_training(LLAMA_8B, QLORA_8B, 1025, capacity_gib=200.0)
    assert (big.micro_batch, big.checkpointing) == (8, False)
    # A 24 GiB card: no micro-batch of >= MIN_MICRO_BATCH_TOKENS fits without checkpointing.
    small = fit_training(LLAMA_8B, QLORA_8B, 1025, capacity_gib=24.0)
    assert small.checkpointing and small.fits and small.micro_batch >= 1
    none = fit_training(LLAMA_8B, QLORA_8B, 1025, capacity_gib=6.0)
    assert not none.fits and "nothing fits" in none.reason


def test_padded_tokens_and_training_time():
    lengths = np.array([100, 1000] * 50)
    assert padded_tokens(lengths, 1) == lengths.sum()
    assert padded_tokens(lengths, 100) == 100 * 1000  # one micro-batch padded to its longest row
    cfg = dataclasses.replace(QLORA_8B, epochs=1.0)
    plain = train_seconds(LLAMA_8B, cfg, lengths, 100, 989, False, 1)
    assert train_seconds(LLAMA_8B, cfg, lengths, 100, 989, True, 1) == pytest.approx(1.5 * plain)  # 6N vs 4N
    assert train_seconds(LLAMA_8B, cfg, lengths, 100, 989, False, 1, processes=2) == pytest.approx(plain / 2)


def test_quantize_plan_merges_nf4_on_the_gpu_and_original_on_the_host():
    recipe = load_recipe(ROOT / "experiments" / "gpu-8b-random.yaml")
    nf4 = quantize_plan(LLAMA_8B, recipe.quant, 989)
    assert nf4.merge_gpu_gib > LLAMA_8B.params * 2 / GIB  # bf16 weights and their NF4 copy at once
    host = quantize_plan(LLAMA_8B, dataclasses.replace(recipe.quant, merge_base="original"), 989)
    assert host.merge_gpu_gib == 0 and host.merge_host_gib > nf4.merge_host_gib
    rtn = quantize_plan(LLAMA_8B, dataclasses.replace(recipe.quant, method="rtn"), 989)
    assert rtn.quantize_seconds < nf4.quantize_seconds  # no grid search


def test_plan_says_which_stages_of_the_34b_recipe_fit_two_t4(capsys):
    result = plan_stage(load_recipe(ROOT / "experiments" / "kaggle-2xt4-34b.yaml"), rows=25_000, gpu="T4", count=2)
    fits = {s.stage: s.fits for s in result.stages}
    assert fits == {"finetune": False, "quantize": False, "scoring": True}, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "needs a bigger card: finetune, quantize" in out and "needs a card with >=" in out


def test_plan_fits_the_8b_chain_on_one_h100(capsys):
    result = plan_stage(load_recipe(ROOT / "experiments" / "gpu-8b-random.yaml"), rows=2000, gpu="H100", count=1)
    assert all(s.fits for s in result.stages), capsys.readouterr().out
    assert "micro-batch 2" in result.stages[0].detail


def test_gradient_checkpointing_takes_true_false_or_auto_only():
    recipe = load_recipe(ROOT / "experiments" / "cpu-smollm2.yaml", ["train.gradient_checkpointing=true"])
    assert recipe.train.gradient_checkpointing is True
    assert load_recipe(None, ["train.gradient_checkpointing=auto"]).train.gradient_checkpointing == "auto"
    with pytest.raises(RecipeError, match="gradient_checkpointing"):
        load_recipe(None, ["train.gradient_checkpointing=sometimes"])


def test_settle_memory_turns_auto_off_on_cpu(tiny_checkpoint):
    from arenaflow.train_fit import settle_memory

    cfg, fit = settle_memory(TrainConfig(gradient_checkpointing="auto", batch_size=4), tiny_checkpoint, 128)
    assert cfg.gradient_checkpointing is False and cfg.batch_size == 4 and fit is None
    same, _ = settle_memory(TrainConfig(gradient_checkpointing=True), tiny_checkpoint, 128)
    assert same.gradient_checkpointing is True


def test_vllm_is_sized_from_the_memory_free_now(monkeypatch, capsys):
    engine = EngineConfig(gpu_memory_utilization=0.85)
    monkeypatch.setattr(hardware, "gpu_memory_gib", lambda devices=1: (79.0, 79.18))
    assert backends.memory_utilization(engine) == 0.85
    # What broke quantize at 8B: 59.19 of 79.18 GiB free, 0.85 asked.
    monkeypatch.setattr(hardware, "gpu_memory_gib", lambda devices=1: (59.19, 79.18))
    share = backends.memory_utilization(engine)
    assert share * 79.18 <= 59.19 - backends.GPU_MEMORY_MARGIN_GIB + 0.1 and share > 0.7
    assert "instead of the recipe's 0.85" in capsys.readouterr().out
    monkeypatch.setattr(hardware, "gpu_memory_gib", lambda devices=1: (2.0, 79.18))
    with pytest.raises(backends.ScoringError, match="free on the GPU"):
        backends.memory_utilization(engine)
    monkeypatch.setattr(hardware, "gpu_memory_gib", lambda devices=1: None)  # a CPU machine
    assert backends.memory_utilization(engine) == 0.85


def test_flashinfer_sampler_is_off_when_flashinfer_is_not_installed(monkeypatch):
    monkeypatch.setattr(backends, "_on_cuda", lambda: True)
    for name in ("VLLM_USE_FLASHINFER_SAMPLER", "VLLM_WORKER_MULTIPROC_METHOD", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)  # recorded: whatever _set_vllm_env sets is undone afterwards
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    backends._set_vllm_env(EngineConfig())
    assert backends.os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")  # the user's own setting wins
    backends._set_vllm_env(EngineConfig())
    assert backends.os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "1"
