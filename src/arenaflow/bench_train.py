"""`arenaflow bench --train`: the project's finetune step against plain peft, timed on one card and the
same rows (stages/bench.py opens the MLflow run and logs what `run_train_bench` returns).

Variants (comma-separated, `parse_variant`): `peft-baseline` is transformers + peft QLoRA as documented:
NF4 via BitsAndBytesConfig with bf16 compute, prepare_model_for_kbit_training (its float32 upcast), LoRA
(the recipe's r/alpha/dropout/targets), torch AdamW with the Trainer's linear schedule and clipping, a
hand-written loop over right-padded batches, the 3-way answer loss read from the full logits. `project`
is `finetune`'s trainer, collator and loss (`train.build_trainer`) with the recipe's train settings;
`label=key=value[:key=value...]` is the project with TrainConfig overrides (a lever), and
`label=peft-baseline:key=value` the baseline with some of BASELINE_KEYS changed.

Each variant runs warm-up then timed optimizer steps, one epoch over the first (warm-up + steps) x
batch x accumulation rows of one pool (the same rows for the same batch), then scores the same held-out
rows. Per variant: rows/s and tokens/s of the timed steps (real tokens, padding apart), peak memory
(torch.cuda.max_memory_allocated from load to last step; NaN on CPU), MFU = 4 x matmul params x tokens/s
(forward 2 + input gradient 2: frozen weights need no weight gradient; attention, LoRA, LM head not
counted) over the card's bf16 datasheet rate and over the matmul measured now, the timed steps' training
loss, the validation log-loss after the steps, whether gradient checkpointing was really active.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
import sys
import tempfile
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import dims_from_config
from .bench import metric_prefix
from .hardware import card_name, measured_matmul_tflops
from .models import load_tokenizer, read_config, resolve_model
from .recipe import Recipe, TrainConfig, _coerce
from .train import TrainError, answer_examples, build_trainer, check_config, row_targets
from .train_log import make_validator

BASELINE, PROJECT = "peft-baseline", "project"
DEFAULT_VARIANTS = f"{BASELINE},{PROJECT}"
BASELINE_KEYS = ("load_in_4bit", "bnb_4bit_compute_dtype", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "learning_rate", "batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                 "warmup_ratio", "seed", "attn_implementation")


class TrainBenchError(TrainError):
    """A training-bench request that cannot run (bad variant spec, too few rows)."""


@dataclass
class TrainVariant:
    label: str
    kind: str  # BASELINE or PROJECT
    overrides: dict = field(default_factory=dict)  # TrainConfig field -> raw value text

    @property
    def settings(self) -> str:
        return ":".join(f"{k}={v}" for k, v in self.overrides.items()) or "-"


def parse_variant(text: str) -> TrainVariant:
    """`peft-baseline`, `project`, `label=key=value[:key=value...]` (the project with overrides),
    `label=peft-baseline[:key=value...]` / `label=project[:...]`; values are typed by `variant_config`."""
    head, *pairs = text.strip().split(":")
    label, sep, rest = head.partition("=")
    if not sep:
        kind = label = head.strip()
    elif rest.strip() in (BASELINE, PROJECT):
        kind = rest.strip()
    else:
        kind, pairs = PROJECT, [rest, *pairs]
    label = label.strip()
    if kind not in (BASELINE, PROJECT) or not label or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
        raise TrainBenchError(f"variant {text!r}: expected {BASELINE}, {PROJECT}, label=key=value[:key=value...] "
                              f"or label={BASELINE}[:key=value...] (labels: letters, digits, _ . + -)")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TrainBenchError(f"variant {text!r}: expected key=value, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return TrainVariant(label, kind, overrides)


def parse_variants(text: str) -> list[TrainVariant]:
    variants = [parse_variant(s) for s in (text or DEFAULT_VARIANTS).split(",") if s.strip()]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise TrainBenchError(f"variant labels must be distinct, got {labels}")
    return variants


def variant_config(base: TrainConfig, variant: TrainVariant) -> TrainConfig:
    """The TrainConfig a variant trains with: the recipe's, one epoch, the overrides typed like recipe
    overrides; the baseline computes in bfloat16 unless told otherwise and takes only BASELINE_KEYS."""
    hints = typing.get_type_hints(TrainConfig)
    values: dict = {"bnb_4bit_compute_dtype": "bfloat16"} if variant.kind == BASELINE else {}
    for key, raw in variant.overrides.items():
        if key not in hints:
            raise TrainBenchError(f"variant {variant.label!r}: TrainConfig has no key {key!r} (known: {sorted(hints)})")
        if variant.kind == BASELINE and key not in BASELINE_KEYS:
            raise TrainBenchError(f"variant {variant.label!r}: {key} is a lever of the project's trainer; the plain "
                                  f"peft baseline takes only {list(BASELINE_KEYS)}")
        values[key] = _coerce(raw, hints[key], f"variant {variant.label}.{key}")
    cfg = dataclasses.replace(base, epochs=1.0, max_train_rows=None, max_valid_rows=None, keep_best_epoch=False,
                              **values)
    check_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- rows

@dataclass
class BenchRows:
    train: dict  # answer_examples columns (input_ids, labels, targets) of the row pool, in order
    valid_ids: list  # held-out prompts (no answer token), scored after training
    valid_targets: np.ndarray
    valid_labels: np.ndarray
    label_ids: list
    note: str

    def head(self, n: int) -> dict:
        return {k: v[:n] for k, v in self.train.items()}


def real_rows(recipe: Recipe, builder, n_train: int, n_valid: int) -> BenchRows:
    """The recipe's split through the prompt builder: n_train labelled training rows, n_valid valid rows."""
    from .data import recipe_split, subsample

    split = recipe_split(recipe)
    train = split.train[np.isfinite(row_targets(split.train)).all(axis=1)]
    if len(train) < n_train:
        raise TrainBenchError(f"the recipe's training split has {len(train)} labelled rows, the variants need "
                              f"{n_train} (steps x batch x accumulation): fewer steps or a smaller batch")
    train = subsample(train, n_train, recipe.data.seed)
    valid = subsample(split.valid[split.valid["label"] >= 0], n_valid, recipe.data.seed)
    examples = answer_examples(builder.build_rows(train), builder.label_ids, row_targets(train))
    return BenchRows(examples, builder.build_rows(valid), row_targets(valid), valid["label"].to_numpy(),
                     list(builder.label_ids), f"real rows (prompt builder, max_length {recipe.prompt.max_length}): "
                     f"{n_train} training, {len(valid)} validation")


