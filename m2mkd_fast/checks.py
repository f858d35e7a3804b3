"""NaN / Inf checks of the ops' floating inputs (docs/design.md §2.8).

CPU tensors are always checked (one ``isfinite`` pass per tensor; the host already holds the
data). CUDA tensors are checked only when asked — ``m2mkd_fast.set_checks(True)`` or the
environment variable ``M2MKD_CHECKS=1`` — through ``torch._assert_async``, which needs no host
sync: a failure surfaces at the next synchronisation. Nothing is checked while torch.compile
traces.
"""

import os
from typing import Optional

import torch

ENV_VAR = "M2MKD_CHECKS"
_enabled: Optional[bool] = None  # None: follow the environment variable


def set_checks(enabled: Optional[bool]) -> None:
    """Check the ops' CUDA inputs for NaN / Inf (True), or not (False); None: follow M2MKD_CHECKS."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_checks: enabled must be a bool or None, got {enabled!r}")
    _enabled = enabled


def checks_enabled() -> bool:
    """Whether CUDA inputs are checked (CPU inputs always are)."""
    return _enabled if _enabled is not None else os.environ.get(ENV_VAR, "0") == "1"


def check_finite(op: str, **tensors) -> None:
    """Raise ValueError ``"<op>: <name> contains NaN or infinite values"`` for the first floating
    tensor argument holding one; None and non-floating arguments are skipped."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue
        message = f"{op}: {name} contains NaN or infinite values"
        if t.device.type == "cpu":
            if not bool(torch.isfinite(t).all()):
                raise ValueError(message)
        elif t.device.type == "cuda" and checks_enabled():
            torch._assert_async(torch.isfinite(t).all(), message)
