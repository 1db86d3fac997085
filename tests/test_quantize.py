"""Merge + quantize on the tiny random Llama (hidden 128): fast, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llmcompressor")

from arenaflow.scoring.engines import label_probabilities  # noqa: E402
from arenaflow.models import label_token_ids  # noqa: E402
from arenaflow.quantize import (  # noqa: E402
    QuantizeError,
    checkpoint_size_bytes,
    merge_adapter,
    quantize_checkpoint,
    quantize_within_bound,
)
from arenaflow.recipe import QuantConfig, RecipeError  # noqa: E402
from arenaflow.stages.runs import checkpoint_precision  # noqa: E402

TEXTS = [
    "Which answer is better? Answer A, B or tie.",
    "Compare the two responses about photosynthesis and pick the more helpful one.",
    "User asked for a haiku about autumn. Response A rhymes; response B counts syllables.",
    "Explain recursion to a child. Which explanation is clearer, A or B, or is it a tie?",
]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t * 4)[:64] for t in TEXTS]


def _label_probs(model, prompts, label_ids) -> torch.Tensor:
    """N x 3 probabilities of the label tokens after each prompt (the transformers engine's computation)."""
    return torch.from_numpy(label_probabilities(model, prompts, label_ids, pad_id=0)).float()


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_merge_matches_peft_model(tiny, tmp_path, tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # as train.py does: LoRA on every linear layer + trainable rows for the label tokens (tied embeddings)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": label_token_ids(tokenizer)},
    )
    peft_model = get_peft_model(_load(tiny), lora).eval()
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)  # a real delta, not the zero init
    rows = [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]
    assert rows
    with torch.no_grad():
        for p in rows:
            p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        base_logits = _load(tiny)(ids).logits
    merged_dir = merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    with torch.no_grad():
        merged = _load(merged_dir)(ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)  # ...and the merge keeps it


def test_merge_sequence_classification_adapter(tiny, tmp_path, prompts):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=3, dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="SEQ_CLS")
    peft_model = get_peft_model(base, lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    merged_dir = merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_merge_refuses_4bit_dtype(tiny, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(QuantizeError, match="never merged into 4-bit"):
        merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged", dtype="nf4")


@pytest.fixture(scope="module")
def unrelated(tiny, tmp_path_factory) -> Path:
    """Another random tiny Llama (seed 1): how far a model that shares nothing with `tiny` lands."""
    from arenaflow.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("seed1") / "tiny", tokenizer_from=tiny, seed=1)


def _next_token_logprobs(path, prompts) -> torch.Tensor:
    """N x vocab log-probabilities of the token after each prompt (the whole vocabulary: more than 3 labels)."""
    model = _load(path)
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1) for p in prompts])


