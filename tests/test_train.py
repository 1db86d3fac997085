"""Finetuning on the answer token (tiny random Llama with SmolLM2's tokenizer; CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from arenaflow.data import load_rows, subsample
from arenaflow.models import load_tokenizer, resolve_model
from arenaflow.prompts import PromptBuilder
from arenaflow.recipe import PromptConfig, RecipeError, TrainConfig
from arenaflow.scoring.engines import label_probabilities
from arenaflow.train import (
    IGNORE_INDEX, AnswerCollator, TrainError, answer_token_example, finetune, prepare_training,
    row_targets, three_way_loss,
)

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPT = PromptConfig(max_length=96)
LABEL_IDS = [32, 33, 34]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model("tiny:llama")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """8 real rows, labels A, B, tie all present."""
    table = load_rows(DATA / "mtbench_human_turn1.csv")
    picked = pd.concat([table[table["label"] == k].head(n) for k, n in ((0, 3), (1, 3), (2, 2))])
    return picked.reset_index(drop=True)


def overfit_config(**changes) -> TrainConfig:
    values = dict(epochs=8, batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, warmup_ratio=0.0,
                  lora_dropout=0.0, load_in_4bit=False)
    values.update(changes)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- pure parts

def test_answer_token_example_masks_everything_but_the_answer():
    prompt = [5, 6, 7, 8]
    for label in (0, 1, 2):
        example = answer_token_example(prompt, LABEL_IDS, label)
        assert example["input_ids"] == prompt + [LABEL_IDS[label]]
        assert len(example["labels"]) == len(example["input_ids"])
        assert example["labels"][:-1] == [IGNORE_INDEX] * len(prompt)
        assert example["labels"][-1] == LABEL_IDS[label]
    with pytest.raises(TrainError):
        answer_token_example(prompt, LABEL_IDS, -1)


def test_trl_collator_pads_labels_with_ignore_and_adds_no_eos():
    examples = [{**answer_token_example(ids, LABEL_IDS, label), "targets": np.eye(3)[label].tolist()}
                for ids, label in (([5, 6, 7], 0), ([5, 6, 7, 8, 9], 2))]
    batch = AnswerCollator(pad_token_id=1)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 32, 1, 1], [5, 6, 7, 8, 9, 34]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 32, -100, -100], [-100] * 5 + [34]]
    assert batch["targets"].tolist() == [[1, 0, 0], [0, 0, 1]]


def test_soft_label_loss_equals_hard_label_loss_on_one_hot_targets():
    torch.manual_seed(0)
    logits = torch.randn(6, 3) * 3
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    one_hot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(three_way_loss(logits, one_hot), F.cross_entropy(logits, labels, reduction="none"))
    # A row whose soft labels are one-hot gets exactly the target of the same hard label.
    table = pd.DataFrame({"label": [0, 1, 2, -1, -1], "p_a": [np.nan, 0, np.nan, 0.2, np.nan],
                          "p_b": [np.nan, 1, np.nan, 0.5, np.nan], "p_tie": [np.nan, 0, np.nan, 0.3, np.nan]})
    targets = row_targets(table)
    np.testing.assert_array_equal(targets[:3], np.eye(3))
    np.testing.assert_allclose(targets[3], [0.2, 0.5, 0.3])
    assert np.isnan(targets[4]).all()  # unlabelled
    # Soft targets: minimised (= entropy of the targets) exactly at logits = log(targets).
    soft = torch.tensor([[0.2, 0.5, 0.3]])
    entropy = -(soft * soft.log()).sum()
    torch.testing.assert_close(three_way_loss(soft.log(), soft)[0], entropy)


def test_subsample_is_deterministic_and_keeps_order(rows):
    a, b = subsample(rows, 5, seed=3), subsample(rows, 5, seed=3)
    assert a.index.tolist() == b.index.tolist() == sorted(a.index)
    assert len(a) == 5 and subsample(rows, None, 3) is rows and subsample(rows, 50, 3) is rows


# ----------------------------------------------------------------------------- with TRL

def test_trainer_dataset_keeps_prebuilt_ids_no_eos(tiny, rows, tmp_path):
    """What TRL's preparation + collator hand to compute_loss: our ids untouched, one loss token."""
    unlabelled = rows.head(1).assign(label=-1)
    run = prepare_training(tiny, pd.concat([rows, unlabelled]), None, PROMPT, overfit_config(epochs=1), tmp_path)
    assert run.rows_unlabelled == 1 and len(run.train_rows) == len(rows)
    prompts = run.builder.build_rows(rows)
    dataset = run.trainer.train_dataset
    assert len(dataset) == len(rows)
    for example, prompt_ids, label in zip(dataset, prompts, rows["label"]):
        assert example == {**answer_token_example(prompt_ids, run.builder.label_ids, label),
                           "targets": np.eye(3)[label].tolist()}
    batch = run.trainer.data_collator([dataset[i] for i in range(len(dataset))])
    answer = batch["labels"] != IGNORE_INDEX
    assert answer.sum(dim=1).tolist() == [1] * len(rows)  # no EOS (or any other) loss token
    assert run.tokenizer.eos_token_id not in batch["labels"][answer].tolist()


