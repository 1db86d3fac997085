"""Merge a LoRA adapter into its base, then quantize the merged checkpoint for vLLM.

* `merge_adapter` reloads the base in float32/bfloat16/float16 (never 4-bit: merging into NF4 weights
  would round the LoRA delta away), applies the peft adapter and saves a plain safetensors checkpoint.
* `quantize_checkpoint` writes a compressed-tensors checkpoint (what vLLM loads) with llm-compressor:
  method "awq" = `AWQModifier` (activation-aware scales from the task's own calibration prompts)
  followed by `QuantizationModifier`; method "rtn" = `QuantizationModifier` alone (round-to-nearest,
  no calibration, fast). Weights are int4 (W4A16) or int8 (W8A16), symmetric, one scale per
  `group_size` input features; the output head (`lm_head` / `score`) stays in full precision.
* method "autoawq" is refused when the recipe loads: see `recipe.AUTOAWQ_REFUSAL`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arenaflow.errors import ArenaflowError
from arenaflow.hardware import free_gpu_memory
from arenaflow.models import publish_dir, save_checkpoint, temp_dir_beside
from arenaflow.recipe import MERGE_BASES, MERGE_DTYPES, QUANT_SCHEMES, QuantConfig, check_section

HEAD_NAMES = ("lm_head", "score", "classifier")  # output heads: never quantized
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class QuantizeError(ArenaflowError, ValueError):
    """A merge/quantization request that cannot be carried out (bad scheme, group size, inputs)."""


def _torch_dtype(name: str):
    import torch

    key = MERGE_DTYPES.get(str(name).lower())
    if key is None:
        raise QuantizeError(
            f"merge dtype {name!r} is not supported; use one of {', '.join(MERGE_DTYPES)} "
            "(an adapter is never merged into 4-bit weights)"
        )
    return getattr(torch, key)


def _is_seq_cls(architectures) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in architectures or [])


def merge_adapter(base: Path, adapter: Path, out: Path, dtype: str = "float32", base_weights: str = "original") -> Path:
    """Merge the peft adapter at `adapter` into the base checkpoint `base`; save it to `out`.

    `base_weights="nf4"` merges into the NF4-rounded weights a QLoRA adapter was trained against
    (the base loaded in 4-bit, then dequantized to `dtype`: the merge itself is in `dtype`), so the
    merged model is the model that was trained; "original" merges into the checkpoint's own weights.

    The base is reloaded in `dtype` (float32, bfloat16 or float16). A causal-LM adapter gives a
    `*ForCausalLM` checkpoint; an adapter whose peft task_type is SEQ_CLS (3-way classifier head
    trained as a `modules_to_save` layer) gives a `*ForSequenceClassification` one with 3 labels.
    The tokenizer is taken from the adapter directory when it has one, else from the base.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise QuantizeError(f"{adapter} has no adapter_config.json: not a peft adapter directory")
    if not (base / "config.json").exists():
        raise QuantizeError(f"{base} has no config.json: not a base checkpoint directory")
    torch_dtype = _torch_dtype(dtype)
    if base_weights not in MERGE_BASES:
        raise QuantizeError(f"merge base weights {base_weights!r}: use one of {', '.join(MERGE_BASES)}")
    peft_config = PeftConfig.from_pretrained(str(adapter))
    task = str(getattr(peft_config, "task_type", "") or "").upper().removeprefix("TASKTYPE.")
    has_tokenizer = any((adapter / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
    if task == "SEQ_CLS":
        from arenaflow.models import LABEL_WORDS

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            base, dtype=torch_dtype, num_labels=len(LABEL_WORDS), pad_token_id=tokenizer.pad_token_id
        )
    elif task in ("", "CAUSAL_LM", "NONE"):
        if base_weights == "nf4":
            from transformers import BitsAndBytesConfig

            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, quantization_config=nf4)
            model = model.dequantize(dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    else:
        raise QuantizeError(f"adapter task_type {task!r} is not supported (CAUSAL_LM or SEQ_CLS)")
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    try:
        return save_checkpoint(model, tokenizer, out, replace=True)
    finally:
        del model
        free_gpu_memory()  # the NF4 round trip ran on the GPU: free it before an engine starts


@contextlib.contextmanager
def cpu_pin_memory_patch():
    """On a machine with no accelerator, make llm-compressor's `IntermediatesCache.pin_memory` a no-op.

    AWQ pins its cached activations for faster host->device copies; `Tensor.pin_memory()` raises
    "Cannot access accelerator device when none is available" without one. Pinning only speeds up
    transfers, so skipping it on CPU changes no result. With an accelerator this does nothing.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _one_process_is_not_distributed():
    """An in-process vLLM engine leaves a 1-rank torch.distributed group behind; llm-compressor then
    takes its all-reduce path, which asks for an accelerator. One rank is no distribution."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        from compressed_tensors.offload.utils import as_single_threaded

        return as_single_threaded()
    return contextlib.nullcontext()


def _head_names(model) -> list[str]:
    """Module names of the output head(s): left unquantized."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in HEAD_NAMES}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads.update(name for name, module in model.named_modules() if output is not None and module is output)
    return sorted(heads)


def quantized_linear_layers(model) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of the Linear layers a quantization recipe will touch."""
    import torch

    heads = set(_head_names(model))
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in heads
    }


