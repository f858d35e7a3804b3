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
