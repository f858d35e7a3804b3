"""Top-k expert routing and V-MoE's aux loss (docs/design.md §2.1): validation, then the chosen backend."""

import math
import numbers
from typing import Optional

import torch

from ..backend import select_backend
from ..checks import check_finite
from ..routing_result import GATES, Routing
from .precision import autocast_off


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}={value} < {low}")


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [T, E], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert (E >= 1), got shape {tuple(logits.shape)}")


def _check_group_size(group_size, num_tokens: int) -> None:
    if group_size is None:
        return
    _check_int("group_size", group_size)
    if num_tokens % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of tokens T={num_tokens}")


def check_route_args(logits, k, gate, capacity_factor, batch_priority, group_size) -> None:
    """Validate the arguments of :func:`route`; raise TypeError / ValueError naming the argument."""
    _check_logits(logits)
    num_tokens, num_experts = logits.shape
    _check_int("k", k)
    if k > num_experts:
        raise ValueError(f"k={k} > num_experts={num_experts}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
            raise TypeError(f"capacity_factor must be a float > 0 or None, got {type(capacity_factor).__name__}")
        if not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a finite number > 0 or None (dropless), got {capacity_factor}")
    if not isinstance(batch_priority, bool):
        raise TypeError(f"batch_priority must be a bool, got {type(batch_priority).__name__}")
    _check_group_size(group_size, num_tokens)


def route(
    logits: torch.Tensor,
    k: int,
    gate: str = "vmoe",
    capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    group_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Routing:
    """Route T tokens to k of E experts each (docs/design.md §2.1).

    Args:
        logits: [T, E] float router logits (noise, if any, already added by the caller).
        k: experts per token, 1 <= k <= E.
        gate: "vmoe" — top-k of softmax(logits) over all E, weight = those softmax values (not
            renormalised); "naive" — top-k of the logits, weight = softmax over the k. Ties go to
            the lower expert index.
        capacity_factor: None = dropless; else each expert holds
            C = ceil((S·k)·cf/E) rounded up to a multiple of 4 pairs per group.
        batch_priority: fill the buffers in order of descending first-choice weight (BPR)
            instead of token order.
        group_size: S, tokens per routing group (consecutive; must divide T); None = all T.
        backend: None | "auto" | "torch" | "cpp" | "triton" (see m2mkd_fast.backend).

    Returns:
        Routing(expert [T, k] int64, weight [T, k] logits.dtype, slot [T, k] int64 (−1 =
        dropped; the weight of a dropped pair is kept but it contributes nothing),
        counts [E] int64 kept pairs per expert, capacity int | None). ``weight`` is
        differentiable with respect to ``logits``. Autocast does not apply: routing runs in
        the logits' dtype (float32 for a layer, docs/design.md §2.7).
    """
    check_route_args(logits, k, gate, capacity_factor, batch_priority, group_size)
    check_finite("route", logits=logits)
    args = (logits, k, gate, capacity_factor, batch_priority, group_size)
    fn = select_backend("route", logits.device, backend, args)
    with autocast_off(logits):
        return fn(*args)


def vmoe_aux_loss(
    clean_logits: torch.Tensor,
    noisy_logits: Optional[torch.Tensor],
    k: int,
    noise_std: float,
    group_size: Optional[int] = None,
    training: bool = True,
) -> torch.Tensor:
    """V-MoE's auxiliary load-balancing loss (docs/design.md §2.1), vectorised over groups.

    Per group of S tokens: importance_e = Σ_t softmax(clean)_e and, in training with
    noise_std > 0, load_e = mean_t [1 − Φ((τ_t − clean_e)/σ)] with τ_t the k-th largest noisy
    logit of token t and σ = noise_std / E; loss = 0.005·CV²(importance) [+ 0.005·CV²(load)],
    CV² = (std/mean)² with the population std. Returns the mean over groups (0-dim; 0 for T = 0).
    Gradients flow through the clean logits and through τ.
    """
    _check_logits(clean_logits, "clean_logits")
    num_tokens, num_experts = clean_logits.shape
    _check_int("k", k)
    if k > num_experts:
        raise ValueError(f"k={k} > num_experts={num_experts}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    _check_group_size(group_size, num_tokens)
    use_load = training and noise_std > 0
    if use_load:
        if noisy_logits is None or noisy_logits.shape != clean_logits.shape:
            shape = None if noisy_logits is None else tuple(noisy_logits.shape)
            raise ValueError(f"noisy_logits must have the shape of clean_logits {tuple(clean_logits.shape)}, got {shape}")
    args = (clean_logits, noisy_logits if use_load else None, k, noise_std, group_size, use_load)
    return select_backend("vmoe_aux_loss", clean_logits.device, "torch", args)(*args)  # plain tensor ops, any device
