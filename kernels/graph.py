"""Triton kernels for NAC kernel-modulated graph attention (docs/design.md §2.4), forward and backward.

scores[b,h,u,v] = q[b,h,u]·k[b,h,v]/√C + ℓ_b[u,v],  o[b,h,u] = softmax_v(scores) · v[b,h].

ℓ comes from the signatures: dist = 1 − ŝ_r[u]·ŝ_s[v] (ŝ the unit-normalised signatures),
ℓ = −dist/β where dist ≤ τ (ties kept) and −∞ elsewhere; ``truncation=None`` keeps every pair;
threshold mode uses 0 where additionally dist/β ≤ ln 2. In sampled mode ℓ_b is the log of a
relaxed-Bernoulli sample drawn with ``tl.rand(seed, (b*U+u)*V+v)`` (the shared noise definition
of the project), the same for all heads, recomputed identically in the backward. It costs ~190
instructions per pair (Philox-10 and libdevice logs), far more than the pair's share of the
matmuls, so by default it is drawn once per (b, u, v) and pass by :func:`sample` into a
transient [B,U,V] buffer that the attention kernels read for every head (``SAMPLE_CACHE``;
``sample_cache=False`` draws it inside each (batch, head) program instead: H× the work, no
buffer).

What is precomputed, in plain torch on the device without host synchronisation: the [U,V]
matrix of ℓ (:func:`log_affinity`; batch- and head-independent, U·V·4 bytes = 2.9 MB at
ImageNet shapes, L2-resident, so the cosine is computed once instead of once per (batch, head)
tile) and, per block of receivers, the compacted list of sender blocks holding at least one
edge, with the transposed lists for the dk/dv pass (:func:`tile_lists`). The B·U·V bias and
the sample are never stored. Kernels walk only the listed tiles: the work scales with the
number of non-empty tiles (for random signatures at density 0.2 that is every tile; graph
priors leave tiles empty when neighbours share blocks).

Backward: ``_bwd_dq_kernel`` (per receiver block; dq, and the signature/bandwidth contractions
Σ_v g[u,v]·ŝ_s[v] and Σ g·ℓ) and ``_bwd_dkdv_kernel`` (per sender block; dk, dv and
Σ_u g[u,v]·ŝ_r[u]), with g = dL/dℓ[u,v] = Σ_h dS·∂ℓ_b/∂ℓ. A program may loop over several heads
of one batch element (``heads_per_program``) so the partial contractions it writes are per
batch element instead of per (batch, head); they are summed in torch (deterministic, no atomics).

Launchers only; no autograd here (see m2mkd_fast.triton_backend.graph).
"""

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import dot

_FP32_EPS = float(torch.finfo(torch.float32).eps)
_LOG2E = 1.4426950408889634
_LN2 = math.log(2.0)


# Tiles and launch configs per kernel and GPU generation, checked ahead of time (kernels.aot.graph,
# m2mkd_fast.kernels.aot.report): (kind, 16-bit dtype?, head dim > 64?, sample mode) →
# (BLOCK_U, BLOCK_V, num_warps allowed, num_stages allowed). The tensor-core dots need M ≥ 64 for
# wgmma (BLOCK_U in fwd/dq, BLOCK_V in dk/dv); registers bound the rest: the backward holds
# P, dP, dS, the sample and its derivative live beside three accumulators (dq and Σ g·ŝ_s, or
# dk, dv and Σ g·ŝ_r), so its other tile side is 16. sm_80 (mma.sync keeps operand fragments in
# registers) needs fewer configs than sm_90a: _TILES_SM80 overrides _TILES there; e.g. the
# sampled backward with head dim 64 runs unpipelined (num_stages=1) on sm_80, and with head dim
# 128 on half-height tiles (mma.sync needs M ≥ 16 only): the only spill-free choices.
_TILES = {
    ("fwd", True, False, 0): (64, 64, (4, 8), (2, 3)),
    ("fwd", True, False, 1): (64, 32, (4, 8), (2, 3)),
    ("fwd", True, True, 0): (64, 64, (4, 8), (2, 3)),
    ("fwd", True, True, 1): (64, 32, (4, 8), (2, 3)),
    ("dq", True, False, 0): (64, 16, (4, 8), (2, 3)),
    ("dq", True, False, 1): (64, 16, (4, 8), (1, 2)),
    ("dq", True, True, 0): (64, 16, (8,), (2, 3)),
    ("dq", True, True, 1): (64, 16, (8,), (2,)),
    ("dkdv", True, False, 0): (32, 64, (8,), (2, 3)),
    ("dkdv", True, False, 1): (16, 64, (8,), (1, 2)),
    ("dkdv", True, True, 0): (16, 64, (8,), (2,)),
    ("dkdv", True, True, 1): (16, 64, (8,), (2,)),
    ("fwd", True, False, 2): (64, 64, (4, 8), (2, 3)),
    ("fwd", True, True, 2): (64, 32, (8,), (2, 3)),
    ("dq", True, False, 2): (64, 16, (8,), (2, 3)),
    ("dq", True, True, 2): (64, 16, (8,), (2, 3)),
    ("dkdv", True, False, 2): (16, 64, (8,), (2, 3)),
    ("dkdv", True, True, 2): (16, 64, (8,), (2, 3)),
    # fp32 inputs: exact fp32 dots on the FMA units, small tiles
    ("fwd", False, False, 0): (32, 16, (4, 8), (2, 3)),
    ("fwd", False, False, 1): (32, 16, (4, 8), (2, 3)),
    ("fwd", False, True, 0): (32, 16, (8,), (2, 3)),
    ("fwd", False, True, 1): (32, 16, (8,), (2, 3)),
    ("dq", False, False, 0): (16, 16, (4, 8), (2, 3)),
    ("dq", False, False, 1): (16, 16, (4, 8), (2, 3)),
    ("dq", False, True, 0): (16, 16, (4, 8), (2, 3)),
    ("dq", False, True, 1): (16, 16, (4,), (2, 3)),
    ("dkdv", False, False, 0): (16, 16, (4,), (2, 3)),
    ("dkdv", False, False, 1): (16, 16, (8,), (2,)),
    ("dkdv", False, True, 0): (16, 16, (4,), (2, 3)),
    ("dkdv", False, True, 1): (16, 16, (4,), (2, 3)),
    ("fwd", False, False, 2): (32, 16, (4, 8), (2, 3)),
    ("fwd", False, True, 2): (32, 16, (8,), (2, 3)),
    ("dq", False, False, 2): (16, 16, (4, 8), (2, 3)),
    ("dq", False, True, 2): (16, 16, (4,), (2, 3)),
    ("dkdv", False, False, 2): (16, 16, (8,), (2, 3)),
    ("dkdv", False, True, 2): (16, 16, (4,), (2, 3)),
}
_TILES_SM80 = {
    ("dq", True, False, 0): (64, 16, (4,), (2, 3)),
    ("dq", True, False, 1): (64, 16, (8,), (1,)),
    ("dq", True, True, 1): (32, 16, (8,), (2, 3)),
    ("dkdv", True, False, 1): (16, 64, (8,), (1,)),
    ("dkdv", True, True, 0): (16, 32, (8,), (2, 3)),
    ("dkdv", True, True, 1): (16, 32, (8,), (2, 3)),
    ("fwd", True, False, 2): (64, 64, (8,), (2, 3)),
    ("dq", True, False, 2): (64, 16, (8,), (1,)),
    ("dq", True, True, 2): (32, 16, (8,), (2, 3)),
    ("dkdv", True, False, 2): (16, 64, (8,), (1, 3)),
    ("dkdv", True, True, 2): (16, 32, (8,), (2, 3)),
}
ARCHS = (90, 80)  # sm_90a first: the quick report checks the first spec per kernel and dtype


def _arch(device) -> int:
    """90 for Hopper and newer (the sm_90a tables), 80 otherwise."""
    if interpreting() or torch.device(device).type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _tile_entry(kind: str, dtype_is_16bit: bool, c_pad: int, mode: int, arch: int = 90):
    """mode: 0 deterministic/threshold, 1 sampled in the kernel, 2 sample read from the cache."""
    key = (kind, dtype_is_16bit, c_pad > 64, int(mode))
    return (_TILES_SM80.get(key) if arch < 90 else None) or _TILES[key]


def _configs():
    # Block sizes are chosen by the launcher (the tile lists depend on them); the autotuner only
    # picks warps and pipeline depth among those _TILES allows. One config under the interpreter.
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2, 3)]


def _keep_config(kind: str, num_warps: int, num_stages: int, meta: dict) -> bool:
    """Whether the autotuner may try (num_warps, num_stages) for kernel ``kind`` (see _TILES)."""
    if interpreting():
        return True
    arch = _arch(meta["Q"].device)
    _, _, warps, stages = _tile_entry(kind, meta["DOT_PREC"] != "ieee", meta["C_PAD"], meta["SAMPLE"], arch)
    return num_warps in warps and num_stages in stages


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        kept = [c for c in configs if _keep_config(kind, c.num_warps, c.num_stages, meta)]
        return kept or configs[-1:]

    return {"early_config_prune": prune}


_TUNE_KEY = ["HEAD_DIM", "SIG_DIM", "BLOCK_U", "BLOCK_V", "SAMPLE", "DOT_F32", "DOT_PREC"]


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even also under the interpreter, whose fp32 → bf16
    conversion truncates (a GPU rounds to nearest): the interpreted bf16 path then makes the
    errors the GPU makes."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _relaxed_bernoulli(ell, kept, offs, seed, inv_t, EPS: tl.constexpr):
    """Log relaxed-Bernoulli sample ℓ_b and its derivative ∂ℓ_b/∂ℓ (docs/design.md §2.4).

    p = clamp(exp ℓ, ε, 1−ε); n = clamp(rand(seed, offs), ε, 1−ε);
    z = (logit p + logit n) / t; ℓ_b = logsigmoid(z);
    ∂ℓ_b/∂ℓ = sigmoid(−z)/(t·(1−p)) where exp ℓ lies in [ε, 1−ε] (the clamp passes the gradient
    there), 0 where it is clamped. Pairs that are not kept give (−∞, 0).
    Where p is not clamped, log p = ℓ and 1 − p = −expm1(ℓ) (Kahan's (e−1)·ℓ/log e), exact
    even for p near 1, i.e. for close signatures, where 1 − exp(ℓ) would cancel.
    """
    ell0 = tl.where(kept, ell, 0.0)
    n = tl.rand(seed, offs)
    n = tl.minimum(tl.maximum(n, EPS), 1.0 - EPS)
    e = tl.exp(ell0)
    passes = kept & (e >= EPS) & (e <= 1.0 - EPS)
    p = tl.minimum(tl.maximum(e, EPS), 1.0 - EPS)
    log_e = tl.log(tl.where(passes, e, 0.5))
    one_minus_p = tl.where(passes, (1.0 - e) * ell0 / log_e, 1.0 - p)
    log_p = tl.where(passes, ell0, tl.log(p))
    z = (log_p + tl.log(n / ((1.0 - n) * one_minus_p))) * inv_t
    soft = tl.log(1.0 + tl.exp(-tl.abs(z)))  # log1p(exp(−|z|))
    ell_b = tl.where(kept, tl.minimum(z, 0.0) - soft, float("-inf"))
    sig_neg = tl.exp(tl.minimum(-z, 0.0) - soft)  # sigmoid(−z)
    jac = tl.where(passes, sig_neg * inv_t / one_minus_p, 0.0)
    return ell_b, jac


# --------------------------------------------------------------------------------------------
# the sample, once per (b, u, v)
# --------------------------------------------------------------------------------------------


@triton.jit
def _sample_kernel(
    ELL, CNT, LST, LB, JAC,
    seed, inv_t, U, V, NVB, B0,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, NEED_JAC: tl.constexpr, EPS: tl.constexpr,
):
    """LB[b,u,v] = ℓ_b (and JAC = ∂ℓ_b/∂ℓ) on the non-empty tiles of one receiver block of batch
    element b. The sample is the same for every head: drawing it here once instead of in each
    (batch, head) program divides its cost (~190 instructions per pair: Philox-10 and the
    transcendental functions) by H. Kept pairs lie in listed tiles, so every one is written;
    readers mask their loads with the kept pattern and never read the rest. Batch element b of
    the buffers is b + B0 of the batch (the noise stream's index)."""
    pid_u = tl.program_id(0)
    b = tl.program_id(1)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    mask_u = offs_u < U
    n_tiles = tl.load(CNT + pid_u)
    for i in range(n_tiles):
        vb = tl.load(LST + pid_u * NVB + i)
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = mask_u[:, None] & (offs_v < V)[None, :]
        ell = tl.load(ELL + offs_u[:, None] * V + offs_v[None, :], mask=mask, other=float("-inf"))
        offs_n = (b * U + offs_u[:, None]) * V + offs_v[None, :]
        ell_b, jac = _relaxed_bernoulli(ell, ell > float("-inf"), offs_n + B0 * U * V, seed, inv_t, EPS)
        tl.store(LB + offs_n, ell_b, mask=mask)
        if NEED_JAC:
            tl.store(JAC + offs_n, jac, mask=mask)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit
def _fwd_kernel(
    Q, K, Vt, O, LSE, ELL, CNT, LST, LB,
    seed, inv_t, qk_scale,
    H, U, V, NVB, B0,
    sqb, sqh, squ, sqc,
    skb, skh, skv, skc,
    svb, svh, svv, svc,
    sob, soh, sou, soc,
    HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, SIG_DIM: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, EPS: tl.constexpr,
):
    """o and lse (base 2) for one receiver block of one (batch, head), walking the non-empty
    tiles of its row of tiles with an online softmax. SAMPLE: 0 scores use ℓ; 1 draw the
    relaxed-Bernoulli sample here; 2 read it from LB [B,U,V] (written by _sample_kernel)."""
    pid_u = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_c = tl.arange(0, C_PAD)
    mask_u = offs_u < U
    mask_c = offs_c < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_u[:, None] * squ + offs_c[None, :] * sqc,
                mask=mask_u[:, None] & mask_c[None, :], other=0.0)

    m_i = tl.full([BLOCK_U], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_U], tl.float32)
    acc = tl.zeros([BLOCK_U, C_PAD], tl.float32)
    n_tiles = tl.load(CNT + pid_u)
    for i in range(n_tiles):
        vb = tl.load(LST + pid_u * NVB + i)
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        kv_mask = mask_v[:, None] & mask_c[None, :]
        k = tl.load(K + b * skb + h * skh + offs_v[:, None] * skv + offs_c[None, :] * skc, mask=kv_mask, other=0.0)
        v = tl.load(Vt + b * svb + h * svh + offs_v[:, None] * svv + offs_c[None, :] * svc, mask=kv_mask, other=0.0)
        ell = tl.load(ELL + offs_u[:, None] * V + offs_v[None, :],
                      mask=mask_u[:, None] & mask_v[None, :], other=float("-inf"))
        if SAMPLE == 1:
            kept = ell > float("-inf")
            offs_n = ((b + B0) * U + offs_u[:, None]) * V + offs_v[None, :]
            ell, _jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
        elif SAMPLE == 2:
            ell = tl.load(LB + (b * U + offs_u[:, None]) * V + offs_v[None, :], mask=ell > float("-inf"),
                          other=float("-inf"))
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
        s = qk * qk_scale + ell * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = dot(_cast(p, v.dtype, DOT_F32), v, acc, DOT_F32, DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_u[:, None] * sou + offs_c[None, :] * soc, _cast(o, O.dtype.element_ty, DOT_F32),
             mask=mask_u[:, None] & mask_c[None, :])
    tl.store(LSE + pid_bh * U + offs_u, lse, mask=mask_u)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, H, U,
    sob, soh, sou, soc,
    sdb, sdh, sdu, sdc,
    HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """delta[b,h,u] = Σ_c dO·O (fp32; O as stored, in its dtype)."""
    pid_u = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_c = tl.arange(0, C_PAD)
    mask = (offs_u < U)[:, None] & (offs_c < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_u[:, None] * sou + offs_c[None, :] * soc, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_u[:, None] * sdu + offs_c[None, :] * sdc, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * U + offs_u, delta, mask=offs_u < U)


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_pruner("dq"))
@triton.jit
def _bwd_dq_kernel(
    Q, K, Vt, DO, DQ, LSE, DELTA, ELL, CNT, LST, SS, RR, DB, LB, JAC,
    seed, inv_t, qk_scale, sm_scale,
    H, HPP, U, V, NUB, NVB, B0,
    sqb, sqh, squ, sqc,
    skb, skh, skv, skc,
    svb, svh, svv, svc,
    sdb, sdh, sdu, sdc,
    sgb, sgh, sgu, sgc,
    HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, SIG_DIM: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr, SIG_GRAD: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, SIG_PREC: tl.constexpr, EPS: tl.constexpr,
):
    """dq for one receiver block and heads [h0, h0+HPP) of one batch element; with SIG_GRAD also
    RR[g,u,:] = Σ_{h,v} g·ŝ_s[v] and DB[g, u-block] = Σ_{h,u,v} g·ℓ[u,v] (g = dL/dℓ).

    dS uses DELTA = Σ dO·O with O as stored (rounded to its dtype), as FlashAttention does. The
    exact delta Σ_v P·dP is accumulated on the way and written back to DELTA for the dk/dv
    kernel (launched after this one), and DB, a sum over every edge in which the rounding of O
    would not average out, is corrected to it: DB += (DELTA − Σ_v P·dP)·Σ_v P·w·ℓ."""
    pid_u = tl.program_id(0)
    pid_g = tl.program_id(1)  # (b, head group)
    n_groups = H // HPP
    b = pid_g // n_groups
    h0 = (pid_g % n_groups) * HPP
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_c = tl.arange(0, C_PAD)
    offs_s = tl.arange(0, S_PAD)
    mask_u = offs_u < U
    mask_c = offs_c < HEAD_DIM
    mask_uc = mask_u[:, None] & mask_c[None, :]
    n_tiles = tl.load(CNT + pid_u)

    rr = tl.zeros([BLOCK_U, S_PAD], tl.float32)
    db = tl.zeros([BLOCK_U], tl.float32)
    for h in range(h0, h0 + HPP):
        q = tl.load(Q + b * sqb + h * sqh + offs_u[:, None] * squ + offs_c[None, :] * sqc, mask=mask_uc, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_u[:, None] * sdu + offs_c[None, :] * sdc, mask=mask_uc, other=0.0)
        lse = tl.load(LSE + (b * H + h) * U + offs_u, mask=mask_u, other=0.0)
        delta = tl.load(DELTA + (b * H + h) * U + offs_u, mask=mask_u, other=0.0)
        dq = tl.zeros([BLOCK_U, C_PAD], tl.float32)
        p_dp = tl.zeros([BLOCK_U], tl.float32)  # Σ_v P·dP: the exact delta
        p_wl = tl.zeros([BLOCK_U], tl.float32)  # Σ_v P·w·ℓ, w = ∂ℓ_b/∂ℓ
        for i in range(n_tiles):
            vb = tl.load(LST + pid_u * NVB + i)
            offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            kv_mask = mask_v[:, None] & mask_c[None, :]
            k = tl.load(K + b * skb + h * skh + offs_v[:, None] * skv + offs_c[None, :] * skc, mask=kv_mask, other=0.0)
            v = tl.load(Vt + b * svb + h * svh + offs_v[:, None] * svv + offs_c[None, :] * svc, mask=kv_mask, other=0.0)
            ell = tl.load(ELL + offs_u[:, None] * V + offs_v[None, :],
                          mask=mask_u[:, None] & mask_v[None, :], other=float("-inf"))
            kept = ell > float("-inf")
            if SAMPLE == 1:
                offs_n = ((b + B0) * U + offs_u[:, None]) * V + offs_v[None, :]
                ell_b, jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
            elif SAMPLE == 2:
                offs_n = (b * U + offs_u[:, None]) * V + offs_v[None, :]
                ell_b = tl.load(LB + offs_n, mask=kept, other=float("-inf"))
                jac = tl.load(JAC + offs_n, mask=kept, other=0.0)
            else:
                ell_b = ell
            qk = dot(q, tl.trans(k), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
            p = tl.math.exp2(qk * qk_scale + ell_b * LOG2E - lse[:, None])
            dp = dot(do, tl.trans(v), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = dot(_cast(ds, k.dtype, DOT_F32), k, dq, DOT_F32, DOT_PREC)
            if SIG_GRAD:
                if SAMPLE:
                    g = tl.where(kept, ds * jac, 0.0)
                    wl = jac * tl.where(kept, ell, 0.0)  # jac = 0 where not kept
                else:
                    g = tl.where(kept, ds, 0.0)
                    wl = tl.where(kept, ell, 0.0)
                ss = tl.load(SS + offs_v[:, None] * SIG_DIM + offs_s[None, :],
                             mask=mask_v[:, None] & (offs_s < SIG_DIM)[None, :], other=0.0)
                rr = tl.dot(g, ss, rr, input_precision=SIG_PREC)
                db += tl.sum(ds * wl, 1)
                p_wl += tl.sum(p * wl, 1)
            p_dp += tl.sum(p * dp, 1)
        if SIG_GRAD:
            db += (delta - p_dp) * p_wl
        tl.store(DELTA + (b * H + h) * U + offs_u, p_dp, mask=mask_u)
        dq = dq * sm_scale
        tl.store(DQ + b * sgb + h * sgh + offs_u[:, None] * sgu + offs_c[None, :] * sgc, _cast(dq, DQ.dtype.element_ty, DOT_F32),
                 mask=mask_uc)
    if SIG_GRAD:
        tl.store(RR + (pid_g * U + offs_u[:, None]) * SIG_DIM + offs_s[None, :], rr,
                 mask=mask_u[:, None] & (offs_s < SIG_DIM)[None, :])
        tl.store(DB + pid_g * NUB + pid_u, tl.sum(db, 0))


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_pruner("dkdv"))
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, Vt, DO, DK, DV, LSE, DELTA, ELL, CNT, LST, SR, RS, LB, JAC,
    seed, inv_t, qk_scale, sm_scale,
    H, HPP, U, V, NUB, B0,
    sqb, sqh, squ, sqc,
    skb, skh, skv, skc,
    svb, svh, svv, svc,
    sdb, sdh, sdu, sdc,
    skgb, skgh, skgv, skgc,
    svgb, svgh, svgv, svgc,
    HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, SIG_DIM: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr, SIG_GRAD: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, SIG_PREC: tl.constexpr, EPS: tl.constexpr,
):
    """dk, dv for one sender block and heads [h0, h0+HPP) of one batch element; with SIG_GRAD
    also RS[g,v,:] = Σ_{h,u} g·ŝ_r[u]. Works on transposed tiles [BLOCK_V, BLOCK_U]."""
    pid_v = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_groups = H // HPP
    b = pid_g // n_groups
    h0 = (pid_g % n_groups) * HPP
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, C_PAD)
    offs_s = tl.arange(0, S_PAD)
    mask_v = offs_v < V
    mask_c = offs_c < HEAD_DIM
    mask_vc = mask_v[:, None] & mask_c[None, :]
    n_tiles = tl.load(CNT + pid_v)

    rs = tl.zeros([BLOCK_V, S_PAD], tl.float32)
    for h in range(h0, h0 + HPP):
        k = tl.load(K + b * skb + h * skh + offs_v[:, None] * skv + offs_c[None, :] * skc, mask=mask_vc, other=0.0)
        v = tl.load(Vt + b * svb + h * svh + offs_v[:, None] * svv + offs_c[None, :] * svc, mask=mask_vc, other=0.0)
        dk = tl.zeros([BLOCK_V, C_PAD], tl.float32)
        dv = tl.zeros([BLOCK_V, C_PAD], tl.float32)
        for i in range(n_tiles):
            ub = tl.load(LST + pid_v * NUB + i)
            offs_u = ub * BLOCK_U + tl.arange(0, BLOCK_U)
            mask_u = offs_u < U
            qmask = mask_u[:, None] & mask_c[None, :]
            q = tl.load(Q + b * sqb + h * sqh + offs_u[:, None] * squ + offs_c[None, :] * sqc, mask=qmask, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_u[:, None] * sdu + offs_c[None, :] * sdc, mask=qmask, other=0.0)
            lse = tl.load(LSE + (b * H + h) * U + offs_u, mask=mask_u, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * U + offs_u, mask=mask_u, other=0.0)
            ell = tl.load(ELL + offs_u[None, :] * V + offs_v[:, None],
                          mask=mask_v[:, None] & mask_u[None, :], other=float("-inf"))  # [BV, BU]
            kept = ell > float("-inf")
            if SAMPLE == 1:
                offs_n = ((b + B0) * U + offs_u[None, :]) * V + offs_v[:, None]
                ell_b, jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
            elif SAMPLE == 2:
                offs_n = (b * U + offs_u[None, :]) * V + offs_v[:, None]
                ell_b = tl.load(LB + offs_n, mask=kept, other=float("-inf"))
                jac = tl.load(JAC + offs_n, mask=kept, other=0.0)
            else:
                ell_b = ell
            kq = dot(k, tl.trans(q), tl.zeros([BLOCK_V, BLOCK_U], tl.float32), DOT_F32, DOT_PREC)
            pt = tl.math.exp2(kq * qk_scale + ell_b * LOG2E - lse[None, :])
            dv = dot(_cast(pt, do.dtype, DOT_F32), do, dv, DOT_F32, DOT_PREC)
            dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_V, BLOCK_U], tl.float32), DOT_F32, DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = dot(_cast(dst, q.dtype, DOT_F32), q, dk, DOT_F32, DOT_PREC)
            if SIG_GRAD:
                if SAMPLE:
                    g = tl.where(kept, dst * jac, 0.0)
                else:
                    g = tl.where(kept, dst, 0.0)
                sr = tl.load(SR + offs_u[:, None] * SIG_DIM + offs_s[None, :],
                             mask=mask_u[:, None] & (offs_s < SIG_DIM)[None, :], other=0.0)
                rs = tl.dot(g, sr, rs, input_precision=SIG_PREC)
        dk = dk * sm_scale
        tl.store(DK + b * skgb + h * skgh + offs_v[:, None] * skgv + offs_c[None, :] * skgc, _cast(dk, DK.dtype.element_ty, DOT_F32),
                 mask=mask_vc)
        tl.store(DV + b * svgb + h * svgh + offs_v[:, None] * svgv + offs_c[None, :] * svgc, _cast(dv, DV.dtype.element_ty, DOT_F32),
                 mask=mask_vc)
    if SIG_GRAD:
        tl.store(RS + (pid_g * V + offs_v[:, None]) * SIG_DIM + offs_s[None, :], rs,
                 mask=mask_v[:, None] & (offs_s < SIG_DIM)[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


class TileLists(NamedTuple):
    """Non-empty (receiver block, sender block) tiles, computed on the device without host sync."""

    block_u: int
    block_v: int
    cnt_u: torch.Tensor  # [NUB] int32: number of non-empty tiles in each receiver-block row
    lst_u: torch.Tensor  # [NUB, NVB] int32: their sender-block indices first, ascending
    cnt_v: torch.Tensor  # [NVB] int32: the same per sender-block column
    lst_v: torch.Tensor  # [NVB, NUB] int32


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocator of every kernel output (tests replace it to poison the buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def default_blocks(kind: str, head_dim: int, dtype: torch.dtype, U: int, V: int, mode: int = 0,
                   interpret: Optional[bool] = None, arch: int = 90):
    """(BLOCK_U, BLOCK_V) of kernel ``kind`` ("fwd", "dq" or "dkdv"): the tiles it walks (_TILES;
    32×32 under the interpreter, whose cost is per operation), no larger than the problem."""
    if interpreting() if interpret is None else interpret:
        bu, bv = 32, 32
    else:
        bu, bv, _, _ = _tile_entry(kind, dtype != torch.float32, _pow2_at_least_16(head_dim), mode, arch)
    return min(bu, _pow2_at_least_16(U)), min(bv, _pow2_at_least_16(V))


def cosine_distance(sig_r_hat: torch.Tensor, sig_s_hat: torch.Tensor) -> torch.Tensor:
    """dist[u,v] = 1 − ŝ_r[u]·ŝ_s[v] in fp32 (ŝ unit-normalised; plain fp32 matmul)."""
    return 1 - sig_r_hat.float() @ sig_s_hat.float().t()


def log_affinity(sig_r_hat, sig_s_hat, bandwidth, truncation: Optional[float], threshold: bool) -> torch.Tensor:
    """ℓ [U,V] fp32 as the kernels read it: −dist/β on kept pairs (dist ≤ truncation, ties kept;
    truncation None keeps all), −inf elsewhere; threshold mode: 0 where kept and dist/β ≤ ln 2."""
    with torch.no_grad():
        dist = cosine_distance(sig_r_hat, sig_s_hat)
        beta = bandwidth.detach().to(dist.dtype)
        kept = torch.ones_like(dist, dtype=torch.bool) if truncation is None else dist <= truncation
        if threshold:
            near = kept & (dist / beta <= _LN2)
            return torch.zeros_like(dist).masked_fill(~near, float("-inf")).contiguous()
        return torch.where(kept, -(dist / beta), torch.full_like(dist, float("-inf"))).contiguous()


def _block_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of block flags: number of set flags, and their column indices first (ascending)."""
    cnt = flags.sum(1, dtype=torch.int32)
    order = torch.sort(flags.to(torch.int32), dim=1, descending=True, stable=True).indices.to(torch.int32)
    return cnt.contiguous(), order.contiguous()


def tile_lists(ell: torch.Tensor, block_u: int, block_v: int) -> TileLists:
    """The non-empty tiles of ℓ for blocks of block_u receivers × block_v senders."""
    U, V = ell.shape
    nub, nvb = triton.cdiv(U, block_u), triton.cdiv(V, block_v)
    kept = torch.zeros((nub * block_u, nvb * block_v), dtype=torch.bool, device=ell.device)
    kept[:U, :V] = ell > float("-inf")
    flags = kept.view(nub, block_u, nvb, block_v).any(dim=3).any(dim=1)
    cnt_u, lst_u = _block_lists(flags)
    cnt_v, lst_v = _block_lists(flags.t())
    return TileLists(block_u, block_v, cnt_u, lst_u, cnt_v, lst_v)


def _dot_flags(dtype: torch.dtype, interpret: Optional[bool] = None) -> tuple[bool, str, str]:
    """(cast dot operands to fp32, precision of the q/k/v dots, precision of the signature dots).

    The interpreter's bf16 dot is broken (docs/design.md §6): there operands go to fp32. fp32 inputs get
    exact fp32 dots ("ieee", as torch's fp32 matmul); bf16/fp16 inputs use the tensor cores, and
    TF32 for the fp32 signature contraction of the backward.
    """
    if interpreting() if interpret is None else interpret:
        return True, "ieee", "ieee"
    if dtype == torch.float32:
        return False, "ieee", "ieee"
    return False, "tf32", "tf32"


def _check_launch(blocks, q, k, programs_y: int):
    if blocks is not None:
        for blk in blocks:
            if blk < 16 or blk & (blk - 1):
                raise ValueError(f"graph attention blocks must be powers of two >= 16, got {blocks}")
    if programs_y > 65535:
        raise ValueError(f"graph attention: B·H = {programs_y} programs exceed the grid limit 65535")
    if max(q.numel(), k.numel()) >= 2**31:
        raise ValueError("graph attention: q, k, v must have fewer than 2**31 elements (int32 offsets)")


SAMPLE_CACHE = True  # default of the sample_cache arguments below
SAMPLE_CACHE_BYTES = 128 << 20  # the batch is processed in chunks whose sample fits this
SAMPLE_TILE = None  # tiles of _sample_kernel; None: 32×64, 8 warps (spill-free on sm_80/sm_90a)


def _sample_mode(temperature: Optional[float], sample_cache: Optional[bool]) -> int:
    if temperature is None:
        return 0
    return 2 if (SAMPLE_CACHE if sample_cache is None else sample_cache) else 1


def _batch_chunks(B: int, U: int, V: int, mode: int, bytes_per_pair: int) -> list:
    """[(b0, b1)]: the whole batch, or, with the sample cache, chunks whose cache fits
    SAMPLE_CACHE_BYTES (the full cache is B·U·V·8 bytes in the backward: 377 MB at ImageNet
    B=64; chunks of 21 keep it to 124 MB)."""
    if mode != 2:
        return [(0, B)]
    step = max(1, min(B, SAMPLE_CACHE_BYTES // max(1, U * V * bytes_per_pair)))
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def sample(ell, B: int, temperature: float, seed: int, need_jac: bool, blocks: Optional[tuple[int, int]] = None,
           b0: int = 0):
    """(ℓ_b, ∂ℓ_b/∂ℓ or None) [B,U,V] fp32 on the kept pairs of ell (other entries unset): the
    relaxed-Bernoulli sample of batch elements b0 … b0+B−1, drawn once per (b, u, v) for all
    heads. A transient of the pass that uses it, never kept for the backward."""
    U, V = ell.shape
    bu, bv = blocks or SAMPLE_TILE or (32, 64)
    tiles = tile_lists(ell, bu, bv)
    lb = _empty((B, U, V), torch.float32, ell.device)
    jac = _empty((B, U, V), torch.float32, ell.device) if need_jac else None
    if B > 65535:
        raise ValueError(f"graph attention: B = {B} exceeds the grid limit 65535")
    _sample_kernel[(triton.cdiv(U, bu), B)](
        ell, tiles.cnt_u, tiles.lst_u, lb, jac if need_jac else lb,
        int(seed), 1.0 / temperature, U, V, tiles.lst_u.shape[1], b0,
        BLOCK_U=bu, BLOCK_V=bv, NEED_JAC=need_jac, EPS=_FP32_EPS, num_warps=4 if interpreting() else 8, num_stages=3,
    )
    return lb, jac


def forward(q, k, v, ell, temperature: Optional[float], seed: int, blocks: Optional[tuple[int, int]] = None,
            sample_cache: Optional[bool] = None):
    """(o [B,H,U,C] in q's dtype, lse [B,H,U] fp32, base 2, 0 on rows without an edge).

    q [B,H,U,C] · k, v [B,H,V,C] (any strides) · ell [U,V] fp32 from :func:`log_affinity`;
    temperature None: scores use ℓ; a float: the relaxed-Bernoulli sample of stream ``seed``,
    drawn once per (b, u, v) into a transient (:func:`sample`; batch chunks of at most
    SAMPLE_CACHE_BYTES) when sample_cache (default SAMPLE_CACHE), else in every (batch, head)
    program.
    """
    B, H, U, C = q.shape
    V = k.shape[2]
    o = _empty((B, H, U, C), q.dtype, q.device)
    lse = _empty((B, H, U), torch.float32, q.device)
    if B * H * U == 0:
        return o, lse
    if V == 0 or C == 0:
        return o.zero_(), lse.zero_()
    _check_launch(blocks, q, k, B * H)
    mode = _sample_mode(temperature, sample_cache)
    bu, bv = blocks or default_blocks("fwd", C, q.dtype, U, V, mode, arch=_arch(q.device))
    tiles = tile_lists(ell, bu, bv)
    dot_f32, prec, _ = _dot_flags(q.dtype)
    sm_scale = 1.0 / math.sqrt(C)
    for b0, b1 in _batch_chunks(B, U, V, mode, 4):
        lb = sample(ell, b1 - b0, temperature, seed, False, b0=b0)[0] if mode == 2 else ell
        qc, kc, vc, oc = q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1]
        _fwd_kernel[(triton.cdiv(U, bu), (b1 - b0) * H)](
            qc, kc, vc, oc, lse[b0:b1], ell, tiles.cnt_u, tiles.lst_u, lb,
            int(seed), 1.0 / temperature if mode else 1.0, sm_scale * _LOG2E,
            H, U, V, tiles.lst_u.shape[1], b0,
            *qc.stride(), *kc.stride(), *vc.stride(), *oc.stride(),
            HEAD_DIM=C, C_PAD=_pow2_at_least_16(C), SIG_DIM=1, BLOCK_U=bu, BLOCK_V=bv,
            SAMPLE=mode, DOT_F32=dot_f32, DOT_PREC=prec, EPS=_FP32_EPS,
        )
        del lb
    return o, lse


def default_heads_per_program(B: int, H: int, n_blocks: int, device=None) -> int:
    """Heads one backward program loops over: all of them (partial signature gradients per batch
    element rather than per (batch, head): H× less to write and sum; 12.5 MB instead of 100 MB
    at ImageNet shapes) when B·blocks programs still give every SM two waves, else one."""
    if interpreting():
        return H
    sms = 132
    if device is not None and torch.device(device).type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return H if B * n_blocks >= 2 * sms else 1


def backward(do, q, k, v, o, lse, ell, sig_r_hat, sig_s_hat, temperature: Optional[float], seed: int,
             sig_grad: bool, blocks: Optional[tuple[int, int]] = None, heads_per_program: Optional[int] = None,
             sample_cache: Optional[bool] = None):
    """(dq, dk, dv, rr [U,S], rs [V,S], db 0-dim), all fp32 but dq/dk/dv (inputs' dtypes), with
    g[u,v] = dL/dℓ[u,v] (summed over batch and heads; through the sample in sampled mode):
    rr = Σ_v g·ŝ_s[v], rs = Σ_u g·ŝ_r[u], db = Σ_{u,v} g·ℓ. Zeros for those when not sig_grad."""
    B, H, U, C = q.shape
    V = k.shape[2]
    S = sig_r_hat.shape[1]
    dev = q.device
    dq = _empty((B, H, U, C), q.dtype, dev)
    dk = _empty((B, H, V, C), k.dtype, dev)
    dv = _empty((B, H, V, C), v.dtype, dev)
    zeros = (torch.zeros((U, S), dtype=torch.float32, device=dev), torch.zeros((V, S), dtype=torch.float32, device=dev),
             torch.zeros((), dtype=torch.float32, device=dev))
    if B * H == 0 or U == 0 or V == 0 or C == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_()) + zeros
    _check_launch(blocks, q, k, B * H)
    arch = _arch(dev)
    mode = _sample_mode(temperature, sample_cache)
    bu_q, bv_q = blocks or default_blocks("dq", C, q.dtype, U, V, mode, arch=arch)
    bu_k, bv_k = blocks or default_blocks("dkdv", C, q.dtype, U, V, mode, arch=arch)
    tiles_q = tile_lists(ell, bu_q, bv_q)
    tiles_k = tiles_q if (bu_k, bv_k) == (bu_q, bv_q) else tile_lists(ell, bu_k, bv_k)
    nub_q, nvb_q = triton.cdiv(U, bu_q), triton.cdiv(V, bv_q)
    nub_k, nvb_k = triton.cdiv(U, bu_k), triton.cdiv(V, bv_k)
    dot_f32, prec, sig_prec = _dot_flags(q.dtype)
    sm_scale = 1.0 / math.sqrt(C)
    c_pad, s_pad = _pow2_at_least_16(C), _pow2_at_least_16(S)
    inv_t = 1.0 / temperature if mode else 1.0
    sr = sig_r_hat.float().contiguous()
    ss = sig_s_hat.float().contiguous()

    delta = _empty((B, H, U), torch.float32, dev)
    bu_d = min(64, _pow2_at_least_16(U))
    _bwd_delta_kernel[(triton.cdiv(U, bu_d), B * H)](
        o, do, delta, H, U, *o.stride(), *do.stride(),
        HEAD_DIM=C, C_PAD=c_pad, BLOCK_U=bu_d,
    )
    common = dict(HEAD_DIM=C, C_PAD=c_pad, SIG_DIM=S, S_PAD=s_pad, SAMPLE=mode, SIG_GRAD=sig_grad,
                  DOT_F32=dot_f32, DOT_PREC=prec, SIG_PREC=sig_prec, EPS=_FP32_EPS)
    rr_sum, rs_sum, db_sum = zeros
    for b0, b1 in _batch_chunks(B, U, V, mode, 8):
        bc = b1 - b0
        hpp = heads_per_program or default_heads_per_program(bc, H, min(nub_q, nvb_k), dev)
        if H % hpp:
            raise ValueError(f"heads_per_program={hpp} must divide H={H}")
        groups = bc * (H // hpp)
        if mode == 2:
            lb, jac = sample(ell, bc, temperature, seed, True, b0=b0)
        else:
            lb = jac = ell
        if sig_grad:
            rr = _empty((groups, U, S), torch.float32, dev)
            rs = _empty((groups, V, S), torch.float32, dev)
            db = _empty((groups, nub_q), torch.float32, dev)
        else:
            rr = rs = db = torch.empty(1, dtype=torch.float32, device=dev)
        qc, kc, vc, doc = q[b0:b1], k[b0:b1], v[b0:b1], do[b0:b1]
        dqc, dkc, dvc, lsec, deltac = dq[b0:b1], dk[b0:b1], dv[b0:b1], lse[b0:b1], delta[b0:b1]
        _bwd_dq_kernel[(nub_q, groups)](
            qc, kc, vc, doc, dqc, lsec, deltac, ell, tiles_q.cnt_u, tiles_q.lst_u, ss, rr, db, lb, jac,
            int(seed), inv_t, sm_scale * _LOG2E, sm_scale,
            H, hpp, U, V, nub_q, nvb_q, b0,
            *qc.stride(), *kc.stride(), *vc.stride(), *doc.stride(), *dqc.stride(),
            BLOCK_U=bu_q, BLOCK_V=bv_q, **common,
        )
        _bwd_dkdv_kernel[(nvb_k, groups)](
            qc, kc, vc, doc, dkc, dvc, lsec, deltac, ell, tiles_k.cnt_v, tiles_k.lst_v, sr, rs, lb, jac,
            int(seed), inv_t, sm_scale * _LOG2E, sm_scale,
            H, hpp, U, V, nub_k, b0,
            *qc.stride(), *kc.stride(), *vc.stride(), *doc.stride(), *dkc.stride(), *dvc.stride(),
            BLOCK_U=bu_k, BLOCK_V=bv_k, **common,
        )
        del lb, jac
        if sig_grad:
            rr_sum, rs_sum, db_sum = rr_sum + rr.sum(0), rs_sum + rs.sum(0), db_sum + db.sum()
    return dq, dk, dv, rr_sum, rs_sum, db_sum
