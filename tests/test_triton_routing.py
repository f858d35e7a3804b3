"""Triton top-k routing (kernels/routing.py, m2mkd_fast/triton_backend/routing.py).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before any kernel import).
Integer outputs (expert, slot, counts, capacity) must equal the oracle's
(m2mkd_fast.reference.routing) exactly; weights and the logits' gradient follow the tolerance
rule (tests/tolerance.py) against float64 at the same expert choice. Every call of the Triton op
runs with PyTorch's uninitialised-memory poisoning on (torch.empty → NaN / max int), so an output
element a kernel forgets to write fails the comparison.
"""


import pytest
import torch

from m2mkd_fast.reference.routing import route as ref_route
from poison import poisoned
from tolerance import assert_close_to_reference

triton = pytest.importorskip("triton")

from m2mkd_fast.kernels import routing as kern  # noqa: E402  (after conftest set TRITON_INTERPRET)
from m2mkd_fast.triton_backend import routing as tb  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights64(logits: torch.Tensor, expert: torch.Tensor, gate: str) -> torch.Tensor:
    """Float64 weights of the given expert choice (differentiable w.r.t. logits)."""
    l64 = logits.double()
    if gate == "vmoe":
        return torch.softmax(l64, -1).gather(1, expert)
    return torch.softmax(l64.gather(1, expert), -1)


def _check(logits, k, gate, cf=None, bpr=False, gs=None):
    """Triton route == oracle route: integers exactly, weights and d logits by the 2x rule."""
    leaf = logits.detach().clone().requires_grad_()
    with poisoned():
        r = tb.route(leaf, k, gate, cf, bpr, gs)
    ref_leaf = logits.detach().clone().requires_grad_()
    ref = ref_route(ref_leaf, k, gate, cf, bpr, gs)
    assert r.capacity == ref.capacity
    assert r.expert.dtype == r.slot.dtype == r.counts.dtype == torch.int64
    assert torch.equal(r.expert, ref.expert), "expert"
    assert torch.equal(r.slot, ref.slot), "slot"
    assert torch.equal(r.counts, ref.counts), "counts"
    assert r.weight.dtype == logits.dtype
    l64 = logits.detach().double().requires_grad_()
    w64 = _weights64(l64, ref.expert, gate)
    assert_close_to_reference(r.weight.detach(), w64.detach(), ref.weight.detach(), name="weight")
    if logits.shape[0] == 0:
        return r
    gw = torch.randn(r.weight.shape, dtype=torch.float64, device=logits.device)
    with poisoned():
        (g,) = torch.autograd.grad(r.weight, leaf, gw.to(logits.dtype))
    (g_ref,) = torch.autograd.grad(ref.weight, ref_leaf, gw.to(logits.dtype))
    (g64,) = torch.autograd.grad(w64, l64, gw)
    assert g.dtype == logits.dtype
    assert_close_to_reference(g, g64, g_ref, name="d logits")
    return r


# (T, E, k): one token, T below one block (32 under the interpreter), several blocks with a
# ragged last one, k = E, a non-power-of-two E
SHAPES = [(1, 1, 1), (7, 3, 2), (59, 4, 1), (111, 4, 2), (64, 3, 3)]
# (capacity_factor, batch_priority, group_size): dropless; capacity with drops; BPR with heavy
# drops; groups (capacity per group) with and without BPR
MODES = [(None, False, None), (1.0, False, None), (0.5, True, None), (1.0, False, "groups"), (0.8, True, "groups")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["vmoe", "naive"])
@pytest.mark.parametrize("cf,bpr,gs", MODES)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_route_matches_oracle(T, E, k, cf, bpr, gs, gate, dtype):
    if gs == "groups":  # several groups: 3, 4 (of 16 tokens) or T groups of one token
        gs = T // 3 if T % 3 == 0 else (16 if T % 16 == 0 else 1)
    logits = (torch.randn(T, E, device=DEVICE) * 2).to(dtype)
    _check(logits, k, gate, cf, bpr, gs)


