"""The one autocast step of the matmul ops and of routing (docs/design.md §2.7).

Inside ``torch.autocast(device, dtype)`` the matmul ops behave like ``F.linear``: their 16/32-bit
floating matmul operands are cast to the autocast dtype before the checks (float64 is left
alone, as autocast leaves it; so are mixed 16/32-bit operands reconciled) and the backend then
runs with autocast disabled, so every backend computes in the same dtypes. Routing runs with
autocast disabled too (float32 in, float32 out).
"""

import contextlib
from typing import Optional

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(ref) -> Optional[torch.dtype]:
    """The dtype autocast asks for on the device of tensor ``ref``, or None (autocast off)."""
    if not isinstance(ref, torch.Tensor) or ref.device.type not in _AUTOCAST_DEVICES:
        return None
    kind = ref.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def cast_operands(dtype: Optional[torch.dtype], *tensors) -> tuple:
    """``tensors`` with every 16/32-bit floating tensor cast to ``dtype`` (differentiably), as
    autocast casts F.linear's operands; float64 tensors, None and non-tensors pass unchanged (the
    op's checks then judge them), as does everything when dtype is None. Call before the checks."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t for t in tensors)


def autocast_off(ref: torch.Tensor):
    """A context that disables autocast on ``ref``'s device (a no-op on other devices)."""
    kind = ref.device.type
    return torch.autocast(kind, enabled=False) if kind in _AUTOCAST_DEVICES else contextlib.nullcontext()
