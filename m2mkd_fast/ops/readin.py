"""NAC read-in attention, validated and dispatched (docs/design.md §2.3)."""

from typing import Optional

import torch

from ..backend import select_backend
from ..checks import check_finite
from .precision import autocast_dtype, autocast_off, cast_operands

__all__ = ["readin_attention"]


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"readin_attention: {name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"readin_attention: {name} must be {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"readin_attention: {name} must be a floating-point tensor, got {t.dtype}")


def readin_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    b_v: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """NAC read-in attention in its folded form: U latents attend to V tokens (docs/design.md §2.3).

    m[b,u,h] = Σ_v softmax_v(q[b,u,h] · k[b,v,u,h] / √C) · val[b,v,u,h], where the per-(token,
    latent) key and value are ModFCs of the token with the latent's code,
    k[b,v,u,h] = W_k,h (x[b,v] ⊙ s_k[u]) and val[b,v,u,h] = W_v,h (x[b,v] ⊙ s_v[u]) + b_v,h —
    computed without ever forming anything of size B·V·U.

    Args:
        q:   [B, U, H, C] queries of the latents (heads split channels head-major).
        x:   [B, V, Din] tokens, already layer-normed (keys and values are built from them).
        w_k: [H, C, Din] key weight (the key ModFC's weight [H·C, Din] viewed per head).
        w_v: [H, C, Din] value weight.
        s_k: [U, Din] key ModFC scale of each latent, s_k(c_u) = 1 + γ_k · LN(S_k c_u).
        s_v: [U, Din] value ModFC scale of each latent.
        b_v: [H, C] value bias, or None. (A key bias would cancel in the softmax: there is none.)
        backend: None | "auto" | "triton" | "cpp" | "torch" (see m2mkd_fast.backend).

    Returns:
        m [B, U, H, C] in the dtype of q — under autocast, every tensor is first cast to the
        autocast dtype (as F.linear does). Scale 1/√C with C the head dim of q.
    """
    q, x, w_k, w_v, s_k, s_v, b_v = cast_operands(autocast_dtype(q), q, x, w_k, w_v, s_k, s_v, b_v)
    _check_tensor("q", q, 4, "[B, U, H, C]")
    _check_tensor("x", x, 3, "[B, V, Din]")
    batch, receivers, heads, head_dim = q.shape
    in_dim = x.shape[2]
    if x.shape[0] != batch:
        raise ValueError(f"readin_attention: x batch size {x.shape[0]} does not match q's {batch} (x is [B, V, Din], q [B, U, H, C])")
    if x.shape[1] < 1:
        raise ValueError("readin_attention: x must hold at least one token (V >= 1), got V = 0")
    expected = {"w_k": (heads, head_dim, in_dim), "w_v": (heads, head_dim, in_dim), "s_k": (receivers, in_dim), "s_v": (receivers, in_dim)}
    layouts = {"w_k": "[H, C, Din]", "w_v": "[H, C, Din]", "s_k": "[U, Din]", "s_v": "[U, Din]"}
    named = {"w_k": w_k, "w_v": w_v, "s_k": s_k, "s_v": s_v}
    if b_v is not None:
        expected["b_v"], layouts["b_v"], named["b_v"] = (heads, head_dim), "[H, C]", b_v
    for name, t in named.items():
        _check_tensor(name, t, len(expected[name]), layouts[name])
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"readin_attention: {name} must be {layouts[name]} = {expected[name]} (from q {tuple(q.shape)} and "
                f"x {tuple(x.shape)}), got {tuple(t.shape)}"
            )
    for name, t in [("x", x)] + list(named.items()):
        if t.dtype != q.dtype:
            raise TypeError(f"readin_attention: {name} has dtype {t.dtype} but q has {q.dtype}; all tensors must share one dtype")
        if t.device != q.device:
            raise ValueError(f"readin_attention: {name} is on {t.device} but q is on {q.device}; all tensors must be on one device")
    check_finite("readin_attention", q=q, x=x, w_k=w_k, w_v=w_v, s_k=s_k, s_v=s_v, b_v=b_v)
    args = (q, x, w_k, w_v, s_k, s_v, b_v)
    fn = select_backend("readin_attention", q.device, backend, args)  # also inside torch.compile
    with autocast_off(q):
        return fn(*args)
