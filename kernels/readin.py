"""Triton kernels for NAC read-in attention in folded form (docs/design.md §2.3), forward and backward.

The folded read-in is multi-head attention whose keys AND values are the layer-normed input
tokens x itself, shared by every head, with head dimension Din for scores and outputs:

    S[b, r, n] = scale · Q'[b, r, :] · X[b, n, :]          r = one (latent, head) query row
    O[b, r, :] = Σ_n softmax_n(S[b, r, :]) · X[b, n, :]
    STATS[b, r] = (m, log2 l): the row max of S·log2(e) and log2 of the row's Σ exp2(S·log2 e − m),
                  fp32, saved for the backward (logsumexp_n S = (m + log2 l)·ln 2)

Because K = V = X is the same for every head, the H·U query rows of one batch element form one
long query set of R rows: the kernels see Q' as [B, R, Din] (rows in any order) and X as
[B, N, Din], and every X tile a program loads serves every head of its row block, once as key
and once as value. No atomics anywhere.

Grids (R = H·U rows per batch element, N = V tokens):
  forward   ``_readin_fwd``  : (cdiv(R, BLOCK_M), B)   one program per block of query rows
  backward  ``_readin_bwd_dq``: (cdiv(R, BLOCK_M), B)   dQ' rows; also writes delta = rowsum(dO⊙O)
            ``_readin_bwd_dx``: (cdiv(N, BLOCK_N), B, SPLIT)  dX rows, looping over all R query rows
            (key and value contributions, every head); SPLIT > 1 only when B·cdiv(N, BLOCK_N)
            alone cannot fill the GPU: each split owns a contiguous range of query rows and writes
            an fp32 partial, summed afterwards (a deterministic reduction instead of atomics).
At ImageNet read-in shapes (B=128, H=8, U=192, V=784) the forward grid is 12×128 = 1536
programs for BLOCK_M=128 (24×128 for 64), the dQ grid 24×128 and the dX grid 13×128 = 1664 for
BLOCK_N=64 (25×128 for 32) — all well over the H100's 132 SMs; Triton launches program id 0
fastest, so the programs of one batch element run together and share its X (or its dO/Q' rows)
in L2. Only B·cdiv(R, BLOCK_M) < #SMs (B ≤ 10 at ImageNet shapes) leaves SMs idle in the
forward and dQ' kernels; the dX kernel then splits over rows (above).

Din (1…512) is covered by two power-of-two column pieces DA + DB (din_pieces): 320 = 256 + 64,
256 = 128 + 128, 384 = 256 + 128, 192 = 128 + 64; a Din between two variants pads with masked
columns. Each piece is one tl.dot operand; the fp32 accumulators (BLOCK × Din) are what limits
the tile sizes, so the autotuner only sees configs that ptxas compiled without a spill for the
device's target and Din variant (VERIFIED). Verified today on sm_80 and sm_90a: bf16/fp16 up
to Din 320, fp32 up to Din 96; elsewhere (Din 321…512, fp32 beyond 96, a pre-Ampere GPU)
supported() says no and the op runs on the torch backend.

Backward layout trick: the backward kernels read dO and Q' as ONE [B, 2R, Din] tensor whose
row 2r is dO[r] and row 2r+1 is Q'[r] (built by the launcher). T · Xᵀ for a tile T of 2·BLOCK_M
such rows gives dP and S in one dot (and a 2·BLOCK_M-row tensor-core tile: no warp group
duplicates work at BLOCK_M = 64 with 8 warps), and in the dX kernel dXᵀ += Tᵀ · [P; dS]
(interleaved the same way) adds the value and the key contribution in one dot.

Dot operands are the input dtype (bf16/fp16 → tensor cores, mma on sm_80, wgmma on sm_90a;
fp32 → "ieee" FMA so fp32 results stay fp32-accurate); accumulation is always fp32. Under
TRITON_INTERPRET=1, where bf16 ``tl.dot`` is broken (docs/design.md §6), the launchers set DOT_FP32 so
operands are cast to fp32 first: the same numbers as the tensor core's exact bf16 products with
fp32 accumulation.

This module holds kernels and launchers only: no autograd (see m2mkd_fast.triton_backend.readin).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import dot

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_DIN = 512


# (largest Din, DA, DB): the column pieces each Din range runs with. Two pieces of 128 beat one
# of 256 (ptxas finds no spill-free dQ tile for a single 256 piece on sm_90a, and finds several
# for 128 + 128), so a piece is never wider than 256.
_PIECES = (
    (16, 16, 0), (32, 32, 0), (48, 32, 16), (64, 64, 0), (80, 64, 16), (96, 64, 32), (128, 128, 0),
    (160, 128, 32), (192, 128, 64), (256, 128, 128), (320, 256, 64), (384, 256, 128), (512, 256, 256),
)


def din_pieces(din: int) -> tuple[int, int]:
    """The two power-of-two column pieces (DA, DB) covering Din (DB = 0: one piece), from a
    short list of variants, each checked with ptxas (see VERIFIED): 320 → (256, 64), 256 →
    (128, 128), 384 → (256, 128), 192 → (128, 64), 48 → (32, 16), 8 → (16, 0); a Din between
    two entries pads with masked columns (272 → (256, 64))."""
    if din < 1 or din > MAX_DIN:
        raise ValueError(f"readin kernels: Din must be in [1, {MAX_DIN}], got {din}")
    for largest, da, db in _PIECES:
        if din <= largest:
            return da, db
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Configurations. Candidates per kernel and dtype class, (BLOCK_M, BLOCK_N, num_warps,
# num_stages); VERIFIED lists, per (kernel, target, dtype class, DA, DB), the candidates that
# compile for that GPU target without a single spilled register and within its shared memory,
# with the shared memory they need — produced by `python -m m2mkd_fast.kernels.aot.readin --verify`
# (ptxas -v on the PTX Triton emits for sm_80 / sm_90a). The autotuner only ever sees verified
# configs; a (target, dtype, Din) with none runs on the torch backend instead (supported()).
# Why these shapes: on sm_90 a warp group's wgmma tile is 64 rows, and Triton gives a dot whose
# result feeds another dot all warps along M, so the S tile has BLOCK_M = 64 rows per 4 warps
# (the backward's S/dP tile has 2·BLOCK_M rows: dO and Q' interleaved); the fp32 accumulator,
# BLOCK × Din, is what bounds the rest. Under the interpreter one tiny config, so tests cover
# several tiles and ragged edges on tiny shapes.
# --------------------------------------------------------------------------------------------
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


CANDIDATES = {
    ("fwd", "bf16"): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    ("dq", "bf16"): [(64, 64, 8, 2), (64, 64, 8, 1), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
    ("dx", "bf16"): [(64, 64, 8, 2), (64, 64, 8, 1), (64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2), (32, 32, 4, 1)],
    # fp32 dots are FMA loops ("ieee": fp32-accurate, no tensor cores); they fit registers only
    # in small tiles and small Din (larger Din: the torch backend's cuBLAS fp32 is faster anyway)
    ("fwd", "fp32"): [(32, 32, 4, 1), (16, 16, 4, 1)],
    ("dq", "fp32"): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ("dx", "fp32"): [(16, 32, 4, 1), (16, 16, 4, 1)],
}
VARIANTS = {
    "bf16": [(da, db) for _, da, db in _PIECES],
    "fp32": [(da, db) for largest, da, db in _PIECES if largest <= 128],
}
TARGETS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# (kind, target, dtype class, DA, DB) -> ((BLOCK_M, BLOCK_N, warps, stages, shared bytes), ...)
# generated by `python -m m2mkd_fast.kernels.aot.readin --verify` (Triton 3.8.0); do not edit by hand
VERIFIED = {
    ('dq', 80, 'bf16', 16, 0): ((64, 64, 8, 2, 22528), (64, 64, 8, 1, 22528), (64, 32, 8, 2, 21504), (32, 64, 4, 2, 12288), (32, 32, 4, 2, 11264)),
    ('dq', 80, 'bf16', 32, 0): ((64, 64, 8, 2, 45056), (64, 64, 8, 1, 45056), (64, 32, 8, 2, 26624), (32, 64, 4, 2, 24576), (32, 32, 4, 2, 14336)),
    ('dq', 80, 'bf16', 32, 16): ((64, 64, 8, 2, 34816), (64, 64, 8, 1, 34816), (64, 32, 8, 2, 31744), (32, 64, 4, 2, 20480), (32, 32, 4, 2, 17408)),
    ('dq', 80, 'bf16', 64, 0): ((64, 64, 8, 2, 57344), (64, 64, 8, 1, 57344), (64, 32, 8, 2, 36864), (32, 64, 4, 2, 32768), (32, 32, 4, 2, 20480)),
    ('dq', 80, 'bf16', 64, 16): ((64, 64, 8, 2, 47104), (64, 64, 8, 1, 47104), (64, 32, 8, 2, 41984), (32, 64, 4, 2, 28672), (32, 32, 4, 2, 23552)),
    ('dq', 80, 'bf16', 64, 32): ((64, 64, 8, 2, 45056), (64, 64, 8, 1, 45056), (64, 32, 8, 2, 38912), (32, 64, 4, 2, 28672), (32, 32, 4, 2, 22528)),
    ('dq', 80, 'bf16', 128, 0): ((64, 64, 8, 2, 81920), (64, 64, 8, 1, 81920), (64, 32, 8, 2, 57344), (32, 64, 4, 2, 49152), (32, 32, 4, 2, 32768)),
    ('dq', 80, 'bf16', 128, 32): ((64, 64, 8, 1, 69632), (64, 32, 8, 2, 59392), (32, 64, 4, 2, 45056), (32, 32, 4, 2, 34816)),
    ('dq', 80, 'bf16', 128, 64): ((64, 64, 8, 2, 90112), (64, 32, 8, 2, 69632), (32, 64, 4, 2, 57344), (32, 32, 4, 2, 40960)),
    ('dq', 80, 'bf16', 128, 128): ((64, 64, 8, 2, 114688), (64, 32, 8, 2, 98304), (32, 64, 4, 2, 73728), (32, 32, 4, 2, 57344)),
    ('dq', 80, 'bf16', 256, 64): ((64, 32, 8, 2, 110592), (32, 64, 4, 2, 90112), (32, 32, 4, 2, 65536)),
    ('dq', 80, 'bf16', 256, 128): ((64, 64, 8, 2, 163840), (64, 32, 8, 2, 139264), (32, 64, 4, 2, 106496), (32, 32, 4, 2, 81920)),
    ('dq', 80, 'fp32', 16, 0): ((16, 32, 4, 1, 6144), (16, 16, 4, 1, 4096)),
    ('dq', 80, 'fp32', 32, 0): ((16, 32, 4, 1, 10240), (16, 16, 4, 1, 7168)),
    ('dq', 80, 'fp32', 32, 16): ((16, 32, 4, 1, 14336), (16, 16, 4, 1, 10240)),
    ('dq', 80, 'fp32', 64, 0): ((16, 32, 4, 1, 18432), (16, 16, 4, 1, 13312)),
    ('dq', 80, 'fp32', 64, 16): ((16, 16, 4, 1, 16384),),
    ('dq', 80, 'fp32', 64, 32): ((16, 16, 4, 1, 19456),),
    ('dq', 90, 'bf16', 16, 0): ((64, 64, 8, 2, 24576), (64, 64, 8, 1, 22528), (64, 32, 8, 2, 22528), (32, 64, 4, 2, 12288), (32, 32, 4, 2, 11264)),
    ('dq', 90, 'bf16', 32, 0): ((64, 64, 8, 2, 24576), (64, 64, 8, 1, 20480), (64, 32, 8, 2, 20480), (32, 64, 4, 2, 12288), (32, 32, 4, 2, 10240)),
    ('dq', 90, 'bf16', 32, 16): ((64, 64, 8, 2, 40960), (64, 64, 8, 1, 34816), (64, 32, 8, 2, 34816), (32, 64, 4, 2, 20480), (32, 32, 4, 2, 17408)),
    ('dq', 90, 'bf16', 64, 0): ((64, 64, 8, 2, 49152), (64, 64, 8, 1, 40960), (64, 32, 8, 2, 32768), (32, 64, 4, 2, 24576), (32, 32, 4, 2, 16384)),
    ('dq', 90, 'bf16', 64, 16): ((64, 64, 8, 2, 57344), (64, 64, 8, 1, 47104), (64, 32, 8, 2, 47104), (32, 64, 4, 2, 28672), (32, 32, 4, 2, 23552)),
    ('dq', 90, 'bf16', 64, 32): ((64, 64, 8, 2, 57344), (64, 64, 8, 1, 45056), (64, 32, 8, 2, 45056), (32, 64, 4, 2, 28672), (32, 32, 4, 2, 22528)),
    ('dq', 90, 'bf16', 128, 0): ((64, 64, 8, 2, 81920), (64, 64, 8, 1, 65536), (64, 32, 8, 2, 65536), (32, 64, 4, 2, 40960), (32, 32, 4, 2, 32768)),
    ('dq', 90, 'bf16', 128, 32): ((64, 64, 8, 2, 90112), (64, 64, 8, 1, 69632), (64, 32, 8, 2, 69632), (32, 64, 4, 2, 45056), (32, 32, 4, 2, 34816)),
    ('dq', 90, 'bf16', 128, 64): ((64, 64, 8, 2, 114688), (64, 64, 8, 1, 90112), (64, 32, 8, 2, 81920), (32, 64, 4, 2, 57344), (32, 32, 4, 2, 40960)),
    ('dq', 90, 'bf16', 128, 128): ((64, 64, 8, 2, 147456), (64, 64, 8, 1, 114688), (64, 32, 8, 2, 114688), (32, 64, 4, 2, 73728), (32, 32, 4, 2, 57344)),
    ('dq', 90, 'bf16', 256, 64): ((64, 64, 8, 2, 180224), (64, 64, 8, 1, 139264), (64, 32, 8, 2, 131072), (32, 64, 4, 2, 90112), (32, 32, 4, 2, 65536)),
    ('dq', 90, 'bf16', 256, 128): ((64, 64, 8, 2, 212992), (64, 64, 8, 1, 163840), (64, 32, 8, 2, 163840), (32, 64, 4, 2, 106496), (32, 32, 4, 2, 81920)),
    ('dq', 90, 'fp32', 16, 0): ((16, 32, 4, 1, 6144), (16, 16, 4, 1, 4096)),
    ('dq', 90, 'fp32', 32, 0): ((16, 32, 4, 1, 10240), (16, 16, 4, 1, 7168)),
    ('dq', 90, 'fp32', 32, 16): ((16, 32, 4, 1, 14336), (16, 16, 4, 1, 10240)),
    ('dq', 90, 'fp32', 64, 0): ((16, 32, 4, 1, 18432), (16, 16, 4, 1, 13312)),
    ('dq', 90, 'fp32', 64, 16): ((16, 16, 4, 1, 16384),),
    ('dq', 90, 'fp32', 64, 32): ((16, 16, 4, 1, 19456),),
    ('dx', 80, 'bf16', 16, 0): ((64, 64, 8, 2, 35584), (64, 64, 8, 1, 34816), (64, 32, 8, 2, 18176), (64, 32, 8, 1, 17408), (32, 32, 4, 2, 9600), (32, 32, 4, 1, 9216)),
    ('dx', 80, 'bf16', 32, 0): ((64, 64, 8, 2, 37632), (64, 64, 8, 1, 36864), (64, 32, 8, 2, 19200), (64, 32, 8, 1, 18432), (32, 32, 4, 2, 10624), (32, 32, 4, 1, 10240)),
    ('dx', 80, 'bf16', 32, 16): ((64, 64, 8, 2, 39680), (64, 64, 8, 1, 38912), (64, 32, 8, 2, 20224), (64, 32, 8, 1, 19456), (32, 32, 4, 2, 11648), (32, 32, 4, 1, 11264)),
    ('dx', 80, 'bf16', 64, 0): ((64, 64, 8, 2, 41728), (64, 64, 8, 1, 40960), (64, 32, 8, 2, 25344), (64, 32, 8, 1, 24576), (32, 32, 4, 2, 14720), (32, 32, 4, 1, 14336)),
    ('dx', 80, 'bf16', 64, 16): ((64, 32, 8, 2, 26368), (64, 32, 8, 1, 25600), (32, 32, 4, 2, 15744), (32, 32, 4, 1, 15360)),
    ('dx', 80, 'bf16', 64, 32): ((64, 32, 8, 2, 27392), (64, 32, 8, 1, 26624), (32, 32, 4, 2, 16768), (32, 32, 4, 1, 16384)),
    ('dx', 80, 'bf16', 128, 0): ((64, 64, 8, 2, 54016), (64, 64, 8, 1, 53248), (64, 32, 8, 2, 45824), (64, 32, 8, 1, 45056), (32, 32, 4, 2, 29056), (32, 32, 4, 1, 28672)),
    ('dx', 80, 'bf16', 128, 32): ((64, 32, 8, 2, 47872), (64, 32, 8, 1, 47104), (32, 32, 4, 2, 31104), (32, 32, 4, 1, 30720)),
    ('dx', 80, 'bf16', 128, 64): ((64, 32, 8, 2, 49920), (64, 32, 8, 1, 49152), (32, 32, 4, 2, 33152), (32, 32, 4, 1, 32768)),
    ('dx', 80, 'bf16', 128, 128): ((64, 32, 8, 2, 54016), (64, 32, 8, 1, 53248), (32, 32, 4, 2, 37248), (32, 32, 4, 1, 36864)),
    ('dx', 80, 'bf16', 256, 64): ((64, 32, 8, 1, 94208),),
    ('dx', 80, 'fp32', 16, 0): ((16, 32, 4, 1, 8192), (16, 16, 4, 1, 5120)),
    ('dx', 80, 'fp32', 32, 0): ((16, 32, 4, 1, 12288), (16, 16, 4, 1, 8192)),
    ('dx', 80, 'fp32', 32, 16): ((16, 32, 4, 1, 16384), (16, 16, 4, 1, 11264)),
    ('dx', 80, 'fp32', 64, 0): ((16, 32, 4, 1, 20480), (16, 16, 4, 1, 14336)),
    ('dx', 80, 'fp32', 64, 16): ((16, 32, 4, 1, 24576), (16, 16, 4, 1, 17408)),
    ('dx', 80, 'fp32', 64, 32): ((16, 32, 4, 1, 28672), (16, 16, 4, 1, 20480)),
    ('dx', 80, 'fp32', 128, 0): ((16, 16, 4, 1, 26624),),
    ('dx', 90, 'bf16', 16, 0): ((64, 64, 8, 2, 39680), (64, 64, 8, 1, 34816), (64, 32, 8, 2, 22272), (64, 32, 8, 1, 17408), (32, 32, 4, 2, 11648), (32, 32, 4, 1, 9216)),
    ('dx', 90, 'bf16', 32, 0): ((64, 64, 8, 2, 45824), (64, 64, 8, 1, 36864), (64, 32, 8, 2, 27392), (64, 32, 8, 1, 18432), (32, 32, 4, 2, 14720), (32, 32, 4, 1, 10240)),
    ('dx', 90, 'bf16', 32, 16): ((64, 64, 8, 2, 51968), (64, 64, 8, 1, 38912), (64, 32, 8, 2, 32512), (64, 32, 8, 1, 19456), (32, 32, 4, 2, 17792), (32, 32, 4, 1, 11264)),
    ('dx', 90, 'bf16', 64, 0): ((64, 64, 8, 2, 74496), (64, 64, 8, 1, 57344), (64, 32, 8, 2, 54016), (64, 32, 8, 1, 36864), (32, 32, 4, 2, 29056), (32, 32, 4, 1, 20480)),
    ('dx', 90, 'bf16', 64, 16): ((64, 64, 8, 2, 80640), (64, 64, 8, 1, 59392), (64, 32, 8, 2, 59136), (64, 32, 8, 1, 37888), (32, 32, 4, 2, 32128), (32, 32, 4, 1, 21504)),
    ('dx', 90, 'bf16', 64, 32): ((64, 64, 8, 2, 86784), (64, 64, 8, 1, 61440), (64, 32, 8, 2, 64256), (64, 32, 8, 1, 38912), (32, 32, 4, 2, 35200), (32, 32, 4, 1, 22528)),
    ('dx', 90, 'bf16', 128, 0): ((64, 64, 8, 2, 115456), (64, 64, 8, 1, 81920), (64, 32, 8, 2, 90880), (64, 32, 8, 1, 57344), (32, 32, 4, 2, 49536), (32, 32, 4, 1, 32768)),
    ('dx', 90, 'bf16', 128, 32): ((64, 64, 8, 2, 127744), (64, 64, 8, 1, 86016), (64, 32, 8, 2, 101120), (64, 32, 8, 1, 59392), (32, 32, 4, 2, 55680), (32, 32, 4, 1, 34816)),
    ('dx', 90, 'bf16', 128, 64): ((64, 64, 8, 2, 156416), (64, 64, 8, 1, 106496), (64, 32, 8, 2, 127744), (64, 32, 8, 1, 77824), (32, 32, 4, 2, 70016), (32, 32, 4, 1, 45056)),
    ('dx', 90, 'bf16', 128, 128): ((64, 64, 8, 2, 197376), (64, 64, 8, 1, 131072), (64, 32, 8, 2, 164608), (64, 32, 8, 1, 98304), (32, 32, 4, 2, 90496), (32, 32, 4, 1, 57344)),
    ('dx', 90, 'bf16', 256, 64): ((64, 64, 8, 1, 155648), (64, 32, 8, 2, 201472), (64, 32, 8, 1, 118784), (32, 32, 4, 2, 110976), (32, 32, 4, 1, 69632)),
    ('dx', 90, 'bf16', 256, 128): ((64, 64, 8, 1, 180224), (64, 32, 8, 1, 139264), (32, 32, 4, 2, 131456)),
    ('dx', 90, 'bf16', 256, 256): ((64, 32, 8, 1, 180224),),
    ('dx', 90, 'fp32', 16, 0): ((16, 32, 4, 1, 8192), (16, 16, 4, 1, 5120)),
    ('dx', 90, 'fp32', 32, 0): ((16, 32, 4, 1, 12288), (16, 16, 4, 1, 8192)),
    ('dx', 90, 'fp32', 32, 16): ((16, 32, 4, 1, 16384), (16, 16, 4, 1, 11264)),
    ('dx', 90, 'fp32', 64, 0): ((16, 32, 4, 1, 20480), (16, 16, 4, 1, 14336)),
    ('dx', 90, 'fp32', 64, 16): ((16, 32, 4, 1, 24576), (16, 16, 4, 1, 17408)),
    ('dx', 90, 'fp32', 64, 32): ((16, 32, 4, 1, 28672), (16, 16, 4, 1, 20480)),
    ('dx', 90, 'fp32', 128, 0): ((16, 16, 4, 1, 26624),),
    ('fwd', 80, 'bf16', 16, 0): ((128, 64, 8, 2, 6144), (128, 32, 8, 2, 5120), (64, 64, 4, 2, 4096), (64, 32, 4, 2, 3072), (32, 32, 4, 2, 2048)),
    ('fwd', 80, 'bf16', 32, 0): ((128, 64, 8, 2, 12288), (128, 32, 8, 2, 10240), (64, 64, 4, 2, 8192), (64, 32, 4, 2, 6144), (32, 32, 4, 2, 4096)),
    ('fwd', 80, 'bf16', 32, 16): ((128, 64, 8, 2, 18432), (128, 32, 8, 2, 15360), (64, 64, 4, 2, 12288), (64, 32, 4, 2, 9216), (32, 32, 4, 2, 6144)),
    ('fwd', 80, 'bf16', 64, 0): ((128, 64, 8, 2, 24576), (128, 32, 8, 2, 20480), (64, 64, 4, 2, 16384), (64, 32, 4, 2, 12288), (32, 32, 4, 2, 10240)),
    ('fwd', 80, 'bf16', 64, 16): ((128, 64, 8, 2, 30720), (128, 32, 8, 2, 25600), (64, 64, 4, 2, 20480), (64, 32, 4, 2, 15360), (32, 32, 4, 2, 10240)),
    ('fwd', 80, 'bf16', 64, 32): ((128, 64, 8, 2, 36864), (128, 32, 8, 2, 30720), (64, 64, 4, 2, 24576), (64, 32, 4, 2, 18432), (32, 32, 4, 2, 12288)),
    ('fwd', 80, 'bf16', 128, 0): ((128, 64, 8, 2, 49152), (128, 32, 8, 2, 40960), (64, 64, 4, 2, 40960), (64, 32, 4, 2, 28672), (32, 32, 4, 2, 18432)),
    ('fwd', 80, 'bf16', 128, 32): ((128, 64, 8, 2, 61440), (128, 32, 8, 2, 51200), (64, 64, 4, 2, 40960), (64, 32, 4, 2, 30720), (32, 32, 4, 2, 20480)),
    ('fwd', 80, 'bf16', 128, 64): ((128, 32, 8, 2, 61440), (64, 32, 4, 2, 36864), (32, 32, 4, 2, 26624)),
    ('fwd', 80, 'bf16', 128, 128): ((32, 32, 4, 2, 34816),),
    ('fwd', 80, 'bf16', 256, 64): ((32, 32, 4, 2, 43008),),
    ('fwd', 80, 'bf16', 256, 128): ((32, 32, 4, 2, 51200),),
    ('fwd', 80, 'fp32', 16, 0): ((32, 32, 4, 1, 8320), (16, 16, 4, 1, 3072)),
    ('fwd', 80, 'fp32', 32, 0): ((32, 32, 4, 1, 12288), (16, 16, 4, 1, 5184)),
    ('fwd', 80, 'fp32', 32, 16): ((32, 32, 4, 1, 16384), (16, 16, 4, 1, 7232)),
    ('fwd', 80, 'fp32', 64, 0): ((32, 32, 4, 1, 20608), (16, 16, 4, 1, 9216)),
    ('fwd', 80, 'fp32', 64, 16): ((32, 32, 4, 1, 24704), (16, 16, 4, 1, 11264)),
    ('fwd', 80, 'fp32', 64, 32): ((32, 32, 4, 1, 28800), (16, 16, 4, 1, 13312)),
    ('fwd', 80, 'fp32', 128, 0): ((32, 32, 4, 1, 36864), (16, 16, 4, 1, 17472)),
    ('fwd', 90, 'bf16', 16, 0): ((128, 64, 8, 2, 8192), (128, 32, 8, 2, 6144), (64, 64, 4, 2, 6144), (64, 32, 4, 2, 4096)),
    ('fwd', 90, 'bf16', 32, 0): ((128, 64, 8, 2, 16384), (128, 32, 8, 2, 12288), (64, 64, 4, 2, 12288), (64, 32, 4, 2, 8192)),
    ('fwd', 90, 'bf16', 32, 16): ((128, 64, 8, 2, 24576), (128, 32, 8, 2, 18432), (64, 64, 4, 2, 18432), (64, 32, 4, 2, 12288)),
    ('fwd', 90, 'bf16', 64, 0): ((128, 64, 8, 2, 32768), (128, 32, 8, 2, 24576), (64, 64, 4, 2, 24576), (64, 32, 4, 2, 16384)),
    ('fwd', 90, 'bf16', 64, 16): ((128, 64, 8, 2, 40960), (128, 32, 8, 2, 30720), (64, 64, 4, 2, 30720), (64, 32, 4, 2, 20480)),
    ('fwd', 90, 'bf16', 64, 32): ((128, 64, 8, 2, 49152), (128, 32, 8, 2, 36864), (64, 64, 4, 2, 36864), (64, 32, 4, 2, 24576)),
    ('fwd', 90, 'bf16', 128, 0): ((128, 64, 8, 2, 65536), (128, 32, 8, 2, 49152), (64, 64, 4, 2, 49152), (64, 32, 4, 2, 32768)),
    ('fwd', 90, 'bf16', 128, 32): ((128, 64, 8, 2, 81920), (128, 32, 8, 2, 61440), (64, 64, 4, 2, 61440), (64, 32, 4, 2, 40960)),
    ('fwd', 90, 'bf16', 128, 64): ((128, 64, 8, 2, 98304), (128, 32, 8, 2, 73728), (64, 64, 4, 2, 73728), (64, 32, 4, 2, 49152)),
    ('fwd', 90, 'bf16', 128, 128): ((128, 64, 8, 2, 131072), (128, 32, 8, 2, 98304), (64, 64, 4, 2, 98304), (64, 32, 4, 2, 65536)),
    ('fwd', 90, 'bf16', 256, 64): ((128, 64, 8, 2, 163840), (128, 32, 8, 2, 122880), (64, 32, 4, 2, 81920)),
    ('fwd', 90, 'fp32', 16, 0): ((32, 32, 4, 1, 8320), (16, 16, 4, 1, 3072)),
    ('fwd', 90, 'fp32', 32, 0): ((32, 32, 4, 1, 12288), (16, 16, 4, 1, 5184)),
    ('fwd', 90, 'fp32', 32, 16): ((32, 32, 4, 1, 16384), (16, 16, 4, 1, 7232)),
    ('fwd', 90, 'fp32', 64, 0): ((32, 32, 4, 1, 20608), (16, 16, 4, 1, 9216)),
    ('fwd', 90, 'fp32', 64, 16): ((32, 32, 4, 1, 24704), (16, 16, 4, 1, 11264)),
    ('fwd', 90, 'fp32', 64, 32): ((32, 32, 4, 1, 28800), (16, 16, 4, 1, 13312)),
    ('fwd', 90, 'fp32', 128, 0): ((16, 16, 4, 1, 17472),),
}


def _configs(kind: str) -> list:
    if interpreting():
        return [_cfg(16, 16, 1, 1)]
    seen = []
    for dtype in ("bf16", "fp32"):
        for c in CANDIDATES[(kind, dtype)]:
            if c not in seen:
                seen.append(c)
    return [_cfg(*c) for c in seen]


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "bf16"  # fp16 has bf16's sizes


def _device_target(device: torch.device) -> tuple[Optional[int], int]:
    """(the verified target whose table applies, the device's shared memory per block)."""
    major, _ = torch.cuda.get_device_capability(device)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index if device.index is not None
                                                                      else torch.cuda.current_device())
    smem = int(props["max_shared_mem"])
    if major == 8:
        return 80, smem
    if major >= 9:  # sm_90 tables; newer targets are not verified separately
        return 90, smem
    return None, smem


