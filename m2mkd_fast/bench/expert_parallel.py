"""`m2mkd-fast bench ep`: one MoE layer's training step with and without expert parallelism.

Spawns W gloo processes on the CPU (each one thread). Per rank and layer shape it measures the
median step time (forward + backward) and the peak resident memory the step adds, in two modes:

- data parallel: every rank holds all E experts and all-reduces their gradients after the
  backward (what DDP does with them);
- expert parallel (``mk.parallel.expert_parallel``): every rank holds E/W experts; token copies
  travel with all_to_all_single.

It also counts the elements the all-to-alls send to other ranks per step, against the analytic
2·k·T·d·(W−1)/W per direction (forward: dispatch + combine; backward: the same again), which
assumes a uniform routing without drops.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# name, d, h, E, k, tokens per rank
SHAPES = [("V-MoE micro", 96, 384, 8, 2, 400), ("V-MoE-B", 768, 3072, 8, 2, 256)]
QUICK_SHAPES = [("V-MoE micro", 96, 384, 8, 2, 100), ("V-MoE-B", 768, 3072, 8, 2, 32)]


class _CountSent:
    """Wraps dist.all_to_all_single to count the floating-point elements sent to other ranks."""

    def __init__(self):
        self.elements, self._original = 0, dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.is_floating_point():
            rank, row = dist.get_rank(group), input[0].numel() if input.shape[0] else 0
            self.elements += sum(n for w, n in enumerate(input_split_sizes) if w != rank) * row
        return self._original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(rank: int, world: int, init_method: str, shape: tuple, parallel: bool, steps: int, queue):
    from ..layers.moe import MoEMLP
    from ..parallel import expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    _, d, h, E, k, T = shape
    torch.manual_seed(0)
    before = _peak_rss_bytes()
    layer = MoEMLP(d, h, E, k=k, gate="vmoe", capacity_factor=1.05)
    if parallel:
        expert_parallel(layer)
    counter = _CountSent()
    dist.all_to_all_single = counter
    experts = [layer.w1, layer.b1, layer.w2, layer.b2]
    torch.manual_seed(1 + rank)
    x = torch.randn(T, d, requires_grad=True)
    times, sent = [], []
    try:
        for i in range(steps + 1):  # the first step warms up
            layer.zero_grad(set_to_none=True)
            dist.barrier()
            counter.elements = 0
            t = time.perf_counter()
            y = layer(x)
            forward_sent = counter.elements
            (y.square().mean() + layer.aux_loss).backward()
            if not parallel:
                for p in experts:
                    dist.all_reduce(p.grad)
            elapsed = time.perf_counter() - t
            if i:
                times.append(elapsed)
                sent.append((forward_sent, counter.elements - forward_sent))
    finally:
        dist.all_to_all_single = counter._original
    queue.put({"rank": rank, "parallel": parallel, "ms": 1e3 * statistics.median(times),
               "peak_mib": (_peak_rss_bytes() - before) / 2**20,
               "sent_fwd": statistics.mean(s[0] for s in sent), "sent_bwd": statistics.mean(s[1] for s in sent),
               "dropped": int(layer.stats["dropped"].sum())})
    dist.destroy_process_group()


def _one_config(world: int, shape: tuple, parallel: bool, steps: int) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_measure, args=(world, f"file://{tmp}/store", shape, parallel, steps, queue),
                           nprocs=world, join=True, start_method="spawn")
    return sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])


def table(rows: list, world: int, shapes: list) -> str:
    lines = ["| layer (d, h, E, k, T per rank) | mode | step ms (rank 0 / 1 …) | peak added MiB per rank "
             "| elements sent fwd / bwd (mean per rank) | analytic 2·k·T·d·(W−1)/W | MB sent per step per rank |",
             "|---|---|---|---|---|---|---|"]
    for shape, results in zip(shapes, rows):
        name, d, h, E, k, T = shape
        analytic = 2 * k * T * d * (world - 1) / world
        for parallel, recs in results:
            mode = f"expert parallel ({E // world} experts/rank)" if parallel else f"data parallel ({E} experts/rank)"
            ms = " / ".join(f"{r['ms']:.1f}" for r in recs)
            mib = " / ".join(f"{r['peak_mib']:.0f}" for r in recs)
            fwd = statistics.mean(r["sent_fwd"] for r in recs)
            bwd = statistics.mean(r["sent_bwd"] for r in recs)
            grads = E * (2 * d * h + h + d) * 2 * (world - 1) / world  # a ring all-reduce's sends
            sent = f"{fwd:,.0f} / {bwd:,.0f}" if parallel else "all-reduce of the expert gradients"
            mb = 4 * (fwd + bwd if parallel else grads) / 1e6
            lines.append(f"| {name} ({d}, {h}, {E}, {k}, {T}) | {mode} | {ms} | {mib} | {sent} | "
                         f"{analytic:,.0f} | {mb:.2f}{'' if parallel else ' (analytic, ring)'} |")
    return "\n".join(lines)


def run(world: int = 2, quick: bool = False, out: str = "bench-results") -> str:
    """Measure every shape in both modes on ``world`` CPU processes; write ``out``/expert_parallel.md."""
    shapes = QUICK_SHAPES if quick else SHAPES
    steps = 2 if quick else 5
    rows = [[(parallel, _one_config(world, shape, parallel, steps)) for parallel in (False, True)] for shape in shapes]
    header = (f"Expert parallelism, one MoE layer (vmoe gate, capacity factor 1.05, float32), fwd + bwd, "
              f"{world} gloo processes × 1 thread, median of {steps} steps; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}.\n"
              "Peak added MiB: the process's peak resident memory growth from before the layer was built.\n")
    text = header + "\n" + table(rows, world, shapes) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "expert_parallel.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
