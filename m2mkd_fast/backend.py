"""Choose the implementation of an op for one call: "triton", "cpp" or "torch".

Precedence: the op's ``backend=`` argument, then ``with use_backend(name):``, then the
environment variable ``M2MKD_BACKEND``, then "auto". Auto picks Triton for CUDA tensors, the C++
extension for CPU tensors when it is built (or can be built just in time: ``cpp_jit``), and plain
PyTorch otherwise; a backend that does not implement an op is skipped by auto. Asking for an unavailable backend explicitly raises
:class:`BackendUnavailable` saying why.

Each backend is a package with one module per op family (``routing``, ``moe``, ``readin``,
``graph``), each exporting a function named after its op with the signature of
``m2mkd_fast.ops`` (already autograd-enabled): ``m2mkd_fast.torch_backend``,
``m2mkd_fast.cpp_backend`` and ``m2mkd_fast.triton_backend``. A missing module means the backend
does not implement that op.
"""

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("triton", "cpp", "torch")
ENV_VAR = "M2MKD_BACKEND"
_MODULES = {
    "torch": "m2mkd_fast.torch_backend",
    "cpp": "m2mkd_fast.cpp_backend",
    "triton": "m2mkd_fast.triton_backend",
}
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("m2mkd_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run this op on these tensors."""


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")
    return name


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    device = torch.device(device)
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if _triton_interpreted() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not support {device.type} tensors"
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors only, got {device.type} tensors"
        from . import cpp_jit

        return cpp_jit.unavailable_reason()
    raise ValueError(f"unknown backend {name!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (default CPU), e.g. ``["torch", "cpp", "triton"]``."""
    return [name for name in ("torch", "cpp", "triton") if unavailable_reason(name, torch.device(device)) is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (or "auto")."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend(argument: Optional[str] = None) -> str:
    """The backend asked for by argument, context manager or environment ("auto" if none)."""
    if argument is not None:
        return _check_name(argument, "backend")
    if _override.get() is not None:
        return _override.get()
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


_FAMILY = {"route": "routing", "moe_mlp": "moe", "readin_attention": "readin", "graph_attention": "graph"}


def _lookup(name: str, op: str) -> Optional[Callable]:
    module_name = f"{_MODULES[name]}.{_FAMILY[op]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise
    return getattr(module, op, None)


def select(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, Callable]:
    """Return (backend name, implementation) of ``op`` for tensors on ``device``."""
    name = requested_backend(backend)
    device = torch.device(device)
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {name!r} is unavailable: {reason}")
        fn = _lookup(name, op)
        if fn is None:
            raise BackendUnavailable(f"{op}: backend {name!r} does not implement this op")
        return name, fn
    preference = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for candidate in preference:
        if unavailable_reason(candidate, device) is None:
            fn = _lookup(candidate, op)
            if fn is not None:
                return candidate, fn
    raise BackendUnavailable(f"{op}: no backend implements this op")


@torch.compiler.assume_constant_result
def backend_name(op: str, device_type: str, device_index: Optional[int], requested: str) -> str:
    """The backend ``select`` picks; evaluated outside dynamo once per trace."""
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    return select(op, device, requested)[0]


def select_backend(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """``select(op, device, backend)``'s implementation, also while torch.compile traces.

    ``select`` probes imports, which dynamo cannot trace. Under compilation the choice is
    made outside dynamo (``backend_name``, a constant per trace; it imports the module) and the
    function is read as an attribute of the backend package, so the op stays inside one graph
    and ``fullgraph=True`` works.
    """
    if not torch.compiler.is_compiling():
        return select(op, device, backend)[1]
    name = backend_name(op, device.type, device.index, requested_backend(backend))
    if name == "triton":
        from . import triton_backend as package
    elif name == "cpp":
        from . import cpp_backend as package
    else:
        from . import torch_backend as package
    return getattr(getattr(package, _FAMILY[op]), op)
