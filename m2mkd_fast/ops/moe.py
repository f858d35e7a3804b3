"""The MoE MLP (docs/design.md §2.1): validation, then the chosen backend."""

from typing import Optional

import torch

from ..routing_result import Routing
from ..backend import select_backend
from ..checks import check_finite
from ..reference.moe import ACTIVATIONS
from .precision import autocast_dtype, autocast_off, cast_operands


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_moe_mlp_args(x, r, w1, b1, w2, b2, activation) -> None:
    """Validate the arguments of :func:`moe_mlp`; raise TypeError / ValueError naming the argument."""
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d], got shape {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    T, d = x.shape
    if w1.dim() != 3 or w1.shape[1] != d:
        raise ValueError(f"w1 must be [E, d={d}, h], got shape {_shape(w1)}")
    E, _, h = w1.shape
    if E < 1:
        raise ValueError(f"w1 must hold at least one expert, got shape {_shape(w1)}")
    if _shape(w2) != (E, h, d):
        raise ValueError(f"w2 must be [E, h, d] = {(E, h, d)}, got shape {_shape(w2)}")
    for name, b, want in (("b1", b1, (E, h)), ("b2", b2, (E, d))):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
        if _shape(b) != want:
            raise ValueError(f"{name} must be {list(want)} or None, got shape {_shape(b)}")
    params = (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))
    for name, t in params:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != x dtype {x.dtype}; all of x, w1, b1, w2, b2 must share one dtype")
    if not isinstance(r, Routing):
        if not (isinstance(r, tuple) and all(hasattr(r, f) for f in Routing._fields)):
            raise TypeError(f"r must be the Routing returned by route(), got {type(r).__name__}")
    for name, t in (("r.expert", r.expert), ("r.slot", r.slot), ("r.weight", r.weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != T:
            raise ValueError(f"{name} must be [T={T}, k], got {_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    k = r.expert.shape[1]
    if _shape(r.slot) != (T, k) or _shape(r.weight) != (T, k):
        raise ValueError(f"r.slot and r.weight must be [T, k] = {(T, k)} like r.expert, got {_shape(r.slot)} and {_shape(r.weight)}")
    if r.expert.dtype != torch.long or r.slot.dtype != torch.long:
        raise TypeError(f"r.expert and r.slot must be int64, got {r.expert.dtype} and {r.slot.dtype}")
    if not r.weight.is_floating_point():
        raise TypeError(f"r.weight must be floating point, got {r.weight.dtype}")
    if isinstance(r.counts, torch.Tensor) and _shape(r.counts) != (E,):
        raise ValueError(f"r was routed over {r.counts.shape[0] if r.counts.dim() else '?'} experts but w1 holds E={E}")
    devices = {t.device for _, t in params + (("x", x), ("r.expert", r.expert), ("r.slot", r.slot), ("r.weight", r.weight)) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, r, w1, b1, w2, b2 must be on one device, got {sorted(str(v) for v in devices)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if x.device.type == "cpu" and r.expert.numel() and not torch.compiler.is_compiling():
        lo, hi = int(r.expert.min()), int(r.expert.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"r.expert holds expert indices in [{lo}, {hi}], outside [0, E={E})")


def moe_mlp(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Mixture-of-experts MLP: y[t] = Σ over kept (t, j) of r.weight[t, j] · Expert_e(x[t]).

    Args:
        x: [T, d] tokens.
        r: the :class:`~m2mkd_fast.routing_result.Routing` of these T tokens from ``route``
            (expert [T, k], weight [T, k] — cast to x.dtype —, slot [T, k], counts [E]).
        w1: [E, d, h], b1: [E, h] or None — fc1 of every expert (x @ w1[e] + b1[e]).
        w2: [E, h, d], b2: [E, d] or None — fc2 of every expert.
        activation: "gelu" (exact, timm's Mlp) or "gelu_tanh" (tanh approximation, V-MoE).
        backend: None | "auto" | "torch" | "cpp" | "triton".

    Returns:
        y [T, d]. Dropped pairs (slot −1) contribute nothing. Differentiable with respect to x,
        the weights and biases, and r.weight; an expert without tokens gets zero gradients.
        Under autocast, x and the expert weights and biases are cast to the autocast dtype and
        y comes back in it; r.weight is not cast (float32 from the layer's router).
    """
    x, w1, b1, w2, b2 = cast_operands(autocast_dtype(x), x, w1, b1, w2, b2)
    check_moe_mlp_args(x, r, w1, b1, w2, b2, activation)
    check_finite("moe_mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2, **{"r.weight": r.weight})
    args = (x, r, w1, b1, w2, b2, activation)
    fn = select_backend("moe_mlp", x.device, backend, args)
    with autocast_off(x):
        return fn(*args)
