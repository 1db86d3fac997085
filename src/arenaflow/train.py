"""Finetune a causal LM to answer "A", "B" or "tie": LoRA / QLoRA with TRL's SFTTrainer.

Each row becomes `PromptBuilder` ids (ending at the assistant generation prompt) + one answer token;
`labels` are -100 everywhere except that answer token (`answer_token_example`). Pre-tokenized data
makes TRL skip its own tokenization, so it appends no EOS and puts no loss anywhere else.

Loss (one function for hard and soft labels): 3-way cross-entropy between the target distribution
(`p_a, p_b, p_tie` when present, else the one-hot of `label`) and the softmax over the three
label-token logits at the answer position (`three_way_loss`). The scorer renormalises over the same
three tokens, so this objective *is* the metric (multi-class log-loss); full-vocabulary CE would in
addition spend gradient on pushing probability off the other ~49k tokens, which renormalisation
throws away, and for soft targets it is the same optimum plus that extra term. On a hard label the
3-way CE equals `F.cross_entropy` over the three logits (tested).

`train.head`:
  * "lm": LoRA only; scores are the three LM-head rows of the (LoRA-adapted) last hidden state.
  * "classifier": the same 3-way head, but its three LM-head rows are trained too (peft
    `trainable_token_indices`). It is a 3-way linear classifier initialised from the LM head, stored
    *inside* the LM head, so `merge_and_unload()` yields a plain causal LM that every scorer reads
    unchanged (a separate nn.Linear would need a new architecture after merging). On a model with
    tied embeddings the three rows are shared with the input embeddings of "A", "B", "tie", so those
    input embeddings move too (peft keeps the tie).

bitsandbytes on CPU: an eval-mode no_grad forward on a 4-bit model repacks weights into an
inference-only layout on AVX512-BF16 CPUs, after which training gets wrong gradients. Training never
runs a forward before its first step, and the repack is switched off on every Linear4bit we load
(`_disable_cpu_inference_repack`), so the in-training validation between epochs is safe too.

Speed levers (TrainConfig keys, each defaulting to the behaviour before it; `arenaflow bench --train`
times them against plain peft): adapter_dtype, upcast_layer_norms, autocast, attn_implementation,
padding_free, group_by_length, optim, torch_compile, use_liger_kernel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import SOFT_COLUMNS, subsample
from .recipe import PromptConfig, TrainConfig, check_section
from .train_log import TrainError, make_log_callback, make_validator

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # padding-free


@dataclass
class TrainResult:
    adapter_dir: Path
    train_loss: float  # mean training loss over the whole run (the Trainer's figure)
    loss_history: list[dict] = field(default_factory=list)  # per logged step: step, epoch, loss, learning_rate
    valid: list[dict] = field(default_factory=list)  # per epoch: epoch, step, log_loss, ...
    kept: dict = field(default_factory=dict)  # the saved adapter's entry of `valid` (best or last); {} unvalidated
    seconds: float = 0.0  # wall time of training, in-training validation excluded
    valid_seconds: float = 0.0  # wall time of the in-training validation
    rows_trained: int = 0  # distinct training rows after subsampling
    examples_seen: int = 0  # rows processed by training steps (rows x epochs)
    seconds_per_row: float = 0.0  # seconds / examples_seen
    steps: int = 0  # optimizer steps
    rows_unlabelled: int = 0  # training rows without label or soft labels (not trainable, skipped)
    valid_rows: int = 0
    head: str = "lm"
    peak_gpu_memory_gib: float | None = None  # NVML, during training only (None on CPU)
    planned: dict = field(default_factory=dict)  # plan_stages' prediction for this run on this card (GPU only)


# ----------------------------------------------------------------------------- pure helpers

def answer_token_example(prompt_ids: Sequence[int], label_ids: Sequence[int], label: int) -> dict[str, list[int]]:
    """`input_ids` = prompt ids + the answer token of `label`; `labels` = -100 except at that token."""
    if label not in (0, 1, 2):
        raise TrainError(f"label must be 0 (A), 1 (B) or 2 (tie), got {label!r}")
    answer = int(label_ids[label])
    prompt = [int(i) for i in prompt_ids]
    return {"input_ids": prompt + [answer], "labels": [IGNORE_INDEX] * len(prompt) + [answer]}


def row_targets(rows: pd.DataFrame) -> np.ndarray:
    """N x 3 target distributions: soft labels where all three are present, else the one-hot of
    `label`; a row with neither is all NaN (unlabelled)."""
    n = len(rows)
    targets = np.full((n, 3), np.nan)
    labels = rows["label"].to_numpy() if "label" in rows.columns else np.full(n, -1)
    hard = np.isin(labels, (0, 1, 2))
    targets[hard] = np.eye(3)[labels[hard].astype(int)]
    if all(c in rows.columns for c in SOFT_COLUMNS):
        soft = rows[list(SOFT_COLUMNS)].to_numpy(dtype=float)
        has_soft = np.isfinite(soft).all(axis=1)
        targets[has_soft] = soft[has_soft] / soft[has_soft].sum(axis=1, keepdims=True)
    return targets


def three_way_loss(label_logits, targets):
    """Per-row cross-entropy between `targets` (N x 3 distributions) and softmax(label_logits)."""
    import torch

    log_probs = torch.log_softmax(label_logits.float(), dim=-1)
    return -(targets.to(log_probs) * log_probs).sum(dim=-1)


def _dtype(name: str):
    """The torch dtype of a checked dtype key (recipe.COMPUTE_DTYPES / ADAPTER_DTYPES)."""
    import torch

    return getattr(torch, name)


def _target_modules(spec: str):
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    modules = [m.strip() for m in spec.split(",") if m.strip()]
    if not modules:
        raise TrainError("train.target_modules is empty (use all-linear or a comma list)")
    return modules


def check_config(cfg: TrainConfig) -> None:
    """Refuse, before any weights load, what cannot train here: a value outside its key's set or range
    (recipe.check_section, for a config changed in code), and what depends on this machine or transformers."""
    import torch

    check_section(cfg)
    _target_modules(cfg.target_modules)
    if cfg.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise TrainError("train.attn_implementation=flex_attention has no backward on CPU (torch); use sdpa here")
    if cfg.autocast == "float16" and adapter_dtype(cfg) != "float32":
        raise TrainError("train.autocast=float16 scales gradients and needs float32 adapters (train.adapter_dtype)")
    from transformers.training_args import OptimizerNames

    if cfg.optim not in {o.value for o in OptimizerNames}:
        raise TrainError(f"train.optim {cfg.optim!r} is not a transformers optimizer (e.g. adamw_torch, adamw_torch_fused)")
    if cfg.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise TrainError("train.use_liger_kernel needs the liger-kernel package, which is not installed here "
                         "(pip install liger-kernel); set it to false")


def adapter_dtype(cfg: TrainConfig) -> str:
    """The LoRA weights' dtype: `adapter_dtype`, or for "compute" the compute dtype (float16 -> float32)."""
    if cfg.adapter_dtype != "compute":
        return cfg.adapter_dtype
    return "float32" if cfg.bnb_4bit_compute_dtype == "float16" else cfg.bnb_4bit_compute_dtype