def synthetic_rows(n: int, lo: int, hi: int, n_train: int, n_valid: int, builder, vocab: int, seed: int = 1) -> BenchRows:
    """N training rows of LO-HI tokens (answer included): random ordinary tokens (ids 100..vocab-1), the
    chat suffix, the answer token of a random label; n_valid more rows like them for validation."""
    if n < n_train:
        raise TrainBenchError(f"--synthetic {n}:{lo}-{hi}: the variants need {n_train} training rows "
                              "(steps x batch x accumulation); ask for at least that many")
    rng = np.random.default_rng(seed)

    def make(count: int):
        lengths = rng.integers(lo, hi + 1, size=count)
        prompts = [rng.integers(100, vocab, size=max(int(k) - 1 - len(builder.suffix), 1)).tolist() + list(builder.suffix)
                   for k in lengths]
        return prompts, np.eye(3)[rng.integers(0, 3, size=count)]

    prompts, targets = make(n)
    valid_ids, valid_targets = make(n_valid)
    return BenchRows(answer_examples(prompts, builder.label_ids, targets), valid_ids, valid_targets,
                     valid_targets.argmax(axis=1), list(builder.label_ids),
                     f"synthetic rows of {lo}-{hi} tokens, random labels: {n} training, {n_valid} validation")


# ---------------------------------------------------------------------------------------------- figures

@dataclass
class VariantFigures:
    label: str
    kind: str
    settings: str = "-"
    steps: int = 0  # timed optimizer steps
    rows: int = 0  # rows in the timed steps
    tokens: int = 0  # real (non-pad) tokens in the timed steps
    padded_tokens: int = 0  # tokens the model ran, padding included
    seconds: float = math.nan
    rows_per_s: float = math.nan
    tokens_per_s: float = math.nan
    peak_gib: float = math.nan
    mfu_peak: float = math.nan  # 4 x params x tokens/s over the card's bf16 datasheet rate
    mfu_matmul: float = math.nan  # ... over the sustained matmul measured in this run
    train_loss: float = math.nan  # mean over the timed steps
    valid_log_loss: float = math.nan
    valid_accuracy: float = math.nan
    load_seconds: float = math.nan  # model load and trainer set-up, untimed
    checkpointing: bool | None = None
    error: str = ""

    def metrics(self) -> dict[str, float]:
        names = ("rows_per_s", "tokens_per_s", "seconds", "peak_gib", "mfu_peak", "mfu_matmul", "train_loss",
                 "valid_log_loss", "valid_accuracy", "load_seconds", "rows", "tokens", "padded_tokens")
        p = metric_prefix(self.label)
        return {f"{p}_{n}": float(getattr(self, n)) for n in names if not math.isnan(float(getattr(self, n)))}


