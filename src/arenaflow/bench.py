"""`arenaflow bench`: time every scoring engine on one checkpoint and one set of prompts, in one run.

Each engine (spec, see `parse_engine_spec`) is started (start-up timed apart), warmed up on prompts
that are NOT in the timed set (so prefix caching cannot flatter the timed pass), then timed on the
same prompts as every other engine. Reported per engine: samples/s, prompt tokens/s, MFU =
2 x params x tokens / time per GPU over (a) the card's datasheet dense rate and (b) a bf16 (CPU:
float32) matmul measured in the same run (sustained for seconds like an engine's pass; the few-ms burst
rate is reported too), start-up seconds, the max |P - P_ref| against the first engine that
ran, and log_loss when the rows are labelled. One MLflow run per bench; metrics are
`<engine>_samples_per_s`, `<engine>_tokens_per_s`, ... .

Prompts: real rows through the prompt builder (the recipe's valid split), or `synthetic="N:LO-HI"`:
N random-token prompts with lengths uniform in [LO, HI] (ending with the real chat suffix).
Models: any reference `models.resolve_model` takes, `random:<arch>` (e.g. `random:llama-3-8b`) included.
The hardware probes (card, GPU count, measured matmul rate) are in hardware.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArenaflowError
from .hardware import card_name, free_gpu_memory, gpu_count, measured_matmul_tflops
from .plan import model_dims
from .recipe import ENGINE_BACKENDS, EngineConfig

DEFAULT_ENGINES = ("vllm", "vllm-classify", "transformers", "transformers-naive")


class BenchError(ArenaflowError, ValueError):
    """A bench request that cannot be run (bad engine spec, unknown random architecture)."""


@dataclass
class EngineSpec:
    label: str
    backend: str
    overrides: dict = field(default_factory=dict)  # EngineConfig fields
    model: str | None = None  # another checkpoint (e.g. a quantized one) for this engine


def parse_engine_spec(text: str) -> EngineSpec:
    """`[label=]backend[:key=value[:key=value...]]`, e.g. `vllm`, `fp8=vllm:quantization=fp8`,
    `tuned=vllm:max_num_batched_tokens=32768:enable_prefix_caching=false`, `w4=vllm:model=/ckpt`."""
    head, *pairs = text.strip().split(":")
    label, _, backend = head.rpartition("=")
    backend = backend.strip()
    if backend not in ENGINE_BACKENDS:
        raise BenchError(f"engine spec {text!r}: backend {backend!r} not in {list(ENGINE_BACKENDS)}")
    overrides, model = {}, None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BenchError(f"engine spec {text!r}: expected key=value, got {pair!r}")
        if key == "model":
            model = value
        else:
            overrides[key] = value
    return EngineSpec(label.strip() or backend, backend, overrides, model)


def engine_config(base: EngineConfig, spec: EngineSpec) -> EngineConfig:
    """The base engine with the spec's backend and overrides, typed like recipe overrides."""
    from .recipe import _coerce
    import typing

    hints = typing.get_type_hints(type(base))
    values = {"backend": spec.backend}
    for key, value in spec.overrides.items():
        if key not in hints:
            raise BenchError(f"engine {spec.label!r}: EngineConfig has no field {key!r} "
                             f"(known: {sorted(hints)})")
        values[key] = _coerce(value, hints[key], f"engine {spec.label}.{key}")
    return dataclasses.replace(base, **values)


def metric_prefix(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_")


# ---------------------------------------------------------------------------------------------
# Prompts

def synthetic_lengths(spec: str) -> tuple[int, int, int]:
    """'256:600-1400' -> (256, 600, 1400)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if not m:
        raise BenchError(f"synthetic={spec!r}: expected N:LO-HI, e.g. 256:600-1400")
    n, lo, hi = map(int, m.groups())
    if not 0 < lo <= hi:
        raise BenchError(f"synthetic={spec!r}: need 0 < LO <= HI")
    return n, lo, hi


def synthetic_prompts(n: int, lo: int, hi: int, vocab: int, suffix: list[int], seed: int = 0) -> list[list[int]]:
    """N prompts of random ordinary tokens (ids 100..vocab-1, unique prefixes) ending with `suffix`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(100, vocab, size=max(int(k) - len(suffix), 1)).tolist() + list(suffix) for k in lengths]


