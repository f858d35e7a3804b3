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
        [sys.executable, "-m", "m2mkd_fast.kernels.report", "--quick", "--check"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| kernel | config |" in proc.stdout


def test_head_dim_128_backward_is_spill_free_on_every_target():
    """The 16-bit backward kernels at head dim 128, every mode and config the autotuner may pick
    (the register-heaviest kernels of the package; --quick above compiles head dim 64 only)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "m2mkd_fast.kernels.report", "--only", "graph_attention_bwd_d", "--only", "C=128",
         "--only", "bf16", "--check"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("| ok |") >= 12, proc.stdout[-4000:]
