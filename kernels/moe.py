"""Triton kernels for the padding-free grouped expert MLP of V-MoE (docs/design.md §2.1), forward and
backward. Kernels and launchers only: no autograd here (see m2mkd_fast.triton_backend.moe).

    y[t] = Σ_j kept(t,j) · w[t,j] · (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]),  e = expert[t,j]

The kept (token, choice) pairs are sorted by expert with a stable counting sort
(``routing.dispatch_indices``): row r = 0..P_kept-1 of the grouped GEMMs is pair
``pair_of_row[r]`` (token pair // k), expert e owns rows offsets[e]..offsets[e+1]-1. Tokens are
never copied into per-expert buffers: the gather is fused into the first GEMM's loads.

Forward (P = T·k, an upper bound of the kept pairs; no host synchronisation anywhere):
  ``_moe_fc1_kernel``     Z[r] = x[tok(r)] @ w1[e] + b1[e], A[r] = act(Z[r])  (gather in the loads,
                          bias + GELU in the epilogue; Z only stored when a backward will need it)
  ``_moe_fill_tail_kernel`` zeros the rows past the kept pairs (nothing to do when dropless)
  ``_moe_scatter_kernel`` Yp[pair(r)] = w[pair] · (A[r] @ w2[e] + b2[e])   (bias and routing weight
                          in the epilogue, stored at the pair's own row: no collisions, no atomics)
  ``_moe_combine_kernel`` y[t] = Σ_j Yp[t·k + j] over kept j, in j order
Backward:
  ``_moe_dz_kernel``      G[r] = dy[tok(r)] @ w2[e]ᵀ;  dZ[r] = w · G[r] ⊙ act'(Z[r]);  and the
                          per-32-column partial sums of G[r] ⊙ A[r] for the routing-weight grad
  ``_moe_pair_grad_kernel`` per pair: dw[pair] = Σ partials + dy[t]·b2[e]  (= dy[t]·(A[r] @ w2[e]
                          + b2[e])), and DYW[r] = w · dy[t] (the scaled, expert-sorted dy for dw2)
  ``_moe_scatter_kernel`` dXp[pair(r)] = dZ[r] @ w1[e]ᵀ, then ``_moe_combine_kernel`` → dx
  ``_moe_wgrad_kernel``   dw1[e] = Σ_r x[tok(r)]ᵀ dZ[r];  dw2[e] = Σ_r A[r]ᵀ DYW[r]
                          (one program per (expert, output tile), looping over the expert's rows;
                          an expert without rows writes zeros)
  ``_moe_bias_grad_kernel`` db1[e] = Σ_r dZ[r];  db2[e] = Σ_r DYW[r]
Every reduction has a fixed order: results are bitwise deterministic run to run, and no fp32
atomics are used.

Grids are upper bounds: the row-GEMMs launch (cdiv(P, BLOCK_M) + E) row tiles × column tiles
(Σ_e cdiv(n_e, BLOCK_M) ≤ cdiv(Σ n_e, BLOCK_M) + E); each program finds its expert and first
row from the device-side offsets and returns at once when it has none. Program ids are 1-D with
the column tile fastest, so the programs sharing a row tile run together and its gathered rows
stay in L2.

Dot operands are the input dtype (bf16/fp16 → tensor cores; fp32 → "ieee" precision unless
torch allows TF32); accumulation is fp32. Under TRITON_INTERPRET=1 the launchers set DOT_FP32
(bf16 ``tl.dot`` is broken in the interpreter) and BF16_RTNE (the interpreter truncates fp32 →
bf16 casts; see ``routing.round_to``). Intermediates Z, A, dZ and the per-pair outputs are
stored in the input dtype, as a framework MLP stores its activations.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import device_function, round_to
from .routing import dispatch_indices

_ACT = {"none": 0, "tanh": 1}  # GELU approximation (as F.gelu's approximate) -> the kernels' ACT
_PART = 32  # column granularity of the routing-weight gradient's partial sums


# --------------------------------------------------------------------------------------------
# autotune configurations: explicit and small. Under the interpreter one small config, so tests
# on tiny shapes still see several row tiles per expert, ragged edges and multi-step K loops.
# --------------------------------------------------------------------------------------------
def _gemm_cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _tensor_core_tiles():
    """The 16-bit tiles of the GEMM-like kernels (fc1, fc2, dX and the weight gradients)."""
    return [
        _gemm_cfg(128, 128, 64, 8, 3),
        _gemm_cfg(128, 64, 64, 4, 4),
        _gemm_cfg(64, 128, 64, 4, 4),
        _gemm_cfg(64, 64, 64, 4, 3),
        _gemm_cfg(128, 128, 32, 8, 3),
        _gemm_cfg(64, 64, 32, 4, 4),
    ]


# Per kernel family and operand width; every GPU config was compiled for sm_80 and sm_90a with the
# wheel's ptxas and none spills (see m2mkd_fast.kernels.aot.moe and m2mkd_fast.kernels.aot.report). fp32 operands use
# "ieee" dots (FMA, no tensor cores) unless torch allows TF32: small tiles, else they spill.
if interpreting():
    _CONFIGS = {
        "gemm": {"16bit": [_gemm_cfg(32, 32, 16, 1, 1)], "fp32": []},
        "dz": {"16bit": [_gemm_cfg(32, 32, 16, 1, 1)], "fp32": []},
        "wgrad": {"16bit": [_gemm_cfg(32, 32, 32, 1, 1)], "fp32": []},
    }
else:
    _CONFIGS = {
        # fc1, fc2 and dX (row tiles × output columns, BLOCK_K over the reduction)
        "gemm": {
            "16bit": _tensor_core_tiles(),
            "fp32": [_gemm_cfg(32, 64, 32, 4, 3), _gemm_cfg(32, 32, 32, 4, 3)],
        },
        # dZ: its epilogue (Z, A, act', partial sums) needs more registers: 8 warps for 128-wide tiles
        "dz": {
            "16bit": [
                _gemm_cfg(128, 64, 64, 8, 3),
                _gemm_cfg(64, 128, 64, 8, 3),
                _gemm_cfg(64, 64, 64, 4, 3),
                _gemm_cfg(64, 64, 32, 4, 4),
            ],
            "fp32": [_gemm_cfg(32, 64, 32, 4, 3), _gemm_cfg(32, 32, 32, 4, 3)],
        },
        # weight gradients: BLOCK_M × BLOCK_N is the expert's output tile, BLOCK_K the rows per step
        "wgrad": {
            "16bit": _tensor_core_tiles(),
            "fp32": [_gemm_cfg(64, 64, 16, 4, 3), _gemm_cfg(32, 64, 32, 4, 3), _gemm_cfg(32, 32, 32, 4, 3)],
        },
    }
_FP32_CONFIG_IDS = {id(c) for fam in _CONFIGS.values() for c in fam["fp32"]}


def configs(family: str, operand_bytes: Optional[int] = None) -> list:
    """The autotune configs of a kernel family ("gemm", "dz", "wgrad"); with operand_bytes, only
    those for that dot-operand width (4: fp32, else 16-bit)."""
    fam = _CONFIGS[family]
    if operand_bytes is None:
        return fam["16bit"] + fam["fp32"]
    return fam["fp32"] if operand_bytes == 4 else fam["16bit"]


def _prune(configs, named_args, **kwargs):
    if interpreting():
        return configs
    args = {**named_args, **kwargs}
    operand = next(args[n] for n in ("X", "SRC", "DY", "L") if n in args)
    wide = operand.element_size() == 4
    keep = [c for c in configs if (id(c) in _FP32_CONFIG_IDS) == wide]
    return keep or configs[-1:]


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
@device_function
def _expert_tile(OFFSETS, pid_m, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of row tile ``pid_m``; expert == E: no tile (grid slack)."""
    ex = tl.arange(0, E_P2)
    em = ex < E
    lo = tl.load(OFFSETS + ex, mask=em, other=0)
    hi = tl.load(OFFSETS + ex + 1, mask=em, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(tiles, axis=0) <= pid_m).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(ex < e, tiles, 0), axis=0)
    valid = e < E
    row0 = tl.load(OFFSETS + e, mask=valid, other=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.load(OFFSETS + e + 1, mask=valid, other=0)
    return e, row0, row_end


@device_function
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:  # tanh approximation: 0.5·z·(1 + tanh(u)) = z·sigmoid(2u)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z / (1.0 + tl.exp(-2.0 * u))


@device_function
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return s + z * s * (1.0 - s) * 2.0 * du


# --------------------------------------------------------------------------------------------
# row GEMMs
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=configs("gemm"), key=["K", "N", "P_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _moe_fc1_kernel(
    X, W, BIAS, Z, A, PAIR_OF_ROW, OFFSETS,
    K, N, E, P_HINT,
    stride_xt, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    TOPK: tl.constexpr, E_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    ACT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z[r, :] = x[tok(r)] @ W[e] + b[e];  A[r, :] = act(Z[r, :])   (K = d, N = h)."""
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % n_tiles
    e, row0, row_end = _expert_tile(OFFSETS, pid // n_tiles, E, E_P2, BLOCK_M)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        tok = (tl.load(PAIR_OF_ROW + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_ptr = X + tok[:, None] * stride_xt
        b_ptr = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            a = tl.load(a_ptr + kk[None, :] * stride_xk, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_wk, mask=km[:, None] & cmask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + e.to(tl.int64) * stride_be + cols * stride_bn, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out = rows.to(tl.int64)[:, None] * N + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        if SAVE_Z:
            tl.store(Z + out, round_to(acc, Z.dtype.element_ty, BF16_RTNE), mask=m2)
        tl.store(A + out, round_to(_act_fwd(acc, ACT), A.dtype.element_ty, BF16_RTNE), mask=m2)


@triton.jit
def _moe_fill_tail_kernel(
    Z, A, PAIR_OF_ROW, OFFSETS, P, N, E,
    SAVE_Z: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows offsets[E]..P-1 (the dropped pairs' share of the T·k upper bound) hold no pair: set
    them to 0 (Z, A) and −1 (pair_of_row) so no output of the op is uninitialised memory. A
    program whose rows are all in use (every program when nothing is dropped) returns at once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    used = tl.load(OFFSETS + E)
    tail = (rows >= used) & (rows < P)
    if tl.max(tail.to(tl.int32), axis=0) > 0:
        tl.store(PAIR_OF_ROW + rows, tl.full((BLOCK_T,), -1, tl.int32), mask=tail)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            offs = rows[:, None] * N + cols[None, :]
            m2 = tail[:, None] & (cols < N)[None, :]
            zero = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
            tl.store(A + offs, zero.to(A.dtype.element_ty), mask=m2)
            if SAVE_Z:
                tl.store(Z + offs, zero.to(Z.dtype.element_ty), mask=m2)


@triton.autotune(configs=configs("gemm"), key=["K", "N", "P_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _moe_scatter_kernel(
    SRC, W, BIAS, WEIGHT, OUT, PAIR_OF_ROW, OFFSETS,
    K, N, E, P_HINT,
    stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    E_P2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[pair(r), :] = w[pair] · (SRC[r] @ W[e] + b[e])   (SRC [P, K] rows, OUT [P, N] by pair).

    fc2: SRC = A, W = w2 (K = h, N = d), with bias and routing weight.
    dX:  SRC = dZ, W = w1 read transposed (K = h, N = d), neither.
    """
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % n_tiles
    e, row0, row_end = _expert_tile(OFFSETS, pid // n_tiles, E, E_P2, BLOCK_M)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        pair = tl.load(PAIR_OF_ROW + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_ptr = SRC + rows.to(tl.int64)[:, None] * K
        b_ptr = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            a = tl.load(a_ptr + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_wk, mask=km[:, None] & cmask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + e.to(tl.int64) * stride_be + cols * stride_bn, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            # the routing weight, cast to the activations' dtype first (as the oracle does)
            w = tl.load(WEIGHT + pair, mask=rmask, other=0.0)
            w = round_to(w.to(tl.float32), SRC.dtype.element_ty, BF16_RTNE).to(tl.float32)
            acc = acc * w[:, None]
        out = pair[:, None] * N + cols[None, :]
        tl.store(OUT + out, round_to(acc, OUT.dtype.element_ty, BF16_RTNE), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_combine_kernel(
    SRC, ROW_OF_PAIR, OUT, T, N, stride_ot, stride_on,
    TOPK: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[t, :] = Σ_j SRC[t·k + j, :] over the kept choices j, in j order (0 for none)."""
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % n_tiles
    t = (pid // n_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        kept = tl.load(ROW_OF_PAIR + p, mask=tm, other=-1) >= 0
        acc += tl.load(SRC + p[:, None] * N + cols[None, :], mask=kept[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    tl.store(
        OUT + t[:, None] * stride_ot + cols[None, :] * stride_on,
        round_to(acc, OUT.dtype.element_ty, BF16_RTNE), mask=tm[:, None] & cmask[None, :],
    )


@triton.autotune(configs=configs("dz"), key=["K", "N", "P_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _moe_dz_kernel(
    DY, W, WEIGHT, Z, A, DZ, PART, PAIR_OF_ROW, OFFSETS,
    K, N, E, P_HINT, NPART,
    stride_dyt, stride_dyk, stride_we, stride_wk, stride_wn,
    TOPK: tl.constexpr, E_P2: tl.constexpr, ACT: tl.constexpr, NEED_PART: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G = dy[tok(r)] @ w2[e]ᵀ (K = d, N = h; W = w2 read transposed);
    dZ[r] = w · G ⊙ act'(Z[r]);  PART[r, :] = partial sums of G ⊙ A[r] (Σ PART[r] = G[r]·A[r])."""
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % n_tiles
    e, row0, row_end = _expert_tile(OFFSETS, pid // n_tiles, E, E_P2, BLOCK_M)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        pair = tl.load(PAIR_OF_ROW + rows, mask=rmask, other=0)
        tok = (pair // TOPK).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_ptr = DY + tok[:, None] * stride_dyt
        b_ptr = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            a = tl.load(a_ptr + kk[None, :] * stride_dyk, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_wk, mask=km[:, None] & cmask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        w = tl.load(WEIGHT + pair, mask=rmask, other=0.0)
        w = round_to(w.to(tl.float32), Z.dtype.element_ty, BF16_RTNE).to(tl.float32)
        out = rows.to(tl.int64)[:, None] * N + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        z = tl.load(Z + out, mask=m2, other=0.0).to(tl.float32)
        dz = acc * w[:, None] * _act_grad(z, ACT)
        tl.store(DZ + out, round_to(dz, DZ.dtype.element_ty, BF16_RTNE), mask=m2)
        if NEED_PART:
            # Σ_n G ⊙ A over this tile's columns, written to column pid_n of PART; PART has one
            # column per 32 output columns (the smallest BLOCK_N), the others of this tile get 0
            act = tl.load(A + out, mask=m2, other=0.0).to(tl.float32)
            part = tl.sum(acc * act, axis=1)
            sub = tl.arange(0, BLOCK_N // 32)
            pc = pid_n * (BLOCK_N // 32) + sub
            tl.store(
                PART + rows.to(tl.int64)[:, None] * NPART + pc[None, :],
                tl.where(sub[None, :] == 0, part[:, None], 0.0),
                mask=rmask[:, None] & (pc < NPART)[None, :],
            )


@triton.jit
def _moe_pair_grad_kernel(
    PART, ROW_OF_PAIR, EXPERT, WEIGHT, DY, BIAS, DWEIGHT, DYW,
    P, NPART, D,
    stride_dyt, stride_dyd, stride_be, stride_bd,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DWEIGHT: tl.constexpr, NEED_DYW: tl.constexpr,
    BF16_RTNE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per (token, choice) pair p at row r:
    dweight[p] = Σ_c PART[r, c] + dy[t]·b2[e]  (0 for a dropped pair);  DYW[r] = w[p] · dy[t]."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    row = tl.load(ROW_OF_PAIR + p, mask=pm, other=-1)
    kept = row >= 0
    row = row.to(tl.int64)
    t = p // TOPK
    acc = tl.zeros((BLOCK_P,), tl.float32)
    if NEED_DWEIGHT:
        for c0 in range(0, NPART, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            m2 = kept[:, None] & (cc < NPART)[None, :]
            acc += tl.sum(tl.load(PART + row[:, None] * NPART + cc[None, :], mask=m2, other=0.0), axis=1)
    if NEED_DYW or HAS_BIAS:
        e = tl.load(EXPERT + p, mask=kept, other=0)
        w = tl.load(WEIGHT + p, mask=kept, other=0.0)
        w = round_to(w.to(tl.float32), DY.dtype.element_ty, BF16_RTNE).to(tl.float32)
        for d0 in range(0, D, BLOCK_C):
            dd = d0 + tl.arange(0, BLOCK_C)
            m2 = kept[:, None] & (dd < D)[None, :]
            g = tl.load(DY + t[:, None] * stride_dyt + dd[None, :] * stride_dyd, mask=m2, other=0.0).to(tl.float32)
            if NEED_DYW:
                tl.store(DYW + row[:, None] * D + dd[None, :], round_to(g * w[:, None], DYW.dtype.element_ty, BF16_RTNE), mask=m2)
            if HAS_BIAS:
                b = tl.load(BIAS + e[:, None] * stride_be + dd[None, :] * stride_bd, mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(g * b, axis=1)
    if NEED_DWEIGHT:
        acc = tl.where(kept, acc, 0.0)
        tl.store(DWEIGHT + p, round_to(acc, DWEIGHT.dtype.element_ty, BF16_RTNE), mask=pm)


@triton.autotune(configs=configs("wgrad"), key=["M", "N", "P_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _moe_wgrad_kernel(
    L, R, W, PAIR_OF_ROW, OFFSETS,
    M, N, E, P_HINT,
    stride_l0, stride_l1, stride_we, stride_wm, stride_wn,
    TOPK: tl.constexpr, L_GATHER: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W[e] = Σ_{rows r of e} L[r]ᵀ R[r]  ([M, N]; R [P, N] rows in expert order).

    dw1: L = x gathered at token pair // k (M = d), R = dZ (N = h).
    dw2: L = A (M = h), R = w · dy (DYW, N = d).
    """
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    m_tiles = (M + BLOCK_M - 1) // BLOCK_M
    pid_n = pid % n_tiles
    pid_m = (pid // n_tiles) % m_tiles
    e = pid // (n_tiles * m_tiles)
    lo = tl.load(OFFSETS + e)
    hi = tl.load(OFFSETS + e + 1)
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = cm < M
    nm = cn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < hi
        if L_GATHER:
            lrow = (tl.load(PAIR_OF_ROW + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
        else:
            lrow = rows.to(tl.int64)
        lt = tl.load(L + lrow[:, None] * stride_l0 + cm[None, :] * stride_l1, mask=rmask[:, None] & mm[None, :], other=0.0)
        rt = tl.load(R + rows.to(tl.int64)[:, None] * N + cn[None, :], mask=rmask[:, None] & nm[None, :], other=0.0)
        if DOT_FP32:
            lt = lt.to(tl.float32)
            rt = rt.to(tl.float32)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
    tl.store(
        W + e.to(tl.int64) * stride_we + cm[:, None] * stride_wm + cn[None, :] * stride_wn,
        round_to(acc, W.dtype.element_ty, BF16_RTNE), mask=mm[:, None] & nm[None, :],
    )


@triton.jit
def _moe_bias_grad_kernel(
    R, DB, OFFSETS, N, E, stride_be, stride_bn,
    BF16_RTNE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DB[e] = Σ_{rows r of e} R[r]   (db1 from dZ, db2 from w · dy; 0 for an expert without rows)."""
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % n_tiles
    e = pid // n_tiles
    lo = tl.load(OFFSETS + e)
    hi = tl.load(OFFSETS + e + 1)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = cn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        acc += tl.load(R + rows.to(tl.int64)[:, None] * N + cn[None, :], mask=(rows < hi)[:, None] & nm[None, :], other=0.0).to(tl.float32)
    tl.store(DB + e.to(tl.int64) * stride_be + cn * stride_bn, round_to(tl.sum(acc, axis=0), DB.dtype.element_ty, BF16_RTNE), mask=nm)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def rows_hint(P: int) -> int:
    """The autotune key's size class of the T·k rows (the next power of two): a config tuned on
    a few tokens is not reused for a full batch. The kernels do not read it."""
    return triton.next_power_of_2(max(P, 1))


def _dot_settings(dtype: torch.dtype) -> dict:
    interp = interpreting()
    if dtype == torch.float32:
        precision = "tf32" if (not interp and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = "ieee"
    return {"DOT_FP32": interp and dtype != torch.float32, "PRECISION": precision, "BF16_RTNE": interp}


def _combine(src: torch.Tensor, row_of_pair: torch.Tensor, out: torch.Tensor, k: int) -> None:
    T, N = out.shape
    block_t = 32 if interpreting() else 16
    block_n = 32 if interpreting() else min(256, triton.next_power_of_2(N))
    grid = (triton.cdiv(T, block_t) * triton.cdiv(N, block_n),)
    _moe_combine_kernel[grid](
        src, row_of_pair, out, T, N, out.stride(0), out.stride(1),
        TOPK=k, BF16_RTNE=interpreting(), BLOCK_T=block_t, BLOCK_N=block_n,
    )


def _scatter_gemm(src, w, bias, weight, out, pair_of_row, offsets, K, N, strides_w, has_scale, **dot):
    P = out.shape[0]
    E = offsets.shape[0] - 1
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * (triton.cdiv(P, meta["BLOCK_M"]) + E),)  # noqa: E731
    _moe_scatter_kernel[grid](
        src, w, bias if bias is not None else w, weight, out, pair_of_row, offsets,
        K, N, E, rows_hint(P), *strides_w, *(bias.stride() if bias is not None else (0, 0)),
        E_P2=max(2, triton.next_power_of_2(E)), HAS_BIAS=bias is not None, HAS_SCALE=has_scale, **dot,
    )


def moe_forward(
    x: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    slot: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    approximate: str,
    save_for_backward: bool,
):
    """Grouped expert MLP forward.

    x [T, d] · expert, slot [T, k] int64 · weight [T, k] · w1 [E, d, h] · b1 [E, h] | None ·
    w2 [E, h, d] · b2 [E, d] | None · approximate "none" | "tanh" (the GELU) → (y [T, d],
    Z [T·k or 0, h], A [T·k, h], pair_of_row [T·k] int32, row_of_pair [T·k] int32, offsets
    [E+1] int32). Z (the pre-activation) is only computed when ``save_for_backward``.
    """
    T, d = x.shape
    E, _, h = w1.shape
    k = expert.shape[1]
    P = T * k
    dev, dt = x.device, x.dtype
    act = _ACT[approximate]
    expert = expert.contiguous()
    slot = slot.contiguous()
    weight = weight.contiguous()
    pair_of_row, row_of_pair, offsets = dispatch_indices(expert, slot, E)
    y = torch.empty((T, d), dtype=dt, device=dev)
    z = torch.empty((P if save_for_backward else 0, h), dtype=dt, device=dev)
    a = torch.empty((P, h), dtype=dt, device=dev)
    if P == 0:
        return y, z, a, pair_of_row, row_of_pair, offsets
    dot = _dot_settings(dt)
    e_p2 = max(2, triton.next_power_of_2(E))
    grid = lambda meta: (triton.cdiv(h, meta["BLOCK_N"]) * (triton.cdiv(P, meta["BLOCK_M"]) + E),)  # noqa: E731
    _moe_fc1_kernel[grid](
        x, w1, b1 if b1 is not None else w1, z, a, pair_of_row, offsets,
        d, h, E, rows_hint(P), x.stride(0), x.stride(1), *w1.stride(), *(b1.stride() if b1 is not None else (0, 0)),
        TOPK=k, E_P2=e_p2, HAS_BIAS=b1 is not None, SAVE_Z=save_for_backward, ACT=act, **dot,
    )
    block_t = 32 if interpreting() else 64
    _moe_fill_tail_kernel[(triton.cdiv(P, block_t),)](
        z, a, pair_of_row, offsets, P, h, E, SAVE_Z=save_for_backward, BLOCK_T=block_t,
        BLOCK_N=32 if interpreting() else min(128, triton.next_power_of_2(h)),
    )
    y_pairs = torch.empty((P, d), dtype=dt, device=dev)
    _scatter_gemm(a, w2, b2, weight.reshape(-1), y_pairs, pair_of_row, offsets, h, d, w2.stride(), True, **dot)
    _combine(y_pairs, row_of_pair, y, k)
    return y, z, a, pair_of_row, row_of_pair, offsets


def moe_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    z: torch.Tensor,
    a: torch.Tensor,
    pair_of_row: torch.Tensor,
    row_of_pair: torch.Tensor,
    offsets: torch.Tensor,
    approximate: str,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dw1: bool = True,
    need_dw2: bool = True,
):
    """Gradients (dx, dweight, dw1, db1, dw2, db2) of :func:`moe_forward`'s y given dy [T, d].

    A gradient not asked for (or whose input is None) comes back as an empty [0] tensor. Every
    expert gets a gradient; an expert without tokens gets zeros.
    """
    T, d = x.shape
    E, _, h = w1.shape
    k = expert.shape[1]
    P = T * k
    dev, dt = x.device, x.dtype
    act = _ACT[approximate]
    empty = lambda ref: torch.empty((0,), dtype=ref.dtype, device=dev)  # noqa: E731
    dx = torch.empty((T, d), dtype=dt, device=dev) if need_dx else empty(x)
    dweight = torch.empty((T, k), dtype=weight.dtype, device=dev) if need_dweight else empty(weight)
    dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format) if need_dw1 else empty(w1)
    db1 = torch.empty((E, h), dtype=b1.dtype, device=dev) if (need_dw1 and b1 is not None) else empty(w1)
    dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format) if need_dw2 else empty(w2)
    db2 = torch.empty((E, d), dtype=b2.dtype, device=dev) if (need_dw2 and b2 is not None) else empty(w2)
    if P == 0:
        for g in (dw1, db1, dw2, db2):
            g.zero_()
        return dx, dweight, dw1, db1, dw2, db2
    dot = _dot_settings(dt)
    e_p2 = max(2, triton.next_power_of_2(E))
    weight = weight.contiguous().reshape(-1)
    expert = expert.contiguous().reshape(-1)
    npart = triton.cdiv(h, _PART)

    if need_dx or need_dw1 or need_dweight:
        dz = torch.empty((P, h), dtype=dt, device=dev)
        part = torch.empty((P, npart) if need_dweight else (0, npart), dtype=torch.float32, device=dev)
        grid = lambda meta: (triton.cdiv(h, meta["BLOCK_N"]) * (triton.cdiv(P, meta["BLOCK_M"]) + E),)  # noqa: E731
        _moe_dz_kernel[grid](
            dy, w2, weight, z, a, dz, part, pair_of_row, offsets,
            d, h, E, rows_hint(P), npart, dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(2), w2.stride(1),
            TOPK=k, E_P2=e_p2, ACT=act, NEED_PART=need_dweight, **dot,
        )
    dyw = torch.empty((P if need_dw2 else 0, d), dtype=dt, device=dev)
    has_b2 = b2 is not None
    if need_dweight or need_dw2:
        block_p = 32 if interpreting() else 64
        block_c = 32 if interpreting() else 64
        _moe_pair_grad_kernel[(triton.cdiv(P, block_p),)](
            part if need_dweight else dyw, row_of_pair, expert, weight, dy, b2 if has_b2 else dy, dweight, dyw,
            P, npart, d, dy.stride(0), dy.stride(1), *(b2.stride() if has_b2 else (0, 0)),
            TOPK=k, HAS_BIAS=has_b2 and need_dweight, NEED_DWEIGHT=need_dweight, NEED_DYW=need_dw2,
            BF16_RTNE=dot["BF16_RTNE"], BLOCK_P=block_p, BLOCK_C=block_c,
        )
    if need_dx:
        dx_pairs = torch.empty((P, d), dtype=dt, device=dev)
        # dX[pair(r)] = dZ[r] @ w1[e]ᵀ: w1 [E, d, h] read as [E, h(K), d(N)]
        _scatter_gemm(dz, w1, None, weight, dx_pairs, pair_of_row, offsets, h, d,
                      (w1.stride(0), w1.stride(2), w1.stride(1)), False, **dot)
        _combine(dx_pairs, row_of_pair, dx, k)

    def wgrad(lhs, rhs, out, M, N, gather):
        grid = lambda meta: (E * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _moe_wgrad_kernel[grid](
            lhs, rhs, out, pair_of_row, offsets, M, N, E, rows_hint(P), lhs.stride(0), lhs.stride(1), *out.stride(),
            TOPK=k, L_GATHER=gather, **dot,
        )

    def bias_grad(rhs, out, N):
        block_k = 32 if interpreting() else 32
        block_n = 32 if interpreting() else min(128, triton.next_power_of_2(N))
        _moe_bias_grad_kernel[(E * triton.cdiv(N, block_n),)](
            rhs, out, offsets, N, E, out.stride(0), out.stride(1),
            BF16_RTNE=dot["BF16_RTNE"], BLOCK_K=block_k, BLOCK_N=block_n,
        )

    if need_dw1:
        wgrad(x, dz, dw1, d, h, True)
        if b1 is not None:
            bias_grad(dz, db1, h)
    if need_dw2:
        wgrad(a, dyw, dw2, h, d, False)
        if has_b2:
            bias_grad(dyw, db2, d)
    return dx, dweight, dw1, db1, dw2, db2