@pytest.mark.parametrize("gate", ["vmoe", "naive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lower_index(gate, dtype):
    T, E = 40, 6
    logits = torch.randn(T, E, device=DEVICE).to(dtype)
    logits[:10] = 0.5  # every expert tied
    logits[10:20, 3] = logits[10:20, 1]  # a tie between two experts
    logits[25:35] = logits[20]  # identical rows: tied first-choice weights under BPR
    for cf, bpr in ((None, False), (0.5, True), (1.0, True)):
        r = _check(logits, 2, gate, cf, bpr)
    assert torch.equal(r.expert[:10], torch.tensor([[0, 1]] * 10, device=DEVICE))


def test_distinct_logits_rounding_to_equal_gates():
    # fp32: exp(-1e-8) rounds to 1, so experts 0 and 1 have equal gates: the lower index wins
    # although expert 1's logit is larger
    logits = torch.tensor([[0.0, 1e-8, -3.0], [1e-8, 0.0, -3.0]], device=DEVICE)
    r = _check(logits, 1, "vmoe")
    assert r.expert[:, 0].tolist() == [0, 0]
    r = _check(logits, 1, "naive")
    assert r.expert[:, 0].tolist() == [1, 0]


def test_capacity_on_python_floats():
    # (S·k)·cf/E with S·k = 100, cf = 2.2, E = 11 is 20.000000000000004 → 21 → 24, not 20
    logits = torch.randn(50, 11, device=DEVICE)
    logits[:, 0] += 10.0  # every first choice on expert 0: drops past 24
    r = _check(logits, 2, "vmoe", 2.2)
    assert r.capacity == 24
    assert r.counts[0].item() == 24


@pytest.mark.parametrize("cf,gs", [(None, None), (1.0, None), (1.0, 4)])
def test_empty_input(cf, gs):
    r = _check(torch.randn(0, 4, device=DEVICE), 2, "vmoe", cf, False, gs)
    assert r.expert.shape == r.slot.shape == r.weight.shape == (0, 2)
    assert r.counts.tolist() == [0, 0, 0, 0]


def test_noncontiguous_logits():
    base = torch.randn(8, 45, device=DEVICE) * 2
    _check(base.t(), 2, "vmoe", 1.0, True)  # a transposed view (unit stride along tokens)
    _check(base[:, ::3].t()[::2], 2, "naive", 1.0)  # strided in both dimensions


def test_rejects_bad_arguments():
    logits = torch.randn(6, 4, device=DEVICE)
    with pytest.raises(ValueError, match="gate"):
        tb.route(logits, 2, "top2")
    with pytest.raises(ValueError, match="k=5"):
        tb.route(logits, 5)
    with pytest.raises(ValueError, match="group_size"):
        tb.route(logits, 2, group_size=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        tb.route(logits, 2, capacity_factor=0.0)


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (53, 2, 5), (100, 3, 3)])
def test_dispatch_indices_is_a_stable_sort_by_expert(T, k, E):
    expert = torch.stack([torch.randperm(E, device=DEVICE)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    slot = torch.randint(0, 5, (T, k), device=DEVICE)
    slot[torch.rand(T, k, device=DEVICE) < 0.3] = -1  # some pairs dropped
    with poisoned():
        pair_of_row, row_of_pair, offsets = kern.dispatch_indices(expert, slot, E)
    flat_e, kept = expert.reshape(-1), slot.reshape(-1) >= 0
    want = [p for e in range(E) for p in range(T * k) if kept[p] and flat_e[p] == e]
    n = len(want)
    assert pair_of_row[:n].tolist() == want
    counts = torch.bincount(flat_e[kept], minlength=E)
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    expect_row = torch.full((T * k,), -1, dtype=torch.int32)
    expect_row[torch.tensor(want, dtype=torch.long)] = torch.arange(n, dtype=torch.int32)
    assert torch.equal(row_of_pair.cpu(), expect_row)


@pytest.mark.gpu
def test_route_does_not_synchronise_the_host():
    logits = torch.randn(4096, 8, device="cuda", requires_grad=True)
    tb.route(logits, 2, "vmoe", 1.05, True, 1024)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for bpr in (False, True):
            r = tb.route(logits, 2, "vmoe", 1.05, bpr, 1024)
            r.weight.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_through_ops_layer():
    from m2mkd_fast import ops

    logits = torch.randn(30, 5, device=DEVICE)
    r = ops.route(logits, 2, gate="vmoe", capacity_factor=1.0, batch_priority=True, group_size=10, backend="triton")
    ref = ref_route(logits, 2, "vmoe", 1.0, True, 10)
    assert torch.equal(r.expert, ref.expert) and torch.equal(r.slot, ref.slot) and torch.equal(r.counts, ref.counts)
    assert r.capacity == ref.capacity
