"""pytest-benchmark over the cases of `m2mkd-fast bench ops`: every op family, every formulation
(seed, peers, each available backend), forward and forward+backward, at docs/design.md §3's shapes for
the device (CPU shapes without a GPU).

    python -m pytest benchmarks/ --benchmark-only [--benchmark-group-by=group] [-k graph]
    M2MKD_BENCH_QUICK=1 ...   # the quick shapes of `bench --quick`

Cases are grouped by op family, shape and pass, so each group lists the formulations side by side.
"""

import os

import pytest
import torch

from m2mkd_fast.bench import ops_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("M2MKD_BENCH_QUICK", "0") == "1"
CASES = [(case, p) for case in ops_cases.all_cases(DEVICE, QUICK) for p in ("fwd", "fwd+bwd") if p in case.flops]


@pytest.mark.parametrize("case, pass_name", CASES, ids=[f"{c.family}-{c.formulation}-{p}" for c, p in CASES])
def test_op(benchmark, case, pass_name):
    benchmark.group = f"{case.family} {case.shape} {pass_name}"
    benchmark.extra_info.update(flops=case.flops[pass_name], min_bytes=case.min_bytes[pass_name])
    fn = case.build(pass_name)
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