def card_peak_tflops(card: str, compute: str = "bf16") -> float | None:
    """Datasheet dense TFLOP/s of the card for `compute` (plan.GPUS), None for CPUs / unknown cards."""
    from .plan import PlanError, gpu_spec

    if card.startswith("CPU"):
        return None
    try:
        gpu = gpu_spec(card)
    except PlanError:
        return None
    return gpu.tflops.get(compute)


# ---------------------------------------------------------------------------------------------
# The bench

@dataclass
class EngineFigures:
    label: str
    backend: str
    samples_per_s: float = math.nan
    tokens_per_s: float = math.nan
    seconds: float = math.nan
    startup_seconds: float = math.nan
    mfu_peak: float = math.nan  # share of the card's datasheet rate
    mfu_matmul: float = math.nan  # share of the sustained matmul rate measured in this run, per GPU
    mfu_matmul_burst: float = math.nan  # the same over the burst (few-ms) matmul rate
    gpus: int = 1  # GPUs the engine spans (tensor x data parallel); MFU figures are per GPU
    plan_samples_per_s: float = math.nan  # what `arenaflow plan` predicts for this engine run (vLLM on GPUs)
    max_prob_diff: float = math.nan  # max |P - P_ref| over rows and classes
    log_loss: float = math.nan
    error: str = ""

    def metrics(self) -> dict[str, float]:
        p = metric_prefix(self.label)
        names = ("samples_per_s", "tokens_per_s", "seconds", "startup_seconds", "mfu_peak", "mfu_matmul",
                 "mfu_matmul_burst", "plan_samples_per_s",
                 "max_prob_diff", "log_loss")
        return {f"{p}_{n}": float(getattr(self, n)) for n in names if not math.isnan(getattr(self, n))}


