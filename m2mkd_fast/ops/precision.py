"""The one autocast step of the matmul ops and of routing (docs/design.md §2.7).

Inside ``torch.autocast(device, dtype)`` the matmul ops behave like ``F.linear``: their 16/32-bit
floating matmul operands are cast to the autocast dtype (float64 is left alone, as autocast
leaves it) and the backend then runs with autocast disabled, so every backend computes in the
same dtypes. Routing runs with autocast disabled too (float32 in, float32 out).
"""

import contextlib
from typing import Optional

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(ref: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast asks for on ``ref``'s device, or None (autocast off, or ref float64)."""
    kind = ref.device.type
    if kind not in _AUTOCAST_DEVICES or ref.dtype == torch.float64 or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast_operands(dtype: Optional[torch.dtype], *tensors: Optional[torch.Tensor]) -> tuple:
    """``tensors`` cast to ``dtype`` (differentiably); unchanged when dtype is None. None stays None."""
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_off(ref: torch.Tensor):
    """A context that disables autocast on ``ref``'s device (a no-op on other devices)."""
    kind = ref.device.type
    return torch.autocast(kind, enabled=False) if kind in _AUTOCAST_DEVICES else contextlib.nullcontext()