def check_group_size(model, group_size: int) -> None:
    """Raise QuantizeError unless `group_size` divides the in-features of every quantized layer.

    `group_size` -1 means one scale per output channel (no grouping) and always fits.
    """
    if group_size == -1:
        return
    if group_size <= 0:
        raise QuantizeError(f"quant.group_size must be a positive integer or -1 (per channel), got {group_size}")
    layers = quantized_linear_layers(model)
    bad = {name: dims[0] for name, dims in layers.items() if dims[0] % group_size}
    if bad:
        widths = sorted({dims[0] for dims in layers.values()})
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        example = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:3])
        raise QuantizeError(
            f"quant.group_size={group_size} does not divide the input width of {len(bad)} of "
            f"{len(layers)} quantized layers, e.g. {example}. Layer input widths: {widths}; group sizes "
            f"that fit: {fits or 'none of 32/64/128/256'} (or -1 for per-channel scales)."
        )


def _copy_checkpoint(src: Path, out: Path) -> Path:
    tmp = temp_dir_beside(out)
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    return publish_dir(tmp, out, replace=True)


def _quant_modifier(bits: int, group_size: int, ignore: list[str]):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False}
    if group_size == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=group_size)
    return QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=ignore
    )


def _calibration_dataset(calibration: list[list[int]], rows: int | None, max_length: int | None):
    from datasets import Dataset

    kept = [list(map(int, ids[:max_length] if max_length else ids)) for ids in calibration[:rows] if len(ids)]
    if not kept:
        raise QuantizeError("quant.method=awq needs calibration token ids (got no non-empty rows)")
    return Dataset.from_dict({"input_ids": kept, "attention_mask": [[1] * len(ids) for ids in kept]})


