"""Median time and peak memory of a callable, and the device's measured ceilings.

CUDA: triton.testing.do_bench (CUDA events, median) and torch.cuda.max_memory_allocated.
CPU: torch.utils.benchmark.Timer (median of blocked runs) and the peak growth of the process's
resident set while the callable runs, sampled by a background thread.
"""

import os
import threading
import time
from typing import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakRss:
    """Peak resident-set growth over a block, sampled every 0.5 ms."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> dict:
    """{"ms": median milliseconds, "peak_mib": peak memory of one call in MiB}."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, return_mode="median")
        return {"ms": float(ms), "peak_mib": float(peak)}
    import torch.utils.benchmark as benchmark

    fn()
    with _PeakRss() as rss:
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    ms = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return {"ms": float(ms), "peak_mib": float(rss.growth_mib)}


def probe_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured matmul FLOP/s (bf16 on CUDA, fp32 on CPU) and copy bytes/s of the device."""
    device = torch.device(device)
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = measure(lambda: a @ b, device, min_run_time=0.2)["ms"]
    src = torch.empty((64 if device.type == "cpu" else 1024) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device, min_run_time=0.2)["ms"]
    return {
        "matmul_flops": 2 * n**3 / (matmul_ms * 1e-3),
        "copy_bytes_per_s": 2 * src.numel() / (copy_ms * 1e-3),
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }
