"""Triton kernels for V-MoE top-k routing (docs/design.md §2.1) and for the expert-sorted index lists
the grouped expert MLP consumes. Kernels and launchers only: no autograd here (see
m2mkd_fast.triton_backend.routing and .moe).

Routing, ``route_forward`` — tokens form G groups of S consecutive tokens:
  1. ``_route_gate_kernel``  grid (G·NB,), NB = cdiv(S, BLOCK_T): one program per block of a
     group's tokens. Loads the logits, computes the gate ("vmoe": softmax over E in fp32, values
     rounded to the logits' dtype exactly as ``torch.softmax`` returns them, then the top-k of
     those values; "naive": top-k of the logits, then a softmax over the k chosen), choosing each
     of the k by arg-max with ties → lower expert index. Writes expert [T, k] and weight [T, k];
     without batch priority it also writes the per-(group, round, block) expert histogram.
  2. batch priority only: the group's token order is a stable descending sort of the first-choice
     weights (``torch.sort(stable=True)`` on the device), then ``_route_hist_kernel`` writes the
     histogram of the permuted sequence.
  3. ``_route_scan_kernel``  grid (G,): exclusive prefix sums of the histogram along each group's
     k-major sequence (round-major, then block) per expert, i.e. the first slot of every
     (group, round, block, expert); adds min(group total, capacity) into counts (int64 atomics:
     integer sums, deterministic).
  4. ``_route_slot_kernel``  grid (G·NB,): slot = block start + rank of the pair among the
     block's pairs of the same expert (a cumulative sum over a one-hot tile); ≥ capacity → −1.
Capacity drops follow from the slots: a pair's slot counts every earlier pair of its expert in
the group, dropped or not, which is V-MoE's cumsum-over-the-mask position.

Dispatch, ``dispatch_indices`` — from (expert, slot) of any Routing, a stable counting sort of
the kept (token, choice) pairs by expert, in pair order p = t·k + j:
  ``_dispatch_hist_kernel`` (per block of pairs) → ``_dispatch_scan_kernel`` (one program: expert
  offsets and block starts) → ``_dispatch_scatter_kernel`` (row of each pair, pair of each row).
The result: ``pair_of_row`` [T·k] int32 (rows 0..offsets[E]-1 are the kept pairs, grouped by
expert, pair order within an expert; later rows are unused), ``row_of_pair`` [T·k] int32 (−1 =
dropped) and ``offsets`` [E+1] int32. Nothing is read back on the host; sizes are upper bounds.

``route_backward`` (``_route_bwd_kernel``, grid (cdiv(T, BLOCK_T),)): d logits from d weight.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import round_to


def _row_block(e_p2: int) -> int:
    """Tokens (or pairs) per program so that a [block, E_P2] one-hot tile stays ~2K elements."""
    if interpreting():
        return 32  # the interpreter's cost is per program and op, not per element
    return max(16, min(256, 2048 // e_p2))


_SCAN_ROWS = 16 if interpreting() else 64


# --------------------------------------------------------------------------------------------
# routing kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _route_gate_kernel(
    LOGITS, EXPERT, WEIGHT, HIST,
    S, NB, E,
    stride_lt, stride_le,
    K: tl.constexpr, K_P2: tl.constexpr, GATE_VMOE: tl.constexpr, WRITE_HIST: tl.constexpr,
    BLOCK_T: tl.constexpr, E_P2: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid // NB
    b = pid % NB
    pos = b * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = pos < S
    tok = g.to(tl.int64) * S + pos
    cols = tl.arange(0, E_P2)
    col_ok = cols < E
    l = tl.load(
        LOGITS + tok[:, None] * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    if GATE_VMOE:
        l = tl.where(col_ok[None, :], l, float("-inf"))
        ex = tl.exp(l - tl.max(l, axis=1)[:, None])
        gate = ex / tl.sum(ex, axis=1)[:, None]
        # compare the values torch.softmax returns in the logits' dtype (ties after rounding)
        score = round_to(gate, WEIGHT.dtype.element_ty, BF16_RTNE).to(tl.float32)
    else:
        score = l
    # k rounds of arg-max over the experts not taken yet; ties → lower expert index
    taken = (cols[None, :] >= E) | (pos[:, None] < 0)
    kcols = tl.arange(0, K_P2)
    chosen_e = tl.zeros((BLOCK_T, K_P2), tl.int32)
    chosen_v = tl.full((BLOCK_T, K_P2), float("-inf"), tl.float32)
    for j in tl.static_range(K):
        best = tl.max(tl.where(taken, float("-inf"), score), axis=1)
        idx = tl.min(tl.where((score == best[:, None]) & ~taken, cols[None, :], E_P2), axis=1)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        chosen_e = tl.where(kcols[None, :] == j, idx[:, None], chosen_e)
        chosen_v = tl.where(kcols[None, :] == j, best[:, None], chosen_v)
        if WRITE_HIST:
            hist = tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
            tl.store(HIST + ((g * K + j) * NB + b) * E_P2 + cols, hist)
    if GATE_VMOE:
        w = chosen_v
    else:
        # softmax over the k chosen logits; the first choice is the largest
        first = tl.max(chosen_v, axis=1)
        ex = tl.exp(chosen_v - first[:, None])
        w = ex / tl.sum(ex, axis=1)[:, None]
    out = tok[:, None] * K + kcols[None, :]
    m2 = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(EXPERT + out, chosen_e.to(tl.int64), mask=m2)
    tl.store(WEIGHT + out, round_to(w, WEIGHT.dtype.element_ty, BF16_RTNE), mask=m2)


@triton.jit
def _route_hist_kernel(
    EXPERT, PERM, HIST, S, NB,
    K: tl.constexpr, BLOCK_T: tl.constexpr, E_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid // NB
    b = pid % NB
    pos = b * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = pos < S
    tok = g.to(tl.int64) * S + tl.load(PERM + g.to(tl.int64) * S + pos, mask=row_ok, other=0)
    cols = tl.arange(0, E_P2)
    for j in tl.static_range(K):
        e = tl.load(EXPERT + tok * K + j, mask=row_ok, other=-1)
        hit = (cols[None, :] == e[:, None]) & row_ok[:, None]
        tl.store(HIST + ((g * K + j) * NB + b) * E_P2 + cols, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _route_scan_kernel(
    HIST, START, COUNTS, KNB, E, CAPACITY,
    HAS_CAPACITY: tl.constexpr, BLOCK_R: tl.constexpr, E_P2: tl.constexpr,
):
    g = tl.program_id(0)
    cols = tl.arange(0, E_P2)
    carry = tl.zeros((E_P2,), tl.int32)
    base = g.to(tl.int64) * KNB
    for r0 in range(0, KNB, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = (base + rows)[:, None] * E_P2 + cols[None, :]
        m2 = (rows < KNB)[:, None]
        h = tl.load(HIST + offs, mask=m2, other=0)
        tl.store(START + offs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=m2)
        carry += tl.sum(h, axis=0)
    if HAS_CAPACITY:
        carry = tl.minimum(carry, CAPACITY)
    tl.atomic_add(COUNTS + cols, carry.to(tl.int64), mask=cols < E)


@triton.jit
def _route_slot_kernel(
    EXPERT, PERM, START, SLOT, S, NB, CAPACITY,
    K: tl.constexpr, HAS_PERM: tl.constexpr, HAS_CAPACITY: tl.constexpr,
    BLOCK_T: tl.constexpr, E_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid // NB
    b = pid % NB
    pos = b * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = pos < S
    if HAS_PERM:
        tok = g.to(tl.int64) * S + tl.load(PERM + g.to(tl.int64) * S + pos, mask=row_ok, other=0)
    else:
        tok = g.to(tl.int64) * S + pos
    cols = tl.arange(0, E_P2)
    for j in tl.static_range(K):
        e = tl.load(EXPERT + tok * K + j, mask=row_ok, other=-1)
        hit = ((cols[None, :] == e[:, None]) & row_ok[:, None]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit
        start = tl.load(START + ((g * K + j) * NB + b) * E_P2 + cols)
        slot = tl.sum(hit * (rank + start[None, :]), axis=1)
        if HAS_CAPACITY:
            slot = tl.where(slot < CAPACITY, slot, -1)
        tl.store(SLOT + tok * K + j, slot.to(tl.int64), mask=row_ok)


@triton.jit
def _route_bwd_kernel(
    LOGITS, EXPERT, GRAD_W, GRAD_L, T, E,
    stride_lt, stride_le, stride_gt, stride_gk,
    K: tl.constexpr, GATE_VMOE: tl.constexpr, BLOCK_T: tl.constexpr, E_P2: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = tok < T
    cols = tl.arange(0, E_P2)
    col_ok = cols < E
    m2 = row_ok[:, None] & col_ok[None, :]
    l = tl.load(LOGITS + tok[:, None] * stride_lt + cols[None, :] * stride_le, mask=m2, other=0.0).to(tl.float32)
    l = tl.where(col_ok[None, :], l, float("-inf"))
    # G[t, e] = Σ_j [expert_j == e] · dweight_j
    gsum = tl.zeros((BLOCK_T, E_P2), tl.float32)
    for j in tl.static_range(K):
        e = tl.load(EXPERT + tok * K + j, mask=row_ok, other=-1)
        gw = tl.load(GRAD_W + tok * stride_gt + j * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
        gsum += tl.where(cols[None, :] == e[:, None], gw[:, None], 0.0)
    if GATE_VMOE:
        # w = softmax(l)[chosen]:  dl = g ⊙ (G − Σ_e g_e G_e)
        ex = tl.exp(l - tl.max(l, axis=1)[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]
    else:
        # w = softmax over the chosen logits:  dl_e = w_e (G_e − Σ w G) on chosen e, 0 elsewhere
        chosen = (cols[None, :] < 0) & (tok[:, None] < 0)  # all False, [BLOCK_T, E_P2]
        for j in tl.static_range(K):
            e = tl.load(EXPERT + tok * K + j, mask=row_ok, other=-1)
            chosen = chosen | (cols[None, :] == e[:, None])
        lc = tl.where(chosen, l, float("-inf"))
        mx = tl.max(lc, axis=1)
        mx = tl.where(row_ok, mx, 0.0)
        ex = tl.where(chosen, tl.exp(lc - mx[:, None]), 0.0)
        p = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
    p = tl.where(m2, p, 0.0)
    dl = p * (gsum - tl.sum(p * gsum, axis=1)[:, None])
    tl.store(GRAD_L + tok[:, None] * E + cols[None, :], round_to(dl, GRAD_L.dtype.element_ty, BF16_RTNE), mask=m2)


# --------------------------------------------------------------------------------------------
# dispatch kernels: stable counting sort of the kept pairs by expert
# --------------------------------------------------------------------------------------------
@triton.jit
def _dispatch_hist_kernel(EXPERT, SLOT, HIST, P, E, BLOCK_P: tl.constexpr, E_P2: tl.constexpr):
    b = tl.program_id(0)
    p = b.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    e = tl.load(EXPERT + p, mask=pm, other=-1)
    s = tl.load(SLOT + p, mask=pm, other=-1)
    kept = pm & (s >= 0) & (e >= 0) & (e < E)
    cols = tl.arange(0, E_P2)
    hit = (cols[None, :] == e[:, None]) & kept[:, None]
    tl.store(HIST + b * E_P2 + cols, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _dispatch_scan_kernel(HIST, START, OFFSETS, NBP, E, BLOCK_R: tl.constexpr, E_P2: tl.constexpr):
    cols = tl.arange(0, E_P2)
    total = tl.zeros((E_P2,), tl.int32)
    for r0 in range(0, NBP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(HIST + rows[:, None] * E_P2 + cols[None, :], mask=(rows < NBP)[:, None], other=0)
        total += tl.sum(h, axis=0)
    carry = tl.cumsum(total, axis=0) - total  # first row of each expert
    tl.store(OFFSETS + cols, carry, mask=cols < E)
    tl.store(OFFSETS + E, tl.sum(total, axis=0))
    for r0 in range(0, NBP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = rows[:, None] * E_P2 + cols[None, :]
        m2 = (rows < NBP)[:, None]
        h = tl.load(HIST + offs, mask=m2, other=0)
        tl.store(START + offs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=m2)
        carry += tl.sum(h, axis=0)


@triton.jit
def _dispatch_scatter_kernel(
    EXPERT, SLOT, START, ROW_OF_PAIR, PAIR_OF_ROW, P, E,
    BLOCK_P: tl.constexpr, E_P2: tl.constexpr,
):
    b = tl.program_id(0)
    p = b.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    e = tl.load(EXPERT + p, mask=pm, other=-1)
    s = tl.load(SLOT + p, mask=pm, other=-1)
    kept = pm & (s >= 0) & (e >= 0) & (e < E)
    cols = tl.arange(0, E_P2)
    hit = ((cols[None, :] == e[:, None]) & kept[:, None]).to(tl.int32)
    rank = tl.cumsum(hit, axis=0) - hit
    start = tl.load(START + b * E_P2 + cols)
    row = tl.sum(hit * (rank + start[None, :]), axis=1)
    tl.store(ROW_OF_PAIR + p, tl.where(kept, row, -1), mask=pm)
    tl.store(PAIR_OF_ROW + row, p.to(tl.int32), mask=kept)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def route_forward(
    logits: torch.Tensor,
    k: int,
    gate_vmoe: bool,
    capacity: Optional[int],
    batch_priority: bool,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert [T,k] int64, weight [T,k] logits.dtype, slot [T,k] int64, counts [E] int64).

    ``group_size`` S must divide T (S = T for one group); ``capacity`` None = dropless.
    """
    T, E = logits.shape
    dev = logits.device
    expert = torch.empty((T, k), dtype=torch.int64, device=dev)
    weight = torch.empty((T, k), dtype=logits.dtype, device=dev)
    slot = torch.empty((T, k), dtype=torch.int64, device=dev)
    counts = torch.zeros((E,), dtype=torch.int64, device=dev)
    if T == 0:
        return expert, weight, slot, counts
    S = group_size
    G = T // S
    e_p2 = max(2, triton.next_power_of_2(E))
    block_t = _row_block(e_p2)
    NB = triton.cdiv(S, block_t)
    hist = torch.empty((G, k, NB, e_p2), dtype=torch.int32, device=dev)
    start = torch.empty_like(hist)
    _route_gate_kernel[(G * NB,)](
        logits, expert, weight, hist, S, NB, E, logits.stride(0), logits.stride(1),
        K=k, K_P2=max(2, triton.next_power_of_2(k)), GATE_VMOE=gate_vmoe, WRITE_HIST=not batch_priority,
        BLOCK_T=block_t, E_P2=e_p2, BF16_RTNE=interpreting(),
    )
    perm = expert  # unused placeholder when there is no batch priority
    if batch_priority:
        # stable descending sort of each group's first-choice weights: ties keep token order
        perm = torch.sort(weight[:, 0].reshape(G, S), dim=1, descending=True, stable=True).indices.contiguous()
        _route_hist_kernel[(G * NB,)](expert, perm, hist, S, NB, K=k, BLOCK_T=block_t, E_P2=e_p2)
    _route_scan_kernel[(G,)](
        hist, start, counts, k * NB, E, 0 if capacity is None else capacity,
        HAS_CAPACITY=capacity is not None, BLOCK_R=_SCAN_ROWS, E_P2=e_p2,
    )
    _route_slot_kernel[(G * NB,)](
        expert, perm, start, slot, S, NB, 0 if capacity is None else capacity,
        K=k, HAS_PERM=batch_priority, HAS_CAPACITY=capacity is not None, BLOCK_T=block_t, E_P2=e_p2,
    )
    return expert, weight, slot, counts