def test_finetune_overfits_tiny_set_and_reports_to_the_callers_logger(tiny, rows, tmp_path):
    logged: list[tuple[dict, int]] = []  # what the stage would log into its MLflow run
    result = finetune(tiny, rows, rows, PROMPT, overfit_config(), tmp_path / "out",
                      log_metrics=lambda metrics, step: logged.append((metrics, step)))
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == result.steps == 8
    assert losses[-1] < losses[0] - 0.1, losses
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "tokenizer.json").exists()
    assert json.loads((result.adapter_dir / "arenaflow_train.json").read_text())["head"] == "lm"
    assert result.rows_trained == 8 and result.examples_seen == 64 and result.seconds_per_row > 0
    # Validation on the training rows after step k == the training loss of step k+1 (no dropout):
    # the in-training scorer and the training loss read the same three probabilities.
    assert len(result.valid) == 8
    for figure, later in zip(result.valid, losses[1:]):
        assert figure["log_loss"] == pytest.approx(later, abs=1e-4)
    # Reported to the caller's logger, by optimizer step.
    train_steps = [step for metrics, step in logged if "train_loss" in metrics]
    assert train_steps == list(range(1, 9))
    assert all("learning_rate" in m for m, _ in logged if "train_loss" in m)
    valid_logged = [m["valid_log_loss"] for m, _ in logged if "valid_log_loss" in m]
    assert valid_logged == [v["log_loss"] for v in result.valid]


def test_qlora_nf4_overfits_tiny_set_and_adapter_reloads(tiny, rows, tmp_path, monkeypatch):
    import bitsandbytes.nn.modules
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    from arenaflow.train import load_base_model

    # Also the config paths: gradient checkpointing and accumulation (2 x 4 rows = one step of 8).
    cfg = overfit_config(load_in_4bit=True, batch_size=4, gradient_accumulation_steps=2, gradient_checkpointing=True)
    result = finetune(tiny, rows, None, PROMPT, cfg, tmp_path / "out")
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
    assert result.examples_seen == 64
    assert result.valid == []
    assert (result.adapter_dir / "adapter_config.json").exists()
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)  # as on such a CPU
    base = load_base_model(tiny, cfg)
    quantized = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)  # no inference repack
    PeftModel.from_pretrained(base, result.adapter_dir)


def test_classifier_head_trains_and_merged_model_reads_the_same(tiny, rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    calls = []

    def valid_fn(model):
        calls.append(model.training)
        return {"log_loss": 1.0}

    cfg = overfit_config(head="classifier", epochs=2, load_in_4bit=False)
    result = finetune(tiny, rows, rows, PROMPT, cfg, tmp_path / "out", valid_log_loss_fn=valid_fn)
    assert result.steps == 2 and calls == [False, False]  # once per epoch, in eval mode
    assert [v["log_loss"] for v in result.valid] == [1.0, 1.0]

    tokenizer = load_tokenizer(tiny)
    builder = PromptBuilder(tokenizer, PROMPT)
    ids = builder.build_rows(rows)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    head_before = base.get_output_embeddings().weight[builder.label_ids].detach().clone()
    peft_model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    with_adapter = label_probabilities(peft_model, ids, builder.label_ids, tokenizer.pad_token_id)
    merged = peft_model.merge_and_unload().eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    head_after = merged.get_output_embeddings().weight[builder.label_ids]
    assert not torch.allclose(head_before, head_after)  # the three head rows were trained
    after_merge = label_probabilities(merged, ids, builder.label_ids, tokenizer.pad_token_id)
    np.testing.assert_allclose(after_merge, with_adapter, atol=1e-5)


def test_bad_config_is_refused(tiny, rows, tmp_path):
    with pytest.raises(RecipeError, match="train.head: 'regression' is not one of lm, classifier"):
        prepare_training(tiny, rows, None, PROMPT, overfit_config(head="regression"), tmp_path)
    with pytest.raises(TrainError, match="no labelled"):
        prepare_training(tiny, rows.assign(label=-1), None, PROMPT, overfit_config(), tmp_path)


def test_keep_best_epoch_saves_the_adapter_of_the_lowest_validation_log_loss(tiny, rows, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    figures = iter([0.9, 0.5, 0.7])
    seen = []

    def valid_fn(model):
        seen.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        return {"log_loss": next(figures)}

    result = finetune(tiny, rows, rows, PROMPT, overfit_config(epochs=3, keep_best_epoch=True), tmp_path / "out",
                      valid_log_loss_fn=valid_fn)
    assert [v["log_loss"] for v in result.valid] == [0.9, 0.5, 0.7]
    assert result.kept["log_loss"] == 0.5 and result.kept["epoch"] == pytest.approx(2.0)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == seen[1].keys()
    assert all(torch.equal(saved[k], seen[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], seen[2][k]) for k in saved)  # the last epoch did move the weights

    last = finetune(tiny, rows, rows, PROMPT, overfit_config(epochs=2), tmp_path / "last",
                    valid_log_loss_fn=lambda model: {"log_loss": 1.0})
    assert last.kept == last.valid[-1]  # without keep_best_epoch: the last epoch's adapter and figures
