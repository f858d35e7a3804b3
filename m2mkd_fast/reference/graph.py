"""NAC propagation: kernel-modulated graph attention (docs/design.md §2.4), the seed's dense formulation.

Receivers u (signatures sig_r [U,S]) attend to senders v (sig_s [V,S]) with a kernel bias:

    dist[u,v] = 1 − cos(σ_u, σ_v)          cos of the L2-normalised signatures (norms clamped at 1e-12)
    ℓ[u,v]    = −dist/β if dist ≤ τ else −∞  (ties kept; truncation=None keeps every edge)

and, per mode,

* deterministic (temperature=None, threshold=False): bias = ℓ;
* threshold: bias = 0 where dist ≤ τ and dist/β ≤ ln 2, −∞ elsewhere; detached (σ, β get no
  gradient from it);
* sampled (temperature=t): a relaxed-Bernoulli sample per batch element, the same for every head.
  With n[b,u,v] = clamp(philox_uniform(seed, (b·U + u)·V + v), ε, 1−ε), ε the float32 epsilon,
  p = clamp(exp(ℓ), ε, 1−ε):
      z = (log p − log1p(−p) + log n − log1p(−n)) / t,     bias[b,u,v] = logsigmoid(z),
  and −∞ on truncated edges. (The seed's per-row normaliser ℓ − logsumexp_v ℓ cancels in the
  softmax and is skipped.)

Then scores[b,h,u,v] = q·k/√C + bias[b,u,v], softmax over v, o = Σ_v a·v. A receiver with no
edge gets a zero output and zero gradients (never NaN).

The kernel bias is computed in float32 (float64 when the inputs are float64); attention scores
are computed in the inputs' dtype and added to it, the probabilities cast back before the
second matmul — what the seed does under autocast. This dense formulation (B·U·V bias, B·H·U·V
scores) is both the oracle and the "eager reference" baseline of the benchmarks.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .random import philox_uniform

__all__ = ["graph_log_affinity", "graph_attention", "graph_noise", "graph_sampled_bias"]

_EPS = torch.finfo(torch.float32).eps
_TINY = torch.finfo(torch.float32).tiny


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _distance(sig_r: torch.Tensor, sig_s: torch.Tensor) -> torch.Tensor:
    dtype = _opmath(sig_r.dtype)
    unit_r = F.normalize(sig_r.to(dtype), dim=-1, eps=1e-12)
    unit_s = F.normalize(sig_s.to(dtype), dim=-1, eps=1e-12)
    return 1 - unit_r @ unit_s.t()  # [U,V]


def _kept(dist: torch.Tensor, truncation: Optional[float]) -> torch.Tensor:
    if truncation is None:
        return torch.ones_like(dist, dtype=torch.bool)
    return dist <= truncation


def graph_log_affinity(
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float] = 0.9,
    threshold: bool = False,
) -> torch.Tensor:
    """The kernel's log-affinity ℓ [U,V] (float32, or float64 for float64 inputs).

    −dist/β on kept edges (dist ≤ truncation; truncation=None keeps all), −∞ elsewhere.
    threshold=True: 0 where kept and dist/β ≤ ln 2, −∞ elsewhere, detached.
    """
    dist = _distance(sig_r, sig_s)
    beta = bandwidth.to(dist.dtype)
    kept = _kept(dist, truncation)
    if threshold:
        with torch.no_grad():
            near = kept & (dist / beta <= math.log(2.0))
            return torch.zeros_like(dist).masked_fill(~near, float("-inf"))
    return torch.where(kept, -(dist / beta), torch.full_like(dist, float("-inf")))


def graph_noise(seed: int, batch: int, receivers: int, senders: int) -> torch.Tensor:
    """The sampling stream: n[b,u,v] = clamp(tl.rand(seed, (b·U + u)·V + v), ε, 1−ε), float32 [B,U,V]."""
    offsets = torch.arange(batch * receivers * senders, dtype=torch.int64).view(batch, receivers, senders)
    return philox_uniform(seed, offsets).clamp(_EPS, 1 - _EPS)


def graph_sampled_bias(
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float],
    temperature: float,
    uniform: torch.Tensor,
    seed_clamp: bool,
) -> torch.Tensor:
    """The sampled kernel bias [B,U,V] of :func:`graph_attention` for the uniforms ``uniform``
    [B,U,V] (−∞ on truncated edges; ``seed_clamp``: the seed's clamping instead)."""
    dist = _distance(sig_r, sig_s)
    kept = _kept(dist, truncation)
    log_p = -(dist / bandwidth.to(dist.dtype))  # finite everywhere; truncated edges handled below
    p = torch.exp(log_p).clamp(_EPS, 1 - _EPS)
    if seed_clamp:
        # the seed: exp(−∞) = 0 on truncated edges, which torch's clamp_probs lifts to ε
        p = torch.where(kept, p, torch.full_like(p, _EPS))
    n = uniform.to(dist.dtype).clamp(_EPS, 1 - _EPS)
    z = (torch.log(p) - torch.log1p(-p) + torch.log(n) - torch.log1p(-n)) / temperature  # [B,U,V]
    if seed_clamp:
        # torch.distributions.RelaxedBernoulli: sigmoid clamped to [tiny, 1 − ε], then the seed's log
        return torch.log(torch.sigmoid(z).clamp(_TINY, 1 - _EPS))
    return torch.where(kept, F.logsigmoid(z), torch.full_like(z, float("-inf")))


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
    seed_clamp: bool = False,
    uniform: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Kernel-modulated attention, dense: q [B,H,U,C] · k, v [B,H,V,C] · sig_r [U,S] · sig_s [V,S]
    · bandwidth 0-dim -> o [B,H,U,C].

    temperature=None: deterministic ℓ; a float: relaxed-Bernoulli sample from Philox stream
    ``seed`` (an int or a 0-dim integer tensor; or from ``uniform`` [B,U,V] in (0,1), e.g.
    torch.rand, when given: the seed's own RNG, for benchmarks); threshold=True: the 0/−∞ eval mode. seed_clamp=True reproduces the
    seed's RelaxedBernoulli clamping in sampled mode (truncated edges get a finite log-sample,
    about −32), for bounding the difference to our exact −∞.
    """
    batch, _, receivers, head_dim = q.shape
    senders = k.shape[2]
    if threshold and temperature is not None:
        raise ValueError("graph_attention: threshold=True and temperature are exclusive")
    if temperature is not None:
        if uniform is None:
            if seed is None:
                raise ValueError("graph_attention: temperature is set, so a seed (int) is required")
            uniform = graph_noise(int(seed), batch, receivers, senders)  # an int or a 0-dim int tensor
        bias = graph_sampled_bias(sig_r, sig_s, bandwidth, truncation, temperature, uniform, seed_clamp)  # [B,U,V]
    else:
        bias = graph_log_affinity(sig_r, sig_s, bandwidth, truncation, threshold)[None].expand(batch, -1, -1)
    empty = torch.isneginf(bias).all(dim=-1, keepdim=True)  # [B,U,1]: receivers with no edge
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))  # [B,H,U,V], inputs' dtype
    logits = scores.to(bias.dtype) + bias[:, None]
    logits = torch.where(empty[:, None], torch.zeros_like(logits), logits)
    attn = torch.softmax(logits, dim=-1) * (~empty[:, None]).to(logits.dtype)
    return attn.to(v.dtype) @ v
