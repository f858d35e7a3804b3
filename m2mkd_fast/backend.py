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
does not implement that op. A module that cannot take every case of its op also exports
``supports(*args) -> bool`` (the op's arguments; decided from shapes, dtypes and devices only):
where it answers False, dispatch falls through to the next backend in the auto order — also
after an explicit request, so asking for a backend never fails on a case it lacks. No backend
imports another.
"""

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator, Optional

import torch

from .kernels import interpreting

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
            return None if interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not support {device.type} tensors"
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors only, got {device.type} tensors"
        from . import cpp_jit

        reason = cpp_jit.unavailable_reason()
        if reason is None and not hasattr(torch.ops.m2mkd_fast, "moe_cpp_fwd"):
            reason = ("the C++ extension m2mkd_fast._C is out of date (it does not register the m2mkd_fast::<family>_cpp_* "
                      "ops); rebuild it: python setup.py build_ext --inplace")
        return reason
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


_FAMILY = {"route": "routing", "vmoe_aux_loss": "routing", "moe_mlp": "moe", "readin_attention": "readin", "graph_attention": "graph"}


def _module(name: str, op: str):
    module_name = f"{_MODULES[name]}.{_FAMILY[op]}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def _lookup(name: str, op: str) -> Optional[Callable]:
    module = _module(name, op)
    return None if module is None else getattr(module, op, None)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")


def candidates(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, ...]:
    """Backends that implement ``op`` and can run on ``device``, in the order dispatch tries
    them: the requested one first (BackendUnavailable if it cannot run here or lacks the op),
    then the rest of the auto order."""
    name = requested_backend(backend)
    device = torch.device(device)
    order = _auto_order(device)
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {name!r} is unavailable: {reason}")
        if _lookup(name, op) is None:
            raise BackendUnavailable(f"{op}: backend {name!r} does not implement this op")
        order = (name,) + tuple(n for n in order if n != name)
    found = tuple(n for n in order if unavailable_reason(n, device) is None and _lookup(n, op) is not None)
    if not found:
        raise BackendUnavailable(f"{op}: no backend implements this op")
    return found


def _supports(module, args: Optional[tuple]) -> bool:
    check = getattr(module, "supports", None)
    return args is None or check is None or check(*args)


def select(op: str, device: torch.device, backend: Optional[str] = None, args: Optional[tuple] = None) -> tuple[str, Callable]:
    """Return (backend name, implementation) of ``op`` for tensors on ``device``: the first of
    :func:`candidates` whose module ``supports`` the op's arguments ``args`` (when given)."""
    names = candidates(op, device, backend)
    for name in names:
        if _supports(_module(name, op), args):
            return name, _lookup(name, op)
    raise BackendUnavailable(f"{op}: none of the backends {names} supports these arguments")


@torch.compiler.assume_constant_result
def candidate_names(op: str, device_type: str, device_index: Optional[int], requested: str) -> tuple[str, ...]:
    """:func:`candidates`, evaluated outside dynamo once per trace."""
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    return candidates(op, device, requested)


def select_backend(op: str, device: torch.device, backend: Optional[str] = None, args: Optional[tuple] = None) -> Callable:
    """``select(op, device, backend, args)``'s implementation, also while torch.compile traces.

    ``select`` probes imports, which dynamo cannot trace. Under compilation the candidates are
    listed outside dynamo (``candidate_names``, a constant per trace; it imports the modules)
    and each backend's module is read as an attribute of its package, so the op stays inside
    one graph and ``fullgraph=True`` works.
    """
    if not torch.compiler.is_compiling():
        return select(op, device, backend, args)[1]
    names = candidate_names(op, device.type, device.index, requested_backend(backend))
    for name in names:
        if name == "triton":
            from . import triton_backend as package
        elif name == "cpp":
            from . import cpp_backend as package
        else:
            from . import torch_backend as package
        module = getattr(package, _FAMILY[op])
        if _supports(module, args):
            return getattr(module, op)
    raise BackendUnavailable(f"{op}: none of the backends {names} supports these arguments")