def route_backward(grad_weight: torch.Tensor, logits: torch.Tensor, expert: torch.Tensor, gate_vmoe: bool) -> torch.Tensor:
    """d logits [T, E] (logits.dtype) from d weight [T, k]."""
    T, E = logits.shape
    k = expert.shape[1]
    grad_logits = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad_logits
    e_p2 = max(2, triton.next_power_of_2(E))
    block_t = _row_block(e_p2)
    _route_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, expert.contiguous(), grad_weight, grad_logits, T, E,
        logits.stride(0), logits.stride(1), grad_weight.stride(0), grad_weight.stride(1),
        K=k, GATE_VMOE=gate_vmoe, BLOCK_T=block_t, E_P2=e_p2, BF16_RTNE=interpreting(),
    )
    return grad_logits


def dispatch_indices(expert: torch.Tensor, slot: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable counting sort of the kept (token, choice) pairs by expert.

    expert, slot [T, k] (slot −1 = dropped) → (pair_of_row [T·k] int32, row_of_pair [T·k] int32,
    offsets [E+1] int32). Pair p = t·k + j; rows offsets[e]..offsets[e+1]-1 hold expert e's kept
    pairs in pair order. An expert index outside [0, E) counts as dropped.
    """
    P = expert.numel()
    dev = expert.device
    if P >= 2**31:
        raise ValueError(f"moe_mlp: T·k = {P} pairs exceeds the int32 index range")
    expert = expert.reshape(-1)
    slot = slot.reshape(-1)
    pair_of_row = torch.empty((P,), dtype=torch.int32, device=dev)
    row_of_pair = torch.empty((P,), dtype=torch.int32, device=dev)
    offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=dev)
    if P == 0:
        offsets.zero_()
        return pair_of_row, row_of_pair, offsets
    e_p2 = max(2, triton.next_power_of_2(num_experts))
    block_p = _row_block(e_p2)
    NBP = triton.cdiv(P, block_p)
    hist = torch.empty((NBP, e_p2), dtype=torch.int32, device=dev)
    start = torch.empty_like(hist)
    _dispatch_hist_kernel[(NBP,)](expert, slot, hist, P, num_experts, BLOCK_P=block_p, E_P2=e_p2)
    _dispatch_scan_kernel[(1,)](hist, start, offsets, NBP, num_experts, BLOCK_R=_SCAN_ROWS, E_P2=e_p2)
    _dispatch_scatter_kernel[(NBP,)](
        expert, slot, start, row_of_pair, pair_of_row, P, num_experts, BLOCK_P=block_p, E_P2=e_p2,
    )
    return pair_of_row, row_of_pair, offsets