@dataclass
class BenchReport:
    card: str
    model_note: str
    params: int
    rows: int
    prompt_tokens: int
    peak_tflops: float | None
    matmul_tflops: float  # sustained
    matmul_burst_tflops: float
    matmul_what: str
    reference: str
    engines: list[EngineFigures]
    probs: dict = field(default_factory=dict)  # label -> N x 3

    def table(self) -> str:
        peak = f"{self.peak_tflops:.0f} TFLOP/s datasheet" if self.peak_tflops else "no datasheet rate (CPU)"
        head = [f"bench on {self.card}: {self.model_note}",
                f"  {self.params / 1e9:.3f}B matmul params per token (embeddings excluded), {self.rows} prompts, {self.prompt_tokens} prompt tokens "
                f"(mean {self.prompt_tokens / max(self.rows, 1):.0f}); MFU = 2*params*tokens/s over {peak} and over "
                f"the {self.matmul_what} matmul measured now, sustained {self.matmul_tflops:.3g} TFLOP/s (burst "
                f"{self.matmul_burst_tflops:.3g}), per GPU; diff vs {self.reference}"]
        cols = ("engine", "GPUs", "samples/s", "plan", "tokens/s", "MFU peak", "MFU matmul", "MFU burst",
                "startup s", "max|dP|", "log_loss")
        rows = []
        for e in self.engines:
            if e.error:
                rows.append((e.label, "FAILED: " + e.error.splitlines()[0][:100], *[""] * (len(cols) - 2)))
                continue
            plan = "-" if math.isnan(e.plan_samples_per_s) else (
                f"{e.plan_samples_per_s:.2f} ({100 * (e.plan_samples_per_s / e.samples_per_s - 1):+.0f}%)")
            rows.append((e.label, str(e.gpus or "CPU"), f"{e.samples_per_s:.2f}", plan, f"{e.tokens_per_s:.0f}",
                         "-" if math.isnan(e.mfu_peak) else f"{100 * e.mfu_peak:.1f}%",
                         f"{100 * e.mfu_matmul:.1f}%", f"{100 * e.mfu_matmul_burst:.1f}%", f"{e.startup_seconds:.1f}",
                         "-" if math.isnan(e.max_prob_diff) else f"{e.max_prob_diff:.2e}",
                         "-" if math.isnan(e.log_loss) else f"{e.log_loss:.4f}"))
        widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
        fmt = lambda r: "  " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
        return "\n".join(head + [fmt(cols), "  " + "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run_bench(checkpoint: Path, prompts: list[list[int]], specs: list[EngineSpec], base: EngineConfig, *,
              warmup_prompts: list[list[int]] | None = None, labels: np.ndarray | None = None,
              max_model_len: int | None = None, model_note: str = "", progress: bool = False,
              trust_remote_code: bool = False, on_engine=None) -> BenchReport:
    """Time each engine on the same prompts (see module doc). An engine that fails is reported, not fatal.

    `on_engine(figures)` is called as soon as each engine is done (stages/bench.py logs its metrics then),
    so a bench killed at a time limit keeps the figures of the engines that finished."""
    import traceback

    from .plan import engine_plan
    from .scoring import Scorer

    checkpoint = Path(checkpoint)
    card = card_name()
    burst, matmul, matmul_what = measured_matmul_tflops()
    peak = card_peak_tflops(card, "bf16")
    params = model_dims(str(checkpoint))[0].layer_params  # matmul weights every prompt token runs through
    lengths = [len(p) for p in prompts]
    tokens = sum(lengths)
    max_model_len = max_model_len or max(len(p) for p in [*prompts, *(warmup_prompts or [])]) + 8
    figures, probs = [], {}
    for spec in specs:
        fig = EngineFigures(spec.label, spec.backend)
        figures.append(fig)
        try:
            engine = engine_config(base, spec)
            ckpt = Path(spec.model) if spec.model else checkpoint
            with Scorer(ckpt, engine, max_model_len=max_model_len, trust_remote_code=trust_remote_code) as scorer:
                fig.startup_seconds = scorer.startup_seconds
                if warmup_prompts:
                    scorer.score(warmup_prompts, progress=False)
                result = scorer.score(prompts, progress=progress)
            fig.seconds, fig.samples_per_s, fig.tokens_per_s = result.seconds, result.samples_per_s, result.tokens_per_s
            if card.startswith("CPU"):
                fig.gpus = 0
            else:
                fig.gpus = engine.tensor_parallel_size * engine.data_parallel_size
            achieved = 2.0 * params * result.tokens_per_s / 1e12 / max(fig.gpus, 1)
            fig.mfu_matmul, fig.mfu_matmul_burst = achieved / matmul, achieved / burst
            planned = engine_plan(ckpt, engine, lengths, card, gpu_count())
            if planned is not None:
                fig.plan_samples_per_s = 1.0 / planned.seconds_per_row
            if peak:
                fig.mfu_peak = achieved / peak
            probs[spec.label] = result.probs
            if labels is not None:
                from .metrics import preference_metrics

                fig.log_loss = preference_metrics(result.probs, labels)["log_loss"]
        except Exception as err:  # noqa: BLE001 - one engine's failure is a figure of the bench
            fig.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            print(f"bench: engine {spec.label} failed: {type(err).__name__}: {err}")
        finally:
            free_gpu_memory()
        if not fig.error:
            print(f"bench: {spec.label}: {fig.samples_per_s:.2f} samples/s, {fig.tokens_per_s:.0f} tokens/s, "
                  f"MFU {100 * fig.mfu_matmul:.1f}% of the sustained matmul per GPU, start-up {fig.startup_seconds:.1f} s",
                  flush=True)
        if on_engine is not None:
            on_engine(fig)
    reference = next(iter(probs), "")
    for fig in figures:
        if fig.label in probs and reference:
            fig.max_prob_diff = float(np.abs(probs[fig.label] - probs[reference]).max())
    return BenchReport(card, model_note or str(checkpoint), params, len(prompts), tokens, peak, matmul, burst,
                       matmul_what, reference, figures, probs)