def autocast_flags(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer: "auto" is bf16 autocast for a bfloat16 model that is not 4-bit."""
    if cfg.autocast == "auto":
        return cfg.bnb_4bit_compute_dtype == "bfloat16" and not cfg.load_in_4bit, False
    return cfg.autocast == "bfloat16", cfg.autocast == "float16"


# ----------------------------------------------------------------------------- model side

def _answer_logits(model, inputs, label_ids):
    """The three label-token logits that predict each example's answer token: N x 3, in example order.
    `logits_to_keep` (the positions the collator found) keeps the LM head to those positions instead of
    the full-vocabulary logits of every token. A padding-free batch is one row (with `position_ids`)."""
    packed = {k: inputs[k] for k in PACKED_KEYS if k in inputs}
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                   logits_to_keep=inputs["answer_keep"], use_cache=False, **packed).logits
    return logits[inputs["answer_rows"], inputs["answer_which"]][:, list(label_ids)]


def _disable_cpu_inference_repack(model) -> None:
    """Stop bitsandbytes' Linear4bit from repacking weights for CPU inference on eval forwards
    (AVX512-BF16 CPUs), which would break training that continues after a validation pass."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(checkpoint: Path, cfg: TrainConfig, trust_remote_code: bool = False):
    """The base causal LM for training: NF4 4-bit (prepared for k-bit training) or plain weights."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _dtype(cfg.bnb_4bit_compute_dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if cfg.load_in_4bit:
        _disable_cpu_inference_repack(model)
        from peft import prepare_model_for_kbit_training

        if cfg.upcast_layer_norms:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        else:  # the same minus its float32 upcast: freeze (the Trainer turns checkpointing on)
            model.requires_grad_(False)
    return model


def lora_config(model, cfg: TrainConfig, label_ids: Sequence[int]):
    from peft import LoraConfig

    kwargs = {}
    if cfg.head == "classifier":
        # Train the three LM-head rows. With tied embeddings peft trains them through the input
        # embedding and ties the LM head to it; otherwise target the LM head itself.
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        target = model.get_input_embeddings() if tied else model.get_output_embeddings()
        name = next(n for n, m in model.named_modules() if m is target)
        kwargs["trainable_token_indices"] = {name.split(".")[-1]: list(label_ids)}
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=_target_modules(cfg.target_modules), bias="none", task_type="CAUSAL_LM", **kwargs,
    )


# ----------------------------------------------------------------------------- trainer side

class AnswerCollator:
    """TRL's collator for input_ids/labels (right padding, labels padded with -100; `padding_free`: one row
    with position_ids) + `targets` + where the answers are: `answer_rows` / `answer_which` index the
    logits of `logits_to_keep=answer_keep` (the positions that predict the answer tokens, deduplicated)."""

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=padding_free)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.inner([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        batch.pop("seq_idx", None)  # linear-attention layers only
        answer = batch["labels"] != IGNORE_INDEX
        rows, columns = answer.nonzero(as_tuple=True)
        if len(rows) != len(examples) or (not self.inner.padding_free and not bool((answer.sum(dim=1) == 1).all())):
            raise TrainError("every training example needs exactly one answer token in labels")
        batch["answer_keep"], batch["answer_which"] = torch.unique(columns - 1, return_inverse=True)
        batch["answer_rows"] = rows
        batch["targets"] = torch.tensor([e["targets"] for e in examples], dtype=torch.float32)
        return batch


def _make_trainer_class():
    import torch
    from trl import SFTTrainer

    class AnswerTokenTrainer(SFTTrainer):
        """SFTTrainer whose loss is `three_way_loss` at the answer token (see module doc)."""

        label_ids: list[int] = []
        rows_seen: int = 0

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["input_ids", "labels", "targets"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = _answer_logits(model, inputs, self.label_ids)
            per_row = three_way_loss(logits, inputs["targets"])
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # The Trainer counts answer tokens over the whole accumulation window: an exact mean.
                loss = per_row.sum() / torch.as_tensor(num_items_in_batch).to(per_row.device).clamp(min=1)
            else:
                loss = per_row.mean()
            mode = "train" if model.training else "eval"
            if mode == "train":
                self.rows_seen += int(inputs["targets"].shape[0])
            hit = (logits.argmax(dim=-1) == inputs["targets"].argmax(dim=-1).to(logits.device)).float().mean()
            self._metrics[mode]["label_accuracy"].append(float(hit))
            return (loss, {"logits": logits}) if return_outputs else loss

    return AnswerTokenTrainer


def answer_examples(prompts: Sequence[Sequence[int]], label_ids: Sequence[int], targets: np.ndarray) -> dict[str, list]:
    """Training columns: prompt ids + the answer token of argmax(target) (`answer_token_example`), targets."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "targets": []}
    for prompt_ids, target in zip(prompts, targets):
        example = answer_token_example(prompt_ids, label_ids, int(np.argmax(target)))
        columns["input_ids"].append(example["input_ids"])
        columns["labels"].append(example["labels"])
        columns["targets"].append([float(t) for t in target])
    return columns


