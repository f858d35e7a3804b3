"""NAC kernel-modulated graph attention, validated and dispatched (docs/design.md §2.4)."""

import math
import numbers
from typing import Optional

import torch

from ..backend import select_backend
from ..checks import check_finite
from .precision import autocast_dtype, autocast_off, cast_operands

__all__ = ["graph_attention"]

MAX_SEED = 2**63  # seeds are 0 <= seed < 2**63 (an int64 in every backend)


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"graph_attention: {name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"graph_attention: {name} must be {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"graph_attention: {name} must be a floating-point tensor, got {t.dtype}")


def _check_seed(seed):
    """The seed as an int, or as a 0-dim int64 CPU tensor when given as a tensor (a layer that
    draws a seed per call passes a tensor, so torch.compile neither specialises on its value nor
    breaks the graph to read it); its value must be in [0, 2**63)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.device.type != "cpu" or seed.dtype != torch.int64:
            raise ValueError(
                f"graph_attention: a tensor seed must be a 0-dim int64 CPU tensor, got shape {tuple(seed.shape)}, "
                f"{seed.dtype} on {seed.device}"
            )
        if not _tracing() and not 0 <= int(seed) < MAX_SEED:
            raise ValueError(f"graph_attention: seed must be in [0, 2**63), got {int(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"graph_attention: seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _tracing() -> bool:
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float] = 0.9,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    threshold: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Kernel-modulated graph attention of NAC's propagators (docs/design.md §2.4).

    scores[b,h,u,v] = q·k/√C + bias[b,u,v]; softmax over v; o = Σ_v a·v, where the kernel
    bias comes from the signatures: dist = 1 − cos(σ_u, σ_v), ℓ = −dist/β on kept edges
    (dist ≤ truncation, ties kept) and −∞ elsewhere; then per mode

    * temperature=None, threshold=False: bias = ℓ (the eval default, "no_sample");
    * temperature=t: a relaxed-Bernoulli sample per batch element, the same for all heads:
      p = clamp(exp ℓ, ε, 1−ε), n[b,u,v] = clamp(tl.rand(seed, (b·U+u)·V+v), ε, 1−ε) (Triton's
      Philox stream; every backend draws the same numbers), bias = logsigmoid((logit p + logit n)/t);
    * threshold=True: bias = 0 where kept and dist/β ≤ ln 2, −∞ elsewhere; no gradient to σ, β.

    A receiver with no edge gets a zero output and zero gradients.

    Args:
        q:      [B, H, U, C] receiver queries.
        k, v:   [B, H, V, C] sender keys and values.
        sig_r:  [U, S] receiver signatures.
        sig_s:  [V, S] sender signatures.
        bandwidth: 0-dim tensor β, finite and > 0.
        truncation: τ > 0, or None for no truncation (every edge kept, as in the read-out); τ ≥ 2
            keeps every edge too (dist ≤ 2) and is taken as None.
        temperature: None, or t > 0 to sample the kernel (training).
        seed:   int in [0, 2**63) (or a 0-dim int64 CPU tensor holding one), required when
                temperature is set.
        threshold: the 0/−∞ eval mode; exclusive with temperature.
        backend: None | "auto" | "triton" | "cpp" | "torch" (see m2mkd_fast.backend).

    q, k, v share one dtype; sig_r, sig_s and bandwidth may have their own (fp32 parameters beside
    bf16 activations): the kernel bias is computed from them in at least fp32, so bf16 rounding
    never moves an edge across the truncation radius. Under autocast, q, k and v are cast to the
    autocast dtype (the signatures and β are not) and the op returns that dtype, on every backend.
    All tensors on one device; B·U·V < 2**31. Returns o [B, H, U, C] in q's dtype.
    """
    q, k, v = cast_operands(autocast_dtype(q), q, k, v)
    _check_tensor("q", q, 4, "[B, H, U, C]")
    _check_tensor("k", k, 4, "[B, H, V, C]")
    _check_tensor("v", v, 4, "[B, H, V, C]")
    _check_tensor("sig_r", sig_r, 2, "[U, S]")
    _check_tensor("sig_s", sig_s, 2, "[V, S]")
    _check_tensor("bandwidth", bandwidth, 0, "0-dim (a scalar tensor)")
    batch, heads, receivers, head_dim = q.shape
    senders = k.shape[2]
    if tuple(k.shape) != (batch, heads, senders, head_dim):
        raise ValueError(f"graph_attention: k must be [B, H, V, C] with B, H, C of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"graph_attention: v must have k's shape {tuple(k.shape)} ([B, H, V, C]), got {tuple(v.shape)}")
    if sig_r.shape[0] != receivers:
        raise ValueError(f"graph_attention: sig_r must be [U, S] with U = {receivers} (q's dim 2), got {tuple(sig_r.shape)}")
    if tuple(sig_s.shape) != (senders, sig_r.shape[1]):
        raise ValueError(
            f"graph_attention: sig_s must be [V, S] = {(senders, sig_r.shape[1])} (V from k, S from sig_r), got {tuple(sig_s.shape)}"
        )
    for name, t in [("k", k), ("v", v)]:
        if t.dtype != q.dtype:
            raise TypeError(f"graph_attention: {name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    for name, t in [("k", k), ("v", v), ("sig_r", sig_r), ("sig_s", sig_s), ("bandwidth", bandwidth)]:
        if t.device != q.device:
            raise ValueError(f"graph_attention: {name} is on {t.device} but q is on {q.device}; all tensors must be on one device")
    if batch * receivers * senders >= 2**31:
        raise ValueError(f"graph_attention: B·U·V = {batch * receivers * senders} must be below 2**31 (int32 noise offsets)")
    if truncation is not None:
        if isinstance(truncation, bool) or not isinstance(truncation, numbers.Real) or not truncation > 0:
            raise ValueError(f"graph_attention: truncation must be a number > 0 or None, got {truncation!r}")
        truncation = None if truncation >= 2 else float(truncation)
    if not isinstance(threshold, bool):
        raise TypeError(f"graph_attention: threshold must be a bool, got {threshold!r}")
    if temperature is not None:
        if threshold:
            raise ValueError("graph_attention: threshold=True and temperature are exclusive (threshold is an eval mode without sampling)")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"graph_attention: temperature must be a finite number > 0 or None, got {temperature!r}")
        temperature = float(temperature)
        if seed is None:
            raise ValueError("graph_attention: temperature is set (sampling), so seed must be given as an int in [0, 2**63)")
        seed = _check_seed(seed)
    if not _tracing() and not bool((bandwidth.detach() > 0) & torch.isfinite(bandwidth.detach())):
        raise ValueError(f"graph_attention: bandwidth must be finite and > 0, got {bandwidth.item()}")
    check_finite("graph_attention", q=q, k=k, v=v, sig_r=sig_r, sig_s=sig_s)
    args = (q, k, v, sig_r, sig_s, bandwidth, truncation, temperature, seed, threshold)
    fn = select_backend("graph_attention", q.device, backend, args)  # also inside torch.compile
    with autocast_off(q):
        return fn(*args)
