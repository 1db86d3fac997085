"""Decoder dimensions: of a checkpoint's config.json, or of known architectures by name (the published
configs), for `plan`'s roofline and for `random:<arch>` models built without a hub."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """What the plan needs of a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @property
    def layer_params(self) -> int:
        """Matmul weights run by every token: attention q,k,v,o + gated MLP (gate, up, down), all layers."""
        attn = self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads) + self.heads * self.head_dim * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layer_params + self.embedding_params + self.layers * 2 * self.hidden + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: float = 2.0) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def flops_per_prompt(self, length: int) -> float:
        """Forward FLOPs of a prompt: 2 x matmul weights per token, causal attention (QK^T and AV), and
        the LM head at the last position only (what vLLM and the sorted transformers scorer do)."""
        attention = 2 * 2 * self.layers * self.heads * self.head_dim * length * (length + 1) / 2
        return 2.0 * self.layer_params * length + attention + 2.0 * self.vocab * self.hidden

    def to_config(self) -> dict:
        """A LlamaConfig-style dict (for building a random model with these dims)."""
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, vocab_size=self.vocab,
                    tie_word_embeddings=self.tied)


# Published configs (config.json of each model on the hub).
ARCHITECTURES: dict[str, Dims] = {
    "yi-1.5-34b": Dims(7168, 20480, 60, 56, 8, 128, 64000),
    "llama-3-8b": Dims(4096, 14336, 32, 32, 8, 128, 128256),
    "llama-3-70b": Dims(8192, 28672, 80, 64, 8, 128, 128256),
    "qwen2.5-7b": Dims(3584, 18944, 28, 28, 4, 128, 152064),
    "gemma-2-9b": Dims(3584, 14336, 42, 16, 8, 256, 256000, tied=True),
    "smollm2-135m": Dims(576, 1536, 30, 9, 3, 64, 49152, tied=True),
}
_ALIASES = {"yi-1.5-34b": "yi-1.5-34b", "yi-34b": "yi-1.5-34b", "llama-3-8b": "llama-3-8b",
            "llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "llama-3-70b": "llama-3-70b",
            "llama3-70b": "llama-3-70b", "llama-3.1-70b": "llama-3-70b", "qwen2.5-7b": "qwen2.5-7b",
            "gemma-2-9b": "gemma-2-9b", "smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m"}


def dims_from_config(config: dict) -> Dims:
    cfg = config.get("text_config", config)
    heads = cfg["num_attention_heads"]
    return Dims(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)))


def architecture(name: str) -> tuple[str, Dims] | None:
    """(table key, dims) of a model name that names a known architecture (`llama-3.1-8b-instruct`,
    `random:llama-3-8b`, `gguf:smollm2-135m-instruct`), or None."""
    name = name.lower().removeprefix("gguf:").removeprefix("random:").split("/")[-1]
    for alias in sorted(_ALIASES, key=len, reverse=True):
        if name.startswith(alias) or alias in name:
            return _ALIASES[alias], ARCHITECTURES[_ALIASES[alias]]
    return None