def quantize_checkpoint(src: Path, out: Path, config: QuantConfig, calibration: list[list[int]] | None = None) -> Path:
    """Quantize the checkpoint at `src` per `config` (scheme, method, group_size); save it to `out`.

    `calibration` is a list of prompt token-id lists (the task's own training prompts); AWQ uses the
    first `config.calibration_rows`, each cut to `config.calibration_max_length` tokens. "rtn" and
    scheme "none" ignore it. Scheme "none" copies `src` unchanged. The result is a compressed-tensors
    checkpoint (`save_compressed=True`, pack-quantized int weights) with the tokenizer beside it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    src, out = Path(src), Path(out)
    check_section(config)  # a config built in code; load_recipe checked the recipe's
    if not (src / "config.json").exists():
        raise QuantizeError(f"{src} has no config.json: not a checkpoint directory")
    if config.scheme == "none":
        return _copy_checkpoint(src, out)
    hf_config = AutoConfig.from_pretrained(src)
    if getattr(hf_config, "quantization_config", None):
        raise QuantizeError(f"{src} is already quantized; quantize the merged full-precision checkpoint")
    dataset = None
    if config.method.lower() == "awq":
        dataset = _calibration_dataset(calibration or [], config.calibration_rows, config.calibration_max_length)

    model_cls = AutoModelForSequenceClassification if _is_seq_cls(hf_config.architectures) else AutoModelForCausalLM
    model = model_cls.from_pretrained(src, dtype="auto")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    check_group_size(model, config.group_size)

    from llmcompressor import oneshot

    ignore = _head_names(model)
    recipe = [_quant_modifier(QUANT_SCHEMES[config.scheme], config.group_size, ignore)]
    kwargs = {}
    if dataset is not None:
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe.insert(0, AWQModifier(n_grid=config.awq_n_grid))
        kwargs = dict(
            dataset=dataset, num_calibration_samples=len(dataset), shuffle_calibration_samples=False,
            max_seq_length=max(len(ids) for ids in dataset["input_ids"]), batch_size=1,
        )
    from llmcompressor.core import active_session

    try:
        with cpu_pin_memory_patch(), _one_process_is_not_distributed():
            oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
        return save_checkpoint(model, tokenizer, out, replace=True, save_compressed=True)
    finally:
        active_session().reset()  # the session holds the model and its modifiers' state
        del model
        free_gpu_memory()  # AWQ's onloaded layers and cached activations, before an engine starts


def checkpoint_size_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors/bin/pt/gguf) under a checkpoint directory (or one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


@dataclass
class Chosen:
    checkpoint: Path  # the checkpoint to register
    scheme: str  # its scheme ("none": the merged checkpoint itself)
    result: object  # what `score` returned for it
    merged_result: object  # what `score` returned for the merged checkpoint
    note: str  # why this one: every scheme tried, with its log-loss change
    seconds: dict = dataclasses.field(default_factory=dict)  # quantize_seconds.<scheme>: wall time of each quantization


def quantize_within_bound(merged: Path, out_dir: Path, config: QuantConfig, calibration: list[list[int]],
                          score: Callable[[Path], object], log_loss_of: Callable[[object], float]) -> Chosen:
    """`config.scheme`, then each of `config.fallback_schemes`, until one's log-loss change against the
    merged checkpoint (on the validation rows `score` scores: never the AWQ calibration rows, which come
    from train) is within `config.max_log_loss_delta`; past the last, the merged checkpoint (scheme none).
    Each scheme is quantized before any scoring engine runs in this process (AWQ first, as before)."""
    tried, merged_result, seconds = [], None, {}
    bound = config.max_log_loss_delta
    for scheme in dict.fromkeys((config.scheme, *config.fallback_schemes)):
        if scheme == "none":
            break
        start = time.perf_counter()
        checkpoint = quantize_checkpoint(merged, out_dir / scheme, dataclasses.replace(config, scheme=scheme), calibration)
        seconds[f"quantize_seconds.{scheme}"] = time.perf_counter() - start
        merged_result = merged_result or score(merged)
        result = score(checkpoint)
        delta = log_loss_of(result) - log_loss_of(merged_result)
        if bound is None or delta <= bound:
            within = f", within {bound:g}" if bound is not None else ""
            return Chosen(checkpoint, scheme, result, merged_result,
                          "; ".join([*tried, f"{scheme}: log_loss {delta:+.4f} vs merged{within}"]), seconds)
        tried.append(f"{scheme}: log_loss {delta:+.4f} vs merged, over quant.max_log_loss_delta={bound:g}")
    merged_result = merged_result or score(merged)
    return Chosen(merged, "none", merged_result, merged_result,
                  "; ".join([*tried, "the merged checkpoint, unquantized"]), seconds)