@dataclass
class PreparedTraining:
    """Everything `finetune` builds before training (tests inspect `trainer` as TRL prepared it)."""

    trainer: object
    callback: object
    tokenizer: object
    builder: object
    train_rows: pd.DataFrame
    valid_rows: pd.DataFrame | None
    rows_unlabelled: int
    timing: dict
    history: list
    valid: list


def prepare_training(base_checkpoint: Path, train_rows: pd.DataFrame, valid_rows: pd.DataFrame | None,
                     prompt_cfg: PromptConfig, train_cfg: TrainConfig, out_dir: Path,
                     valid_log_loss_fn: Callable | None = None, *, trust_remote_code: bool = False,
                     log_metrics: Callable[[dict, int], None] | None = None) -> PreparedTraining:
    """Tokenize, subsample, load the base (4-bit or not), wrap it in LoRA and build the trainer."""
    from datasets import Dataset

    from .models import load_tokenizer
    from .prompts import PromptBuilder

    check_config(train_cfg)
    base_checkpoint, out_dir = Path(base_checkpoint), Path(out_dir)
    tokenizer = load_tokenizer(base_checkpoint, trust_remote_code=trust_remote_code)
    builder = PromptBuilder(tokenizer, prompt_cfg)

    targets = row_targets(train_rows)
    usable = np.isfinite(targets).all(axis=1)
    rows_unlabelled = int((~usable).sum())
    if rows_unlabelled:
        logger.warning("skipping %d of %d training rows without a label or soft labels", rows_unlabelled, len(train_rows))
    train = subsample(train_rows[usable], train_cfg.max_train_rows, train_cfg.seed)
    if train.empty:
        raise TrainError("no labelled training rows (label 0/1/2 or p_a/p_b/p_tie)")
    train_dataset = Dataset.from_dict(answer_examples(builder.build_rows(train), builder.label_ids, row_targets(train)))

    valid = subsample(valid_rows, train_cfg.max_valid_rows, train_cfg.seed) if valid_rows is not None else None
    validate = valid_log_loss_fn
    if validate is None and valid is not None and len(valid):
        validate = make_validator(builder.build_rows(valid), row_targets(valid), valid["label"].to_numpy(),
                                  builder.label_ids, tokenizer.pad_token_id, train_cfg.batch_size * prompt_cfg.max_length)
    trainer, callback, timing, history, valid_figures = build_trainer(
        base_checkpoint, train_dataset, tokenizer, builder.label_ids, train_cfg, out_dir, validate,
        trust_remote_code=trust_remote_code, log_metrics=log_metrics)
    return PreparedTraining(trainer, callback, tokenizer, builder, train, valid, rows_unlabelled, timing,
                            history, valid_figures)


def build_trainer(base_checkpoint: Path, train_dataset, tokenizer, label_ids: Sequence[int], train_cfg: TrainConfig,
                  out_dir: Path, validate: Callable | None = None, *, trust_remote_code: bool = False,
                  log_metrics: Callable[[dict, int], None] | None = None):
    """The trainer of `finetune` (and `bench --train`) on input_ids/labels/targets rows: base model, LoRA,
    SFTConfig, AnswerCollator, answer-token loss, log callback -> (trainer, callback, timing, history, valid)."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig

    check_config(train_cfg)
    if train_cfg.gradient_checkpointing == "auto":
        from .train_fit import settle_memory

        train_cfg = settle_memory(train_cfg, base_checkpoint, max(len(ids) for ids in train_dataset["input_ids"]))[0]
    set_seed(train_cfg.seed)  # the LoRA init too (the Trainer seeds only later), whatever ran before
    model = load_base_model(base_checkpoint, train_cfg, trust_remote_code=trust_remote_code)
    model = get_peft_model(model, lora_config(model, train_cfg, label_ids))
    bf16, fp16 = autocast_flags(train_cfg)
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "trainer"),
        num_train_epochs=train_cfg.epochs,
        learning_rate=train_cfg.learning_rate,
        per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train_cfg.gradient_checkpointing else None,
        warmup_steps=train_cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        max_length=None,  # PromptBuilder already bounds the length; TRL's truncation would cut the answer
        packing=False,  # padding-free without packing is our collator's (TRL refuses a custom collator then)
        bf16=bf16,  # SFTConfig defaults bf16 to True
        fp16=fp16,
        optim=train_cfg.optim,
        torch_compile=train_cfg.torch_compile,
        use_liger_kernel=train_cfg.use_liger_kernel,
        train_sampling_strategy="group_by_length" if train_cfg.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",  # MLflow logging goes through our callback into the caller's run
        dataloader_pin_memory=False,
        disable_tqdm=False,
    )
    history: list[dict] = []
    valid_figures: list[dict] = []
    timing = {"valid_seconds": 0.0}
    callback = make_log_callback(validate, history, valid_figures, timing, train_cfg.keep_best_epoch, log_metrics)
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
        data_collator=AnswerCollator(tokenizer.pad_token_id, train_cfg.padding_free), callbacks=[callback],
    )
    trainer.label_ids = list(label_ids)
    # TRL casts a quantized model's trainable parameters to bf16 (QLoRA paper); keep them in
    # `adapter_dtype(train_cfg)` instead (by default the compute dtype, float32 in the GPU recipe: exact
    # optimizer updates, and CPUs without AVX512-BF16 run bf16 slowly; on an H200 bf16 adapters ended an
    # epoch at 0.9885 log-loss, float32 ones at 0.9754: BENCHMARKS.md). The optimizer is created in train().
    dtype = _dtype(adapter_dtype(train_cfg))
    for param in trainer.model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return trainer, callback, timing, history, valid_figures


def finetune(base_checkpoint: Path, train_rows: pd.DataFrame, valid_rows: pd.DataFrame, prompt_cfg: PromptConfig,
             train_cfg: TrainConfig, out_dir: Path, valid_log_loss_fn: Callable | None = None, *,
             trust_remote_code: bool = False, log_metrics: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on the answer token; save adapter + tokenizer to `out_dir/adapter`.

    `valid_log_loss_fn(model) -> dict` (e.g. {"log_loss": ...}) is called at the end of every epoch
    with the training model (never before the first step); without it the validation figures are
    computed here from the renormalised three label-token probabilities of `valid_rows`. Train loss,
    learning rate and validation figures go to `log_metrics(metrics, step)` when given (the stage's run).
    With `train_cfg.keep_best_epoch` the saved adapter is the one of the lowest validation log_loss
    (`TrainResult.kept`), not the last one.
    """
    run = prepare_training(base_checkpoint, train_rows, valid_rows, prompt_cfg, train_cfg, out_dir,
                           valid_log_loss_fn, trust_remote_code=trust_remote_code, log_metrics=log_metrics)
    from .hardware import GpuMemoryPeak

    from .train_fit import planned_training

    trainer = run.trainer
    planned = planned_training(base_checkpoint, trainer, train_cfg)
    start = time.perf_counter()
    with GpuMemoryPeak() as memory:
        output = trainer.train()
    run.callback.run(trainer.state, trainer.model)  # a fractional last epoch may end between epoch ends
    seconds = time.perf_counter() - start - run.timing["valid_seconds"]
    kept = run.callback.restore_best(trainer.model)
    if kept:
        logger.info("saving the adapter validated at epoch %.2f: %s", kept["epoch"] or 0, kept)

    adapter_dir = Path(out_dir) / "adapter"
    if trainer.is_world_process_zero():  # under accelerate launch (stages/train_launch.py), rank 0 alone writes
        trainer.model.save_pretrained(adapter_dir)
        run.tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "arenaflow_train.json").write_text(json.dumps({
            "base_checkpoint": str(base_checkpoint), "head": train_cfg.head, "label_ids": list(run.builder.label_ids),
            "loss": "3-way cross-entropy over the label-token logits at the answer position",
            "train": asdict(train_cfg), "prompt": asdict(prompt_cfg),
        }, indent=2))

    return TrainResult(
        adapter_dir=adapter_dir, train_loss=float(output.training_loss), loss_history=run.history, valid=run.valid,
        kept=kept, seconds=seconds, valid_seconds=run.timing["valid_seconds"], rows_trained=len(run.train_rows),
        examples_seen=trainer.rows_seen, seconds_per_row=seconds / max(trainer.rows_seen, 1),
        steps=int(trainer.state.global_step), rows_unlabelled=run.rows_unlabelled,
        valid_rows=0 if run.valid_rows is None else len(run.valid_rows), head=train_cfg.head,
        peak_gpu_memory_gib=memory.peak_gib, planned=planned,
    )

