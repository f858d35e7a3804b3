import os

import pytest
import torch

import m2mkd_fast as mk
from m2mkd_fast import backend


def test_version_and_backends():
    assert isinstance(mk.__version__, str)
    names = mk.available_backends()
    assert names[0] == "torch"
    assert set(names) <= {"torch", "cpp", "triton"}


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with mk.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        backend.requested_backend("fast")


def test_precedence_argument_over_context_over_env(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpp")
    assert backend.requested_backend() == "cpp"
    with mk.use_backend("torch"):
        assert backend.requested_backend() == "torch"
        assert backend.requested_backend("triton") == "triton"
    assert backend.requested_backend() == "cpp"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason("triton", torch.device("cpu")) is None


def test_cpp_refuses_cuda_tensors():
    reason = backend.unavailable_reason("cpp", torch.device("cuda"))
    assert "CPU tensors only" in reason


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backend.select("route", torch.device("cpu"), "triton")


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, fn = backend.select("route", torch.device("cpu"))
    assert name in ("cpp", "torch") and callable(fn)


def test_cpp_extension_builds_just_in_time_into_a_cached_directory(tmp_path):
    """M2MKD_CPP_JIT=1 compiles csrc/ with ninja into $M2MKD_CPP_CACHE and serves the cpp backend
    from it; a second import reuses the build (nothing recompiled)."""
    import subprocess
    import sys

    script = (
        "import torch, m2mkd_fast as mk, sys\n"
        "from m2mkd_fast import ops\n"
        "print(mk._C.__file__)\n"
        "r = ops.route(torch.randn(10, 4), k=2, gate='naive', backend='cpp')\n"
        "assert r.counts.sum().item() == 20\n"
    )
    env = {**os.environ, "M2MKD_CPP_JIT": "1", "M2MKD_CPP_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip().startswith(str(tmp_path))
    objects = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.o")}
    assert len(objects) == 5
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.o")} == objects


def test_a_backend_that_does_not_support_a_case_falls_through(monkeypatch):
    """A backend module whose supports(*args) says no is skipped for those arguments, also when
    it was asked for explicitly; with none left, BackendUnavailable."""
    import importlib

    cpu = torch.device("cpu")
    args = (torch.randn(6, 4), 2, "vmoe", None, False, None)
    first, *rest = backend.candidates("route", cpu)
    monkeypatch.setattr(importlib.import_module(f"m2mkd_fast.{first}_backend.routing"), "supports",
                        lambda *a: False, raising=False)
    if rest:
        assert backend.select("route", cpu, None, args)[0] == rest[0]
        assert backend.select("route", cpu, first, args)[0] == rest[0]
    assert backend.select("route", cpu, first)[0] == first  # without arguments: no check
    for name in rest:
        monkeypatch.setattr(importlib.import_module(f"m2mkd_fast.{name}_backend.routing"), "supports",
                            lambda *a: False, raising=False)
    with pytest.raises(backend.BackendUnavailable, match="supports these arguments"):
        backend.select("route", cpu, None, args)
