"""Every Triton kernel compiles for sm_80 and sm_90a without spills, within shared memory, and
with tensor-core instructions in its bf16 dots (run in a subprocess: the test session itself
interprets the kernels)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "m2mkd_fast.kernels.aot.report", "--quick", "--check"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| kernel | config |" in proc.stdout


def test_head_dim_128_backward_is_spill_free_on_every_target():
    """The 16-bit backward kernels at head dim 128, every mode and config the autotuner may pick
    (the register-heaviest kernels of the package; --quick above compiles head dim 64 only)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "m2mkd_fast.kernels.aot.report", "--only", "graph_attention_bwd_d", "--only", "C=128",
         "--only", "bf16", "--check"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("| ok |") >= 12, proc.stdout[-4000:]


def test_walking_the_kernels_package_finds_every_family_and_its_specs():
    """Tools that list the kernels (pkgutil) see every family module and its ahead-of-time specs."""
    import importlib
    import pkgutil

    kernels = importlib.import_module("m2mkd_fast.kernels")
    found = {m.name for m in pkgutil.walk_packages(kernels.__path__, "m2mkd_fast.kernels.")}
    for family in ("routing", "moe", "readin", "graph"):
        assert f"m2mkd_fast.kernels.{family}" in found
        assert f"m2mkd_fast.kernels.aot.{family}" in found
    assert "m2mkd_fast.kernels.aot.report" in found
