"""Triton kernels for NAC kernel-modulated graph attention (DESIGN §2.4), forward and backward.

scores[b,h,u,v] = q[b,h,u]·k[b,h,v]/√C + ℓ_b[u,v],  o[b,h,u] = softmax_v(scores) · v[b,h].

ℓ comes from the signatures: dist = 1 − ŝ_r[u]·ŝ_s[v] (ŝ the unit-normalised signatures),
ℓ = −dist/β where dist ≤ τ (ties kept) and −∞ elsewhere; ``truncation=None`` keeps every pair;
threshold mode uses 0 where additionally dist/β ≤ ln 2. In sampled mode ℓ_b is the log of a
relaxed-Bernoulli sample drawn in-kernel with ``tl.rand(seed, (b*U+u)*V+v)`` (the shared noise
definition of the project), the same for all heads, recomputed identically in the backward.

What is precomputed (:func:`prepare_graph`, plain torch on the device, no host sync): the [U,V]
matrix of ℓ (batch- and head-independent: U·V·4 bytes, 2.9 MB at ImageNet shapes, L2-resident)
and, per block of receivers, the compacted list of sender blocks holding at least one edge (and
the transposed lists for the dk/dv pass). The B·U·V bias and the sample are never stored.
Kernels walk only the listed tiles, so the work scales with the number of non-empty tiles.

Backward: ``_bwd_dq_kernel`` (per receiver block; dq, and the signature/bandwidth contractions
Σ_v g[u,v]·ŝ_s[v] and Σ g·ℓ) and ``_bwd_dkdv_kernel`` (per sender block; dk, dv and
Σ_u g[u,v]·ŝ_r[u]), with g = dL/dℓ[u,v] = Σ_h dS·∂ℓ_b/∂ℓ. A program may loop over several heads
of one batch element (``heads_per_program``) so the partial contractions it writes are per
batch element instead of per (batch, head); they are summed in torch (deterministic, no atomics).

Launchers only; no autograd here (see m2mkd_fast.triton_backend.graph).
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

_FP32_EPS = float(torch.finfo(torch.float32).eps)
_LOG2E = 1.4426950408889634
_LN2 = math.log(2.0)


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    # Block sizes are chosen by the launcher (the tile lists depend on them); the autotuner only
    # picks warps and pipeline depth. One config under the interpreter (no benchmarking there).
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


_TUNE_KEY = ["HEAD_DIM", "SIG_DIM", "BLOCK_U", "BLOCK_V", "SAMPLE", "DOT_F32", "DOT_PREC"]


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; DOT_F32 casts operands to fp32 (the interpreter's
    bf16 dot is broken; the fp32 products of bf16 values are exact, as on the tensor core)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _relaxed_bernoulli(ell, kept, offs, seed, inv_t, EPS: tl.constexpr):
    """Log relaxed-Bernoulli sample ℓ_b and its derivative ∂ℓ_b/∂ℓ (DESIGN §2.4).

    p = clamp(exp ℓ, ε, 1−ε); n = clamp(rand(seed, offs), ε, 1−ε);
    z = (log p − log(1−p) + log n − log(1−n)) / t; ℓ_b = logsigmoid(z).
    ∂ℓ_b/∂ℓ = sigmoid(−z)/(t·(1−p)) where exp ℓ lies inside [ε, 1−ε] (the clamp passes the
    gradient), 0 where it is clamped. Pairs that are not kept give (−∞, 0).
    """
    ell0 = tl.where(kept, ell, 0.0)
    n = tl.rand(seed, offs)
    n = tl.minimum(tl.maximum(n, EPS), 1.0 - EPS)
    e = tl.exp(ell0)
    p = tl.minimum(tl.maximum(e, EPS), 1.0 - EPS)
    z = (tl.log(p) - tl.log(1.0 - p) + tl.log(n) - tl.log(1.0 - n)) * inv_t
    soft = tl.log(1.0 + tl.exp(-tl.abs(z)))  # log1p(exp(−|z|))
    ell_b = tl.where(kept, tl.minimum(z, 0.0) - soft, float("-inf"))
    sig_neg = tl.exp(tl.minimum(-z, 0.0) - soft)  # sigmoid(−z)
    passes = kept & (e >= EPS) & (e <= 1.0 - EPS)
    jac = tl.where(passes, sig_neg * inv_t / (1.0 - p), 0.0)
    return ell_b, jac


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, Vt, O, LSE, ELL, CNT, LST,
    seed, inv_t, qk_scale,
    H, U, V, NVB,
    sqb, sqh, squ, sqc,
    skb, skh, skv, skc,
    svb, svh, svv, svc,
    sob, soh, sou, soc,
    HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr, SIG_DIM: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, EPS: tl.constexpr,
):
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
        if SAMPLE:
            kept = ell > float("-inf")
            offs_n = (b * U + offs_u[:, None]) * V + offs_v[None, :]
            ell, _jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
        s = qk * qk_scale + ell * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_F32, DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_u[:, None] * sou + offs_c[None, :] * soc, o.to(O.dtype.element_ty),
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
    """delta[b,h,u] = Σ_c dO·O (fp32)."""
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


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, Vt, DO, DQ, LSE, DELTA, ELL, CNT, LST, SS, RR, DB,
    seed, inv_t, qk_scale, sm_scale,
    H, HPP, U, V, NUB, NVB,
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
    RR[g,u,:] = Σ_{h,v} g·ŝ_s[v] and DB[g, u-block] = Σ_{h,u,v} g·ℓ[u,v] (g = dL/dℓ)."""
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
            if SAMPLE:
                offs_n = (b * U + offs_u[:, None]) * V + offs_v[None, :]
                ell_b, jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
            else:
                ell_b = ell
            qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
            p = tl.math.exp2(qk * qk_scale + ell_b * LOG2E - lse[:, None])
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_U, BLOCK_V], tl.float32), DOT_F32, DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, DOT_F32, DOT_PREC)
            if SIG_GRAD:
                if SAMPLE:
                    g = tl.where(kept, ds * jac, 0.0)
                else:
                    g = tl.where(kept, ds, 0.0)
                ss = tl.load(SS + offs_v[:, None] * SIG_DIM + offs_s[None, :],
                             mask=mask_v[:, None] & (offs_s < SIG_DIM)[None, :], other=0.0)
                rr = tl.dot(g, ss, rr, input_precision=SIG_PREC)
                db += tl.sum(g * tl.where(kept, ell, 0.0), 1)
        dq = dq * sm_scale
        tl.store(DQ + b * sgb + h * sgh + offs_u[:, None] * sgu + offs_c[None, :] * sgc, dq.to(DQ.dtype.element_ty),
                 mask=mask_uc)
    if SIG_GRAD:
        tl.store(RR + (pid_g * U + offs_u[:, None]) * SIG_DIM + offs_s[None, :], rr,
                 mask=mask_u[:, None] & (offs_s < SIG_DIM)[None, :])
        tl.store(DB + pid_g * NUB + pid_u, tl.sum(db, 0))


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, Vt, DO, DK, DV, LSE, DELTA, ELL, CNT, LST, SR, RS,
    seed, inv_t, qk_scale, sm_scale,
    H, HPP, U, V, NUB,
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
            if SAMPLE:
                offs_n = (b * U + offs_u[None, :]) * V + offs_v[:, None]
                ell_b, jac = _relaxed_bernoulli(ell, kept, offs_n, seed, inv_t, EPS)
            else:
                ell_b = ell
            kq = _dot(k, tl.trans(q), tl.zeros([BLOCK_V, BLOCK_U], tl.float32), DOT_F32, DOT_PREC)
            pt = tl.math.exp2(kq * qk_scale + ell_b * LOG2E - lse[None, :])
            dv = _dot(pt.to(do.dtype), do, dv, DOT_F32, DOT_PREC)
            dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_V, BLOCK_U], tl.float32), DOT_F32, DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = _dot(dst.to(q.dtype), q, dk, DOT_F32, DOT_PREC)
            if SIG_GRAD:
                if SAMPLE:
                    g = tl.where(kept, dst * jac, 0.0)
                else:
                    g = tl.where(kept, dst, 0.0)
                sr = tl.load(SR + offs_u[:, None] * SIG_DIM + offs_s[None, :],
                             mask=mask_u[:, None] & (offs_s < SIG_DIM)[None, :], other=0.0)
                rs = tl.dot(g, sr, rs, input_precision=SIG_PREC)
        dk = dk * sm_scale
        tl.store(DK + b * skgb + h * skgh + offs_v[:, None] * skgv + offs_c[None, :] * skgc, dk.to(DK.dtype.element_ty),
                 mask=mask_vc)
        tl.store(DV + b * svgb + h * svgh + offs_v[:, None] * svgv + offs_c[None, :] * svgc, dv.to(DV.dtype.element_ty),
                 mask=mask_vc)
    if SIG_GRAD:
        tl.store(RS + (pid_g * V + offs_v[:, None]) * SIG_DIM + offs_s[None, :], rs,
                 mask=mask_v[:, None] & (offs_s < SIG_DIM)[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


class GraphPlan(NamedTuple):
    """Everything the kernels need about the graph, computed on the device without host sync."""

    ell: torch.Tensor  # [U, V] fp32: ℓ on kept pairs (0 in threshold mode), −inf elsewhere
    cnt_u: torch.Tensor  # [NUB] int32: number of non-empty tiles in each receiver block row
    lst_u: torch.Tensor  # [NUB, NVB] int32: their sender-block indices first, ascending
    cnt_v: torch.Tensor  # [NVB] int32
    lst_v: torch.Tensor  # [NVB, NUB] int32
    block_u: int
    block_v: int


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def default_blocks(head_dim: int, dtype: torch.dtype, U: int, V: int) -> tuple[int, int]:
    """Receiver/sender block sizes for the kernels (fixed per shape: the tile lists need them)."""
    if interpreting():
        return 16, 16
    if dtype == torch.float32:
        bu, bv = 32, 32
    elif head_dim >= 128:
        bu, bv = 64, 32
    else:
        bu, bv = 64, 64
    return min(bu, _pow2_at_least_16(U)), min(bv, _pow2_at_least_16(V))


def cosine_distance(sig_r_hat: torch.Tensor, sig_s_hat: torch.Tensor) -> torch.Tensor:
    """dist[u,v] = 1 − ŝ_r[u]·ŝ_s[v] in fp32 (exact fp32 matmul, no TF32)."""
    return 1.0 - torch.mm(sig_r_hat.float(), sig_s_hat.float().t())


def log_affinity(sig_r_hat, sig_s_hat, bandwidth, truncation: Optional[float], threshold: bool) -> torch.Tensor:
    """ℓ[u,v] as the kernels use it: −dist/β on kept pairs (0 in threshold mode), −inf elsewhere."""
    dist = cosine_distance(sig_r_hat, sig_s_hat)
    beta = bandwidth.detach().float()
    ell = -dist / beta
    keep = None if truncation is None else dist <= truncation
    if threshold:
        near = (dist / beta) <= _LN2
        keep = near if keep is None else keep & near
        ell = torch.zeros_like(ell)
    if keep is None:
        return ell
    return torch.where(keep, ell, torch.full_like(ell, float("-inf")))


def _block_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of block flags: count of set flags and their column indices first, ascending."""
    cnt = flags.sum(1, dtype=torch.int32)
    order = torch.sort(flags.to(torch.int8), dim=1, descending=True, stable=True).indices.to(torch.int32)
    return cnt.contiguous(), order.contiguous()


def prepare_graph(sig_r_hat, sig_s_hat, bandwidth, truncation, threshold, block_u, block_v) -> GraphPlan:
    """ℓ matrix and the non-empty tile lists for both passes (no host synchronisation)."""
    ell = log_affinity(sig_r_hat, sig_s_hat, bandwidth, truncation, threshold).contiguous()
    U, V = ell.shape
    nub, nvb = triton.cdiv(U, block_u), triton.cdiv(V, block_v)
    kept = torch.zeros((nub * block_u, nvb * block_v), dtype=torch.bool, device=ell.device)
    kept[:U, :V] = ell > float("-inf")
    flags = kept.view(nub, block_u, nvb, block_v).any(dim=3).any(dim=1)
    cnt_u, lst_u = _block_lists(flags)
    cnt_v, lst_v = _block_lists(flags.t())
    return GraphPlan(ell, cnt_u, lst_u, cnt_v, lst_v, block_u, block_v)


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(cast dot operands to fp32, precision of q/k/v dots, precision of the signature dots)."""
    if interpreting():
        return True, "ieee", "ieee"
    if dtype == torch.float32:
        return False, "ieee", "ieee"
    return False, "tf32", "tf32"


def forward(q, k, v, plan: GraphPlan, temperature: Optional[float], seed: Optional[int]):
    """o [B,H,U,C] (dtype of q) and lse [B,H,U] (fp32, base 2; 0 for rows without an edge)."""
    B, H, U, C = q.shape
    V = k.shape[2]
    o = torch.empty((B, H, U, C), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, U), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        lse.zero_()
        return o, lse
    sample = temperature is not None
    dot_f32, prec, _ = _dot_flags(q.dtype)
    bu, bv = plan.block_u, plan.block_v
    sm_scale = 1.0 / math.sqrt(C)
    grid = (triton.cdiv(U, bu), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, plan.ell, plan.cnt_u, plan.lst_u,
        int(seed or 0), 1.0 / temperature if sample else 1.0, sm_scale * _LOG2E,
        H, U, V, plan.lst_u.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        HEAD_DIM=C, C_PAD=_pow2_at_least_16(C), SIG_DIM=1,
        BLOCK_U=bu, BLOCK_V=bv, SAMPLE=sample, DOT_F32=dot_f32, DOT_PREC=prec, EPS=_FP32_EPS,
    )
    return o, lse


def default_heads_per_program(B: int, H: int, n_blocks: int) -> int:
    """Loop over all heads inside one program (partials per batch element, not per head) when
    there are enough programs to fill the device anyway; one head per program otherwise."""
    if interpreting():
        return H
    return H if B * n_blocks >= 512 else 1


def backward(do, q, k, v, o, lse, plan: GraphPlan, sig_r_hat, sig_s_hat, temperature, seed,
             sig_grad: bool, heads_per_program: Optional[int] = None):
    """(dq, dk, dv, rr [U,S], rs [V,S], db []) with rr = Σ_{b,h,v} g·ŝ_s, rs = Σ_{b,h,u} g·ŝ_r,
    db = Σ g·ℓ over all pairs, g = dL/dℓ[u,v] (zeros when not sig_grad)."""
    B, H, U, C = q.shape
    V = k.shape[2]
    S = sig_r_hat.shape[1]
    dev = q.device
    dq = torch.empty((B, H, U, C), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, V, C), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, V, C), dtype=v.dtype, device=dev)
    bu, bv = plan.block_u, plan.block_v
    nub, nvb = triton.cdiv(U, bu), triton.cdiv(V, bv)
    if B * H == 0 or U == 0 or V == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        z = torch.zeros((), dtype=torch.float32, device=dev)
        return dq, dk, dv, sig_r_hat.new_zeros((U, S)), sig_s_hat.new_zeros((V, S)), z
    hpp = heads_per_program or default_heads_per_program(B, H, min(nub, nvb))
    if H % hpp:
        raise ValueError(f"heads_per_program={hpp} must divide H={H}")
    groups = B * (H // hpp)
    sample = temperature is not None
    dot_f32, prec, sig_prec = _dot_flags(q.dtype)
    sm_scale = 1.0 / math.sqrt(C)
    c_pad, s_pad = _pow2_at_least_16(C), _pow2_at_least_16(S)
    inv_t = 1.0 / temperature if sample else 1.0
    sr = sig_r_hat.float().contiguous()
    ss = sig_s_hat.float().contiguous()

    delta = torch.empty((B, H, U), dtype=torch.float32, device=dev)
    _bwd_delta_kernel[(nub, B * H)](
        o, do, delta, H, U, *o.stride(), *do.stride(),
        HEAD_DIM=C, C_PAD=c_pad, BLOCK_U=bu,
    )
    if sig_grad:
        rr = torch.empty((groups, U, S), dtype=torch.float32, device=dev)
        rs = torch.empty((groups, V, S), dtype=torch.float32, device=dev)
        db = torch.empty((groups, nub), dtype=torch.float32, device=dev)
    else:
        rr = rs = db = torch.empty(1, dtype=torch.float32, device=dev)
    common = dict(HEAD_DIM=C, C_PAD=c_pad, SIG_DIM=S, S_PAD=s_pad, BLOCK_U=bu, BLOCK_V=bv, SAMPLE=sample,
                  SIG_GRAD=sig_grad, DOT_F32=dot_f32, DOT_PREC=prec, SIG_PREC=sig_prec, EPS=_FP32_EPS)
    _bwd_dq_kernel[(nub, groups)](
        q, k, v, do, dq, lse, delta, plan.ell, plan.cnt_u, plan.lst_u, ss, rr, db,
        int(seed or 0), inv_t, sm_scale * _LOG2E, sm_scale,
        H, hpp, U, V, nub, nvb,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        **common,
    )
    _bwd_dkdv_kernel[(nvb, groups)](
        q, k, v, do, dk, dv, lse, delta, plan.ell, plan.cnt_v, plan.lst_v, sr, rs,
        int(seed or 0), inv_t, sm_scale * _LOG2E, sm_scale,
        H, hpp, U, V, nub,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        **common,
    )
    if sig_grad:
        return dq, dk, dv, rr.sum(0), rs.sum(0), db.sum()
    z = torch.zeros((), dtype=torch.float32, device=dev)
    return dq, dk, dv, sig_r_hat.new_zeros((U, S)), sig_s_hat.new_zeros((V, S)), z
