"""What this machine is: the card's name, how many GPUs, and a matmul rate measured now (bench's MFU)."""

from __future__ import annotations

import time

import numpy as np


def card_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def measured_matmul_tflops(size: int | None = None, repeats: int = 20,
                           sustain_seconds: float = 10.0) -> tuple[float, float, str]:
    """(burst, sustained) TFLOP/s of a square matmul measured now: bf16 8192^3 on CUDA, float32 1024^3 on CPU.

    Burst: median of `repeats` single products (CUDA events) after warm-up, a few ms of work.
    Sustained: products back to back for `sustain_seconds`, rate over the second half: what the card
    keeps up once clocks and power settle, as they do during an engine's timed pass (seconds, not ms).
    On CPU the two are the same measurement."""
    import torch

    if torch.cuda.is_available():
        size = size or 8192
        dtype, dev = torch.bfloat16, "cuda"
    else:
        size = size or 1024
        dtype, dev = torch.float32, "cpu"
    a = [torch.randn(size, size, device=dev, dtype=dtype) for _ in range(3)]
    b = [torch.randn(size, size, device=dev, dtype=dtype) for _ in range(3)]
    flops = 2 * size**3
    times = []
    for i in range(repeats + 3):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a[i % 3], b[i % 3])
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a[i % 3], b[i % 3])
            seconds = time.perf_counter() - t0
        if i >= 3:
            times.append(seconds)
    burst = flops / float(np.median(times)) / 1e12
    sustained = burst
    if dev == "cuda":
        chunk = max(int(0.25 * burst * 1e12 / flops), 1)  # ~0.25 s of products per timed chunk
        rates, t_end = [], time.perf_counter() + sustain_seconds
        while time.perf_counter() < t_end:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(chunk):
                torch.matmul(a[i % 3], b[i % 3])
            end.record()
            end.synchronize()
            rates.append(chunk * flops / (start.elapsed_time(end) / 1e3) / 1e12)
        sustained = float(np.mean(rates[len(rates) // 2:]))
    del a, b
    if dev == "cuda":
        torch.cuda.empty_cache()
    return burst, sustained, f"{str(dtype).removeprefix('torch.')} {size}^3"


def gpu_memory_gib(devices: int = 1) -> tuple[float, float] | None:
    """(free, total) GiB of the most used of the first `devices` GPUs this process sees (CUDA_VISIBLE_DEVICES
    order), read through NVML (no CUDA context is created); None without NVML or GPUs."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - no NVML library or no NVIDIA GPU
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    indices = [int(v) for v in visible if v.isdigit()] if visible else list(range(count))
    if not indices or len(indices) != len(visible or indices):  # UUIDs or MIG names: not mapped here
        return None
    infos = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices[:devices]]
    worst = min(infos, key=lambda m: m.free)
    return worst.free / 2**30, worst.total / 2**30


def free_gpu_memory() -> None:
    """Collect garbage and hand the caching allocator's free blocks back to the driver, so that a
    process started next (vLLM's engine core) finds the memory free."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuMemoryPeak:
    """Peak device memory in use on this machine's GPUs while the block runs (GiB, the largest GPU),
    sampled through NVML every `interval` s: it counts every process, vLLM's engine core included.
    `peak_gib` stays None without NVML or GPUs (CPU machines)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_gib = interval, None
        self._stop = None

    def __enter__(self) -> GpuMemoryPeak:
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML library or no NVIDIA GPU: nothing to measure
            return self
        if not handles:
            return self
        self._stop = threading.Event()

        def sample() -> None:
            while True:
                used = max(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**30
                self.peak_gib = max(self.peak_gib or 0.0, used)
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
