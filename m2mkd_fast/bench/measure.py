"""Median time and peak memory of a callable, and the device's measured ceilings.

CUDA: triton.testing.do_bench (CUDA events, median) and torch.cuda.max_memory_allocated.
CPU: torch.utils.benchmark.Timer (median of blocked runs) and the peak growth of the bytes held
by tensors during one call, from the profiler's memory events (peak_allocated_bytes; scratch
buffers a C++ kernel allocates outside ATen, a few hundred KiB at most here, are not counted).
"""

import contextlib
import os
import sys
import warnings
from typing import Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ library logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak growth of the bytes held by tensors (the c10 CPU allocator) during one call of fn,
    from the profiler's allocation and free events in time order: the CPU counterpart of
    torch.cuda.max_memory_allocated() minus the memory allocated before the call."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


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
    peak = peak_allocated_bytes(fn) / 2**20
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    ms = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return {"ms": float(ms), "peak_mib": float(peak)}


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