@dataclass
class TrainBenchReport:
    card: str
    model_note: str
    rows_note: str
    params: int
    steps: int
    warmup_steps: int
    peak_tflops: float | None
    matmul_tflops: float
    matmul_what: str
    variants: list[VariantFigures]

    def metrics(self) -> dict[str, float]:
        out = {"params": float(self.params), "matmul_tflops": self.matmul_tflops, "steps": float(self.steps)}
        if self.peak_tflops:
            out["peak_tflops"] = self.peak_tflops
        for v in self.variants:
            out.update(v.metrics())
        return out

    def table(self) -> str:
        peak = f"{self.peak_tflops:.0f} TFLOP/s bf16 datasheet" if self.peak_tflops else "no datasheet rate (CPU)"
        base = next((v for v in self.variants if v.kind == BASELINE and not v.error), None)  # the first one
        head = [f"training bench on {self.card}: {self.model_note}; {self.rows_note}",
                f"  {self.warmup_steps} warm-up + {self.steps} timed optimizer steps per variant; tokens are real (no "
                f"padding); MFU = 4 x {self.params / 1e6:,.1f}M matmul params x tokens/s over {peak} and over the "
                f"{self.matmul_what} matmul measured now ({self.matmul_tflops:.3g} TFLOP/s); x base: tokens/s over "
                f"{base.label if base else 'no baseline'}; ckpt: gradient checkpointing active"]
        cols = ("variant", "settings", "ckpt", "rows/s", "tokens/s", "x base", "pad", "peak GiB", "MFU peak",
                "MFU matmul", "train loss", "valid log_loss", "load s")
        pct = lambda x: "-" if math.isnan(x) else f"{100 * x:.1f}%"  # noqa: E731
        num = lambda x, f: "-" if math.isnan(x) else format(x, f)  # noqa: E731
        rows, failed = [], []
        for v in self.variants:
            if v.error:
                rows.append((v.label, v.settings, "FAILED", *["-"] * (len(cols) - 3)))
                failed.append(f"  {v.label} FAILED: {v.error.splitlines()[0][:300]}")
                continue
            pad = 1 - v.tokens / v.padded_tokens if v.padded_tokens else math.nan
            ratio = v.tokens_per_s / base.tokens_per_s if base else math.nan
            rows.append((v.label, v.settings, {True: "on", False: "off", None: "?"}[v.checkpointing],
                         num(v.rows_per_s, ".2f"), num(v.tokens_per_s, ".0f"), num(ratio, ".2f"), pct(pad),
                         num(v.peak_gib, ".1f"), pct(v.mfu_peak), pct(v.mfu_matmul), num(v.train_loss, ".4f"),
                         num(v.valid_log_loss, ".4f"), num(v.load_seconds, ".1f")))
        widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
        fmt = lambda r: "  " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
        return "\n".join(head + [fmt(cols), "  " + "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
                         + failed)


# ---------------------------------------------------------------------------------------------- running

def _sync() -> float:
    """Wait for the GPU's queued work; return the peak allocated memory so far, GiB (NaN on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return math.nan
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _checkpointing_active(model) -> bool:
    """True when some layer will recompute its activations: checkpointing on and the layer in train mode."""
    return any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules())


def _pad(examples: list[dict], pad_id: int, device):
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):  # right padding, like TRL's collator
        ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, :len(e["input_ids"])] = 1
    return ids.to(device), mask.to(device)


def _run_baseline(checkpoint: Path, cfg: TrainConfig, columns: dict, label_ids: list, pad_id: int, steps: int,
                  warmup: int, fig: VariantFigures, trust_remote_code: bool):
    """Plain transformers + peft QLoRA, a hand-written loop (see module doc). Returns the trained model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_linear_schedule_with_warmup, set_seed

    set_seed(cfg.seed)  # as train.build_trainer does: the same LoRA init
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, cfg.bnb_4bit_compute_dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if not cfg.load_in_4bit:
        model.to(device)
    gc_kwargs = {"use_reentrant": False}
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    targets = cfg.target_modules if cfg.target_modules.strip() == "all-linear" else \
        [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    model.train()  # dropout on, and gradient checkpointing really active when asked for
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    total, micro, accum = warmup + steps, cfg.batch_size, cfg.gradient_accumulation_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
    label_index = torch.tensor(label_ids, device=device)
    fig.load_seconds = time.perf_counter() - fig.load_seconds
    losses, start = [], time.perf_counter()
    for step in range(total):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for k in range(accum):
            batch = examples[(step * accum + k) * micro:(step * accum + k + 1) * micro]
            ids, mask = _pad(batch, pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # the full B x T x vocab logits
            ends = mask.sum(dim=1) - 2  # the position that predicts the answer token (the last one)
            answer = logits[torch.arange(len(batch), device=device), ends].index_select(-1, label_index).float()
            target = torch.tensor([e["targets"] for e in batch], device=device)
            loss = -(target * torch.log_softmax(answer, dim=-1)).sum(dim=-1).mean() / accum
            loss.backward()
            step_loss += loss.detach()
            if step >= warmup:
                fig.rows += len(batch)
                fig.tokens += sum(len(e["input_ids"]) for e in batch)
                fig.padded_tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step_loss))  # a host sync per step, as the Trainer's per-step logging
        if step == total - 1:
            fig.peak_gib = _sync()
            fig.seconds = time.perf_counter() - start
            fig.checkpointing = _checkpointing_active(model)
    fig.steps, fig.train_loss = steps, float(np.mean(losses[warmup:]))
    return model


def _run_project(checkpoint: Path, cfg: TrainConfig, columns: dict, tokenizer, label_ids: list, steps: int,
                 warmup: int, fig: VariantFigures, out_dir: Path, trust_remote_code: bool):
    """The trainer `finetune` uses, for exactly warmup + steps optimizer steps. Returns the trained model."""
    from datasets import Dataset
    from transformers import TrainerCallback

    trainer = build_trainer(checkpoint, Dataset.from_dict(columns), tokenizer, label_ids, cfg, out_dir,
                            trust_remote_code=trust_remote_code)[0]
    collate, batches = trainer.data_collator, []

    def counting(examples):  # what each micro-batch holds, in the order the Trainer consumes them
        batch = collate(examples)
        batches.append((len(examples), sum(len(e["input_ids"]) for e in examples), batch["input_ids"].numel()))
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if warmup == 0:
                _sync()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == warmup:
                _sync()
                self.start = time.perf_counter()
            if state.global_step == warmup + steps:
                fig.peak_gib = _sync()
                fig.seconds = time.perf_counter() - self.start
                fig.checkpointing = _checkpointing_active(model)

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    fig.load_seconds = time.perf_counter() - fig.load_seconds
    trainer.train()
    if trainer.state.global_step != warmup + steps or math.isnan(fig.seconds):
        raise TrainBenchError(f"the trainer ran {trainer.state.global_step} steps, expected {warmup + steps}")
    accum = cfg.gradient_accumulation_steps
    timed = batches[warmup * accum:(warmup + steps) * accum]
    fig.steps = steps
    fig.rows, fig.tokens, fig.padded_tokens = (int(sum(b[i] for b in timed)) for i in range(3))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and warmup < e.get("step", 0) <= warmup + steps]
    fig.train_loss = float(np.mean(losses)) if losses else math.nan
    return trainer.model