# Measured: W4A16 lands at 0.14 of the unrelated model's distance, W8A16 at 0.008.
@pytest.mark.parametrize("scheme,bits,share", [("W4A16", 4, 0.35), ("W8A16", 8, 0.03)])
def test_awq_checkpoint_reloads_close(tiny, unrelated, tmp_path, prompts, scheme, bits, share):
    config = QuantConfig(scheme=scheme, method="awq", group_size=64, calibration_rows=4, calibration_max_length=64)
    out = quantize_checkpoint(tiny, tmp_path / scheme, config, calibration=prompts)
    hf = json.loads((out / "config.json").read_text())
    quant = hf["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    assert quant["ignore"] == ["lm_head"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (bits, 64, "group")
    assert (out / "tokenizer.json").exists()
    assert checkpoint_size_bytes(out) < checkpoint_size_bytes(tiny)

    reference = _next_token_logprobs(tiny, prompts)
    error = (_next_token_logprobs(out, prompts) - reference).abs().max()
    null = (_next_token_logprobs(unrelated, prompts) - reference).abs().max()
    assert 0 < error < share * null, (float(error), float(null))  # changed by quantization, still the same model


def test_rtn_needs_no_calibration(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "rtn", QuantConfig(scheme="W4A16", method="rtn", group_size=32))
    assert checkpoint_precision(out, "auto") == "W4A16"
    assert checkpoint_size_bytes(out) < checkpoint_size_bytes(tiny)


def test_scheme_none_copies(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "none", QuantConfig(scheme="none"))
    assert checkpoint_precision(out, "auto") == "float32"  # unquantized: the tiny model's own dtype
    assert checkpoint_size_bytes(out) == checkpoint_size_bytes(tiny)


def test_autoawq_is_refused_with_reason(tiny, tmp_path):
    with pytest.raises(RecipeError, match="archived upstream.*method=awq"):
        quantize_checkpoint(tiny, tmp_path / "x", QuantConfig(method="autoawq"), calibration=[[1, 2, 3]])
    assert not (tmp_path / "x").exists()


def test_bad_group_size_is_refused(tiny, tmp_path, prompts):
    # tiny layers read 128 (attention, up/gate) or 256 (down_proj) features: 96 divides neither
    with pytest.raises(QuantizeError, match=r"group_size=96 does not divide.*fit: \[32, 64, 128\]"):
        quantize_checkpoint(tiny, tmp_path / "x", QuantConfig(group_size=96), calibration=prompts)
    assert not (tmp_path / "x").exists()


def test_unknown_scheme_and_missing_calibration(tiny, tmp_path):
    with pytest.raises(RecipeError, match="quant.scheme: 'W3A16' is not one of W4A16, W8A16, none"):
        quantize_checkpoint(tiny, tmp_path / "x", QuantConfig(scheme="W3A16"))
    with pytest.raises(QuantizeError, match="needs calibration"):
        quantize_checkpoint(tiny, tmp_path / "x", QuantConfig(method="awq"), calibration=[])


def test_checkpoint_size_counts_weights_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "model-00002.bin").write_bytes(b"x" * 10)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_size_bytes(tmp_path) == 110


def test_nf4_merge_reproduces_the_qlora_model(tiny, tmp_path, tokenizer, prompts):
    """A QLoRA adapter merged into the NF4-rounded base scores like the trained (4-bit) model; merged
    into the original weights it carries the 4-bit rounding error on top."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, quantization_config=nf4).eval()
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    qlora = get_peft_model(base4, lora).eval()
    qlora.save_pretrained(tmp_path / "adapter")
    labels = label_token_ids(tokenizer)
    trained = _label_probs(qlora, prompts, labels)

    def gap(base_weights: str) -> float:
        out = merge_adapter(tiny, tmp_path / "adapter", tmp_path / base_weights, "float32", base_weights)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        return float((_label_probs(_load(out), prompts, labels) - trained).abs().max())

    nf4_gap, original_gap = gap("nf4"), gap("original")
    print(f"max |dP| vs the trained QLoRA model: nf4 merge {nf4_gap:.2e}, original merge {original_gap:.2e}")
    # Relative, not absolute: the nf4 gap is float rounding whose size depends on the CPU's kernels (3.2e-4 on
    # an AVX512-BF16/AMX Xeon, 1.5e-7 elsewhere); the original-weights gap is the 4-bit error itself.
    assert original_gap > 1e-3 and nf4_gap < original_gap / 10


def test_a_scheme_over_the_log_loss_bound_falls_back(tiny, tmp_path):
    """W4A16 is 'measured' 0.02 worse than the merged model (over the 0.005 bound): the W8A16 fallback,
    0.001 worse, is registered instead; with both over it, the merged checkpoint itself."""
    change = {"merged": 0.0, "W4A16": 0.02, "W8A16": 0.001}
    score = lambda checkpoint: change[checkpoint.name if checkpoint.name in change else "merged"]  # noqa: E731
    config = QuantConfig(scheme="W4A16", method="rtn", group_size=32, fallback_schemes=["W8A16"])
    chosen = quantize_within_bound(tiny, tmp_path, config, [], score, log_loss_of=float)
    assert (chosen.scheme, chosen.checkpoint) == ("W8A16", tmp_path / "W8A16")
    assert "W4A16: log_loss +0.0200" in chosen.note and "over quant.max_log_loss_delta=0.005" in chosen.note
    change["W8A16"] = 0.01
    chosen = quantize_within_bound(tiny, tmp_path / "again", config, [], score, log_loss_of=float)
    assert (chosen.scheme, chosen.checkpoint) == ("none", tiny) and "unquantized" in chosen.note