def _verified_configs(kind: str, device: torch.device, dtype: torch.dtype, da: int, db: int) -> list:
    target, smem = _device_target(device)
    if target is None:
        return []
    entries = VERIFIED.get((kind, target, _dtype_class(dtype), da, db), ())
    return [e[:4] for e in entries if e[4] <= smem]


def supported(device: torch.device, dtype: torch.dtype, din: int) -> bool:
    """Whether the kernels run (op, device, dtype, Din) with verified configs: always under the
    interpreter; on CUDA when every kernel has a spill-free config for this target and Din."""
    if din < 1 or din > MAX_DIN or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if interpreting():
        return True
    if torch.device(device).type != "cuda":
        return False
    da, db = din_pieces(din)
    return all(_verified_configs(kind, torch.device(device), dtype, da, db) for kind in ("fwd", "dq", "dx"))


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if interpreting():
            return configs[:1]
        x = args["X"]
        allowed = _verified_configs(kind, x.device, x.dtype, args["DA"], args["DB"] if args["HAS_B"] else 0)
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        # nothing verified (a caller that skipped supported()): the smallest tile, correct but slow
        return keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]

    return prune


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs("fwd"), key=["R", "N", "D"], prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _readin_fwd(
    Q, X, O, STATS,
    R, N, D,
    stride_qb, stride_qr,
    stride_xb, stride_xn,
    stride_ob, stride_or,
    stride_sb,
    qk_scale,  # scale · log2(e)
    DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    mask_m = offs_m < R
    mask_a = offs_a < D
    mask_b = offs_b < D

    q_ptr = Q + b * stride_qb + offs_m[:, None] * stride_qr
    qa = tl.load(q_ptr + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if HAS_B:
        qb = tl.load(q_ptr + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    x_base = X + b * stride_xb
    for start_n in range(0, N, BLOCK_N):
        cur_n = start_n + offs_n
        mask_n = cur_n < N
        x_ptr = x_base + cur_n[:, None] * stride_xn
        xa = tl.load(x_ptr + offs_a[None, :], mask=mask_n[:, None] & mask_a[None, :], other=0.0)
        s = dot(qa, tl.trans(xa), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
        if HAS_B:
            xb = tl.load(x_ptr + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            s = dot(qb, tl.trans(xb), s, DOT_FP32, PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(X.dtype.element_ty)
        acc_a = dot(p, xa, acc_a * alpha[:, None], DOT_FP32, PRECISION)
        if HAS_B:
            acc_b = dot(p, xb, acc_b * alpha[:, None], DOT_FP32, PRECISION)
        m_i = m_new

    # N == 0 (no token): zero output rather than NaN
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    inv_l = 1.0 / l_safe
    o_ptr = O + b * stride_ob + offs_m[:, None] * stride_or
    tl.store(o_ptr + offs_a[None, :], (acc_a * inv_l[:, None]).to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_a[None, :])
    if HAS_B:
        tl.store(o_ptr + offs_b[None, :], (acc_b * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_b[None, :])
    # the backward recomputes P = exp2((S·log2e − m) − log2 l): keeping m apart from log2 l avoids
    # rounding their (possibly large) sum, so P is as accurate as in the forward
    stats_ptr = STATS + b * stride_sb + offs_m * 2
    tl.store(stats_ptr, m_i, mask=mask_m)
    tl.store(stats_ptr + 1, tl.log2(l_safe), mask=mask_m)


@triton.jit
def _load_pair_tile(PAIR, b, row_start, row_end, stride_pb, stride_pr, offs_d, mask_d, BLOCK_M: tl.constexpr):
    """The [2·BLOCK_M, len(offs_d)] tile of PAIR whose row 2i is dO[row_start + i] and row 2i+1
    is Q'[row_start + i] (rows ≥ row_end read as zeros)."""
    k = 2 * row_start + tl.arange(0, 2 * BLOCK_M)
    ptr = PAIR + b * stride_pb + k[:, None] * stride_pr + offs_d[None, :]
    return tl.load(ptr, mask=(k < 2 * row_end)[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _unpair(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[2·BLOCK_M, BLOCK_N] with rows (dO·, Q'·) interleaved → (dP, S), each [BLOCK_M, BLOCK_N]."""
    return tl.split(tl.permute(tl.reshape(t, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))


@triton.autotune(configs=_configs("dq"), key=["R", "N", "D"], prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _readin_bwd_dq(
    PAIR, X, O, STATS, DELTA, DQ,
    R, N, D,
    stride_pb, stride_pr,
    stride_xb, stride_xn,
    stride_ob, stride_or,
    stride_sb, stride_db,
    stride_dqb, stride_dqr,
    scale, qk_scale,
    DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # dQ'[r] = scale · Σ_n dS[r, n] · X[n],  dS = P ⊙ (dP − delta),  dP = dO · Xᵀ.
    # S and dP come from ONE dot: the resident tile T interleaves the rows of dO and Q' (PAIR is
    # [B, 2R, Din], row 2r = dO[r], row 2r+1 = Q'[r]), so T · Xᵀ gives both, and its 2·BLOCK_M
    # rows keep every warp group of the tensor-core tile busy without duplicated work.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    mask_m = offs_m < R
    mask_a = offs_a < D
    mask_b = offs_b < D
    mask_mb = mask_m[:, None] & mask_b[None, :]

    # delta = rowsum(dO ⊙ O)
    do_ptr = PAIR + b * stride_pb + (2 * offs_m)[:, None] * stride_pr
    o_ptr = O + b * stride_ob + offs_m[:, None] * stride_or
    mask_ma = mask_m[:, None] & mask_a[None, :]
    doa = tl.load(do_ptr + offs_a[None, :], mask=mask_ma, other=0.0)
    oa = tl.load(o_ptr + offs_a[None, :], mask=mask_ma, other=0.0)
    delta = tl.sum(doa.to(tl.float32) * oa.to(tl.float32), 1)
    if HAS_B:
        dob = tl.load(do_ptr + offs_b[None, :], mask=mask_mb, other=0.0)
        ob = tl.load(o_ptr + offs_b[None, :], mask=mask_mb, other=0.0)
        delta += tl.sum(dob.to(tl.float32) * ob.to(tl.float32), 1)
    tl.store(DELTA + b * stride_db + offs_m, delta, mask=mask_m)
    stats_ptr = STATS + b * stride_sb + offs_m * 2
    row_max = tl.load(stats_ptr, mask=mask_m, other=0.0)
    log2_l = tl.load(stats_ptr + 1, mask=mask_m, other=0.0)

    ta = _load_pair_tile(PAIR, b, pid_m * BLOCK_M, R, stride_pb, stride_pr, offs_a, mask_a, BLOCK_M)
    dqa = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if HAS_B:
        tb = _load_pair_tile(PAIR, b, pid_m * BLOCK_M, R, stride_pb, stride_pr, offs_b, mask_b, BLOCK_M)
        dqb = tl.zeros([BLOCK_M, DB], dtype=tl.float32)

    x_base = X + b * stride_xb
    for start_n in range(0, N, BLOCK_N):
        cur_n = start_n + offs_n
        mask_n = cur_n < N
        x_ptr = x_base + cur_n[:, None] * stride_xn
        xa = tl.load(x_ptr + offs_a[None, :], mask=mask_n[:, None] & mask_a[None, :], other=0.0)
        sd = dot(ta, tl.trans(xa), tl.zeros([2 * BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
        if HAS_B:
            xb = tl.load(x_ptr + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            sd = dot(tb, tl.trans(xb), sd, DOT_FP32, PRECISION)
        dp, s = _unpair(sd, BLOCK_M, BLOCK_N)
        p = tl.exp2((s * qk_scale - row_max[:, None]) - log2_l[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None]) * scale).to(X.dtype.element_ty)
        dqa = dot(ds, xa, dqa, DOT_FP32, PRECISION)
        if HAS_B:
            dqb = dot(ds, xb, dqb, DOT_FP32, PRECISION)

    dq_ptr = DQ + b * stride_dqb + offs_m[:, None] * stride_dqr
    tl.store(dq_ptr + offs_a[None, :], dqa.to(DQ.dtype.element_ty), mask=mask_ma)
    if HAS_B:
        tl.store(dq_ptr + offs_b[None, :], dqb.to(DQ.dtype.element_ty), mask=mask_mb)


@triton.autotune(configs=_configs("dx"), key=["R", "N", "D", "ROWS_PER_SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner("dx")})
@triton.jit
def _readin_bwd_dx(
    PAIR, X, STATS, DELTA, DX,
    R, N, D, ROWS_PER_SPLIT,
    stride_pb, stride_pr,
    stride_xb, stride_xn,
    stride_sb, stride_db,
    stride_dxs, stride_dxb, stride_dxn,
    scale, qk_scale,
    DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # dX[n] = Σ_r P[r,n]·dO[r] (X as value) + scale·Σ_r dS[r,n]·Q'[r] (X as key), over every
    # query row r (all heads, all latents) of this program's split. With the streamed tile T
    # interleaving rows of dO and Q', both sums are ONE dot: dXᵀ += Tᵀ · [P; dS] (rows
    # interleaved the same way), and T · Xᵀ gives dP and S together. The accumulator is kept
    # transposed, [Din, BLOCK_N], so its long side is the M side of the tensor-core tile.
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    mask_n = offs_n < N
    mask_a = offs_a < D
    mask_b = offs_b < D

    x_ptr = X + b * stride_xb + offs_n[:, None] * stride_xn
    xa = tl.load(x_ptr + offs_a[None, :], mask=mask_n[:, None] & mask_a[None, :], other=0.0)
    dxa = tl.zeros([DA, BLOCK_N], dtype=tl.float32)
    if HAS_B:
        xb = tl.load(x_ptr + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
        dxb = tl.zeros([DB, BLOCK_N], dtype=tl.float32)

    m_lo = split * ROWS_PER_SPLIT
    m_hi = tl.minimum(R, m_lo + ROWS_PER_SPLIT)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        cur_m = start_m + offs_m
        mask_m = cur_m < m_hi
        ta = _load_pair_tile(PAIR, b, start_m, m_hi, stride_pb, stride_pr, offs_a, mask_a, BLOCK_M)
        # masked rows: a row max of +inf makes P = 0, so they contribute nothing
        stats_ptr = STATS + b * stride_sb + cur_m * 2
        row_max = tl.load(stats_ptr, mask=mask_m, other=float("inf"))
        log2_l = tl.load(stats_ptr + 1, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + b * stride_db + cur_m, mask=mask_m, other=0.0)
        sd = dot(ta, tl.trans(xa), tl.zeros([2 * BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
        if HAS_B:
            tb = _load_pair_tile(PAIR, b, start_m, m_hi, stride_pb, stride_pr, offs_b, mask_b, BLOCK_M)
            sd = dot(tb, tl.trans(xb), sd, DOT_FP32, PRECISION)
        dp, s = _unpair(sd, BLOCK_M, BLOCK_N)
        p = tl.exp2((s * qk_scale - row_max[:, None]) - log2_l[:, None])
        ds = p * (dp - delta[:, None]) * scale
        pds = tl.reshape(tl.permute(tl.join(p, ds), [0, 2, 1]), [2 * BLOCK_M, BLOCK_N]).to(X.dtype.element_ty)
        dxa = dot(tl.trans(ta), pds, dxa, DOT_FP32, PRECISION)
        if HAS_B:
            dxb = dot(tl.trans(tb), pds, dxb, DOT_FP32, PRECISION)

    dx_ptr = DX + split.to(tl.int64) * stride_dxs + b * stride_dxb + offs_n[:, None] * stride_dxn
    tl.store(dx_ptr + offs_a[None, :], tl.trans(dxa).to(DX.dtype.element_ty), mask=mask_n[:, None] & mask_a[None, :])
    if HAS_B:
        tl.store(dx_ptr + offs_b[None, :], tl.trans(dxb).to(DX.dtype.element_ty),
                 mask=mask_n[:, None] & mask_b[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _common(qp: torch.Tensor, x: torch.Tensor):
    if qp.dim() != 3 or x.dim() != 3:
        raise ValueError(f"readin kernels: expected q' [B, R, Din] and x [B, N, Din], got {tuple(qp.shape)} and {tuple(x.shape)}")
    if qp.shape[0] != x.shape[0] or qp.shape[2] != x.shape[2]:
        raise ValueError(f"readin kernels: q' {tuple(qp.shape)} and x {tuple(x.shape)} disagree on B or Din")
    if qp.dtype != x.dtype or qp.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"readin kernels: q' and x must share one of float32/bfloat16/float16, got {qp.dtype}, {x.dtype}")
    if qp.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"readin kernels: {qp.device.type} tensors need TRITON_INTERPRET=1 (set before Triton is imported)")
    da, db = din_pieces(qp.shape[2])
    dot_fp32 = interpreting()
    precision = "ieee" if qp.dtype == torch.float32 else "tf32"
    return da, db, dot_fp32, precision


def _consts(da: int, db: int, dot_fp32: bool, precision: str) -> dict:
    return dict(DA=da, DB=max(db, 16), HAS_B=db > 0, DOT_FP32=dot_fp32, PRECISION=precision)


def readin_fwd(qp: torch.Tensor, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: q' [B, R, Din], x [B, N, Din] → (o [B, R, Din] in q's dtype, stats [B, R, 2] fp32).

    stats[..., 0] is the row max of scale·q'·x in log2 units, stats[..., 1] log2 of the row's
    softmax denominator relative to it: logsumexp = (stats[..., 0] + stats[..., 1]) · ln 2."""
    da, db, dot_fp32, precision = _common(qp, x)
    qp, x = _last_dim_contiguous(qp), _last_dim_contiguous(x)
    B, R, D = qp.shape
    N = x.shape[1]
    o = torch.empty((B, R, D), device=qp.device, dtype=qp.dtype)
    stats = torch.empty((B, R, 2), device=qp.device, dtype=torch.float32)
    if B == 0 or R == 0:
        return o, stats
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B)  # noqa: E731
    _readin_fwd[grid](
        qp, x, o, stats, R, N, D,
        qp.stride(0), qp.stride(1), x.stride(0), x.stride(1), o.stride(0), o.stride(1), stats.stride(0),
        float(scale) * LOG2E, **_consts(da, db, dot_fp32, precision),
    )
    return o, stats


def logsumexp_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """logsumexp_n (scale · q'·x_n) [B, R] from the forward's stats."""
    return (stats[..., 0] + stats[..., 1]) * LN2


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dx_splits(B: int, R: int, N: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of the dX reduction over query rows: split only when the
    B · cdiv(N, 64) programs of the dX grid cannot give every SM two programs."""
    granule = 16 if interpreting() else 128  # a multiple of every BLOCK_M
    programs = B * triton.cdiv(N, 16 if interpreting() else 64)
    want = triton.cdiv(2 * _num_sms(device), max(programs, 1))
    splits = max(1, min(want, triton.cdiv(R, granule), 8))
    rows = triton.cdiv(triton.cdiv(R, splits), granule) * granule
    return triton.cdiv(R, rows), rows


def readin_bwd(
    do: torch.Tensor,
    qp: torch.Tensor,
    x: torch.Tensor,
    o: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
    dx_splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: gradients (dq' [B, R, Din], dx [B, N, Din]) given dO and the forward's o, stats.
    ``dx_splits`` overrides the split of the dX reduction over query rows (tests)."""
    da, db, dot_fp32, precision = _common(qp, x)
    qp, x, o = _last_dim_contiguous(qp), _last_dim_contiguous(x), _last_dim_contiguous(o)
    stats = stats.contiguous()
    B, R, D = qp.shape
    N = x.shape[1]
    dq = torch.empty((B, R, D), device=qp.device, dtype=qp.dtype)
    dx = torch.empty((B, N, D), device=x.device, dtype=x.dtype)
    if B == 0 or R == 0 or N == 0:
        return dq.zero_(), dx.zero_()
    # dO and Q' interleaved row by row: one tile feeds both the S and the dP product
    pair = torch.empty((B, R, 2, D), device=qp.device, dtype=qp.dtype)
    pair[:, :, 0] = do
    pair[:, :, 1] = qp
    pair = pair.view(B, 2 * R, D)
    delta = torch.empty((B, R), device=qp.device, dtype=torch.float32)
    consts = _consts(da, db, dot_fp32, precision)
    qk_scale = float(scale) * LOG2E
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B)  # noqa: E731
    _readin_bwd_dq[grid](
        pair, x, o, stats, delta, dq, R, N, D,
        pair.stride(0), pair.stride(1), x.stride(0), x.stride(1), o.stride(0), o.stride(1),
        stats.stride(0), delta.stride(0), dq.stride(0), dq.stride(1),
        float(scale), qk_scale, **consts,
    )
    if dx_splits is None:
        splits, rows = _dx_splits(B, R, N, qp.device)
    else:
        rows = triton.cdiv(R, max(1, dx_splits))
        splits = triton.cdiv(R, rows)
    target = dx if splits == 1 else torch.empty((splits, B, N, D), device=x.device, dtype=torch.float32)
    stride_s = 0 if splits == 1 else target.stride(0)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B, splits)  # noqa: E731
    _readin_bwd_dx[grid](
        pair, x, stats, delta, target, R, N, D, rows,
        pair.stride(0), pair.stride(1), x.stride(0), x.stride(1), stats.stride(0), delta.stride(0),
        stride_s, target.stride(-3), target.stride(-2),
        float(scale), qk_scale, **consts,
    )
    if splits > 1:
        dx = target.sum(0).to(x.dtype)
    return dq, dx


def reference_scale(head_dim: int) -> float:
    """The read-in's softmax scale 1/√C, C the ORIGINAL head dim (not Din)."""
    return 1.0 / math.sqrt(head_dim)