def _free() -> None:
    """Memory of the variant before gone, the peak counter reset for the next one."""
    import torch

    gc.collect()
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()  # compiled graphs of a torch_compile variant
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@dataclass
class TrainBench:
    """What a training bench runs, built before the MLflow run opens (a bad spec fails first)."""

    reference: str
    checkpoint: Path
    tokenizer: object
    variants: list[TrainVariant]
    configs: list[TrainConfig]
    rows: BenchRows
    steps: int
    warmup_steps: int
    trust_remote_code: bool = False


def prepare_train_bench(recipe: Recipe, model: str = "", variants: str = "", *, rows: int = 64,
                        synthetic: tuple[int, int, int] | None = None, steps: int = 10,
                        warmup_steps: int = 2) -> TrainBench:
    """Variants parsed and typed, the model resolved, the row pool built: `rows` validation rows, and as
    many training rows as the most demanding variant needs (real rows, or `synthetic` = (N, LO, HI))."""
    from .prompts import PromptBuilder

    if steps < 1 or warmup_steps < 0 or rows < 1:
        raise TrainBenchError(f"need steps >= 1, warm-up steps >= 0 and validation rows >= 1 (got {steps}, "
                              f"{warmup_steps}, {rows})")
    from .train_fit import settle_memory

    specs = parse_variants(variants)
    configs = [variant_config(recipe.train, v) for v in specs]  # a bad variant stops before any model loads
    reference = model or recipe.model.base
    checkpoint = resolve_model(reference)
    configs = [settle_memory(c, checkpoint, recipe.prompt.max_length)[0] for c in configs]
    tokenizer = load_tokenizer(checkpoint, recipe.model.trust_remote_code)
    builder = PromptBuilder(tokenizer, recipe.prompt)
    needed = max((warmup_steps + steps) * c.batch_size * c.gradient_accumulation_steps for c in configs)
    pool = synthetic_rows(*synthetic, needed, rows, builder, len(tokenizer)) if synthetic else \
        real_rows(recipe, builder, needed, rows)
    return TrainBench(reference, checkpoint, tokenizer, specs, configs, pool, steps, warmup_steps,
                      recipe.model.trust_remote_code)


def run_train_bench(bench: TrainBench, *, peak_tflops: float | None = None, on_variant=None) -> TrainBenchReport:
    """Train and time every variant in turn (module doc). A variant that fails is reported, not fatal;
    `on_variant(figures)` is called as each one ends (a bench killed at a time limit keeps those)."""
    card = card_name()
    _, matmul, matmul_what = measured_matmul_tflops()
    params = dims_from_config(read_config(bench.checkpoint)).layer_params
    pad_id, rows = bench.tokenizer.pad_token_id, bench.rows
    figures = []
    for variant, cfg in zip(bench.variants, bench.configs):
        fig = VariantFigures(variant.label, variant.kind, variant.settings)
        figures.append(fig)
        model = None
        try:
            _free()
            columns = rows.head((bench.warmup_steps + bench.steps) * cfg.batch_size * cfg.gradient_accumulation_steps)
            fig.load_seconds = time.perf_counter()  # the runners turn it into seconds before their first step
            with tempfile.TemporaryDirectory() as tmp:
                if variant.kind == BASELINE:
                    model = _run_baseline(bench.checkpoint, cfg, columns, rows.label_ids, pad_id, bench.steps,
                                          bench.warmup_steps, fig, bench.trust_remote_code)
                else:
                    model = _run_project(bench.checkpoint, cfg, columns, bench.tokenizer, rows.label_ids, bench.steps,
                                         bench.warmup_steps, fig, Path(tmp), bench.trust_remote_code)
            fig.rows_per_s, fig.tokens_per_s = fig.rows / fig.seconds, fig.tokens / fig.seconds
            achieved = 4.0 * params * fig.tokens_per_s / 1e12
            fig.mfu_matmul = achieved / matmul
            if peak_tflops:
                fig.mfu_peak = achieved / peak_tflops
            model.eval()
            validate = make_validator(rows.valid_ids, rows.valid_targets, rows.valid_labels, rows.label_ids, pad_id,
                                      batch_tokens=max(cfg.batch_size * max(map(len, rows.valid_ids)), 8192))
            valid = validate(model)
            fig.valid_log_loss, fig.valid_accuracy = valid.get("log_loss", math.nan), valid.get("accuracy", math.nan)
            print(f"bench --train: {fig.label}: {fig.rows_per_s:.2f} rows/s, {fig.tokens_per_s:.0f} tokens/s, peak "
                  f"{fig.peak_gib:.1f} GiB, MFU {100 * fig.mfu_matmul:.1f}% of the measured matmul, valid log_loss "
                  f"{fig.valid_log_loss:.4f}", flush=True)
        except Exception as err:  # noqa: BLE001 - one variant's failure is a figure of the bench
            fig.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
            print(f"bench --train: variant {fig.label} failed: {type(err).__name__}: {err}", flush=True)
        finally:
            del model
            _free()
        if on_variant is not None:
            on_variant(fig)
    return TrainBenchReport(card, bench.reference, rows.note, params, bench.steps, bench.warmup_steps, peak_tflops,
                            matmul, matmul_what, figures)
