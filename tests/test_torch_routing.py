"""Top-k routing: the oracle against hand-computed cases, the torch backend against the oracle,
the ops layer's validation, and V-MoE's auxiliary loss (docs/design.md §2.1)."""

import math

import pytest
import torch

import m2mkd_fast as mk
import m2mkd_fast.ops.routing as ops_routing
from m2mkd_fast.reference import routing as ref
from m2mkd_fast.routing_result import expert_capacity
from m2mkd_fast.torch_backend import routing as fast
from tolerance import assert_close_to_reference


def _route(impl, *args, **kwargs):
    return impl.route(*args, **kwargs)


IMPLS = [pytest.param(ref, id="oracle"), pytest.param(fast, id="torch")]


# ----------------------------------------------------------------------------- capacity
def test_capacity_formula():
    capacity_fn = expert_capacity  # the one formula every implementation calls
    # (S·k)·cf/E = 100·2.2/11 = 20.000000000000004 → 21 → 24 (not 20).
    assert capacity_fn(50, 2, 2.2, 11) == 24
    assert capacity_fn(100, 1, 2.2, 11) == 24
    assert capacity_fn(8, 2, 1.0, 4) == 4  # exactly 4
    assert capacity_fn(5, 1, 1.0, 4) == 4  # ceil(1.25) = 2 → 4
    assert capacity_fn(1576, 2, 1.05, 8) == 416  # V-MoE-B pre-training: 413.7 → 414 → 416
    assert capacity_fn(4616, 2, 1.5, 8) == 1732  # fine-tuning: 1731 → 1732
    assert capacity_fn(10, 2, None, 4) is None
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor"):
            capacity_fn(10, 2, bad, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_reported_by_route(impl):
    logits = torch.randn(100, 11)
    assert impl.route(logits, 1, capacity_factor=2.2).capacity == 24
    assert impl.route(logits, 1).capacity is None
    assert impl.route(logits, 2, capacity_factor=1.0, group_size=25).capacity == 8  # ceil(50/11)=5 → 8


@pytest.mark.parametrize("impl", ["oracle"] + mk.available_backends("cpu"))
@pytest.mark.parametrize("S,k,cf,E,expected", [(50, 2, 2.2, 5, 48), (40, 2, 1.05, 3, 28)])
def test_capacity_follows_the_evaluation_order(impl, S, k, cf, E, expected):
    """(S·k)·cf/E on floats: 100·2.2/5 = 44.00000000000001 → 45 → 48 (exact arithmetic gives 44);
    80·1.05/3 = 28.0 → 28 (80/3·1.05 gives 28.000000000000004 → 32)."""
    logits = torch.randn(S, E)
    r = ref.route(logits, k, capacity_factor=cf) if impl == "oracle" else mk.ops.route(logits, k, capacity_factor=cf, backend=impl)
    assert r.capacity == expected
    assert r.slot.max() < expected


# ------------------------------------------------------------------------ expert choice
@pytest.mark.parametrize("impl", IMPLS)
def test_vmoe_gate_hand_computed(impl):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, -1.0]])
    r = impl.route(logits, 2)
    g = torch.softmax(logits, -1)
    assert r.expert.tolist() == [[1, 2], [2, 0]]
    torch.testing.assert_close(r.weight, torch.stack([g[0, [1, 2]], g[1, [2, 0]]]))
    assert r.weight.sum(-1).lt(1).all()  # not renormalised over the k
    # k-major: token 1's FIRST choice (expert 2) takes slot 0 before token 0's second choice.
    assert r.slot.tolist() == [[0, 1], [0, 0]]
    assert r.counts.tolist() == [1, 1, 2, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_naive_gate_hand_computed(impl):
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    r = impl.route(logits, 2, gate="naive")
    assert r.expert.tolist() == [[1, 2]]
    e = math.e
    torch.testing.assert_close(r.weight, torch.tensor([[e / (1 + e), 1 / (1 + e)]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_lower_index(impl):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [5.0, 1.0, 5.0, 5.0]])
    for gate in ("vmoe", "naive"):
        r = impl.route(logits, 3, gate=gate)
        assert r.expert.tolist() == [[0, 1, 2], [1, 2, 3], [0, 2, 3]], gate


@pytest.mark.parametrize("impl", IMPLS)
def test_vmoe_ranks_softmax_values_not_logits(impl):
    # 0 and 1e-8 are distinct float32 logits whose softmax values round to the same float32:
    # the vmoe gate sees a tie (→ expert 0 first), the naive gate ranks the logits (→ 1 first).
    logits = torch.tensor([[0.0, 1e-8, -30.0]])
    g = torch.softmax(logits, -1)
    assert g[0, 0] == g[0, 1] and logits[0, 0] != logits[0, 1]
    assert impl.route(logits, 2, gate="vmoe").expert.tolist() == [[0, 1]]
    assert impl.route(logits, 2, gate="naive").expert.tolist() == [[1, 0]]


# ------------------------------------------------------------------------------ slots
def _two_choice_logits(first, second, top=None, E=4):
    """Logits whose top-1 is `first[t]` (logit top[t], default 3) and top-2 `second[t]` (2)."""
    T = len(first)
    logits = torch.zeros(T, E)
    for t in range(T):
        logits[t, first[t]] = 3.0 if top is None else top[t]
        logits[t, second[t]] = 2.0
    return logits


FIRST = [0, 0, 0, 0, 0, 1, 1, 1]
SECOND = [2, 2, 2, 2, 3, 0, 0, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["vmoe", "naive"])
def test_k_major_slots_and_drops(impl, gate):
    # S=8, k=2, cf=1, E=4 → C = ceil(16/4) = 4. Round 1 fills expert 0 with tokens 0-3 and drops
    # token 4; round 2 drops tokens 5-7 (expert 0 full) but keeps token 4's second choice.
    r = impl.route(_two_choice_logits(FIRST, SECOND), 2, gate=gate, capacity_factor=1.0)
    assert r.capacity == 4
    assert r.expert.tolist() == [[f, s] for f, s in zip(FIRST, SECOND)]
    assert r.slot.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [-1, 0], [0, -1], [1, -1], [2, -1]]
    assert r.counts.tolist() == [4, 3, 4, 1]
    assert r.kept.sum().item() == 12
    assert (r.weight > 0).all()  # dropped pairs keep their gate value (they contribute nothing)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_priority_order(impl):
    # Top-1 logits give the priority order 4, 7, 6, 5, 3, 2, 1, 0 (same order in both rounds).
    top = [3.1, 3.2, 3.3, 3.4, 3.8, 3.5, 3.6, 3.7]
    logits = _two_choice_logits(FIRST, SECOND, top)
    r = impl.route(logits, 2, capacity_factor=1.0, batch_priority=True)
    # Round 1: expert 0 ← 4, 3, 2, 1 (token 0 dropped); expert 1 ← 7, 6, 5.
    # Round 2: 4 → expert 3 slot 0; 7, 6, 5 → expert 0 full; 3, 2, 1, 0 → expert 2 slots 0..3.
    assert r.slot.tolist() == [[-1, 3], [3, 2], [2, 1], [1, 0], [0, 0], [2, -1], [1, -1], [0, -1]]
    assert r.counts.tolist() == [4, 3, 4, 1]
    without = impl.route(logits, 2, capacity_factor=1.0)
    assert without.slot.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [-1, 0], [0, -1], [1, -1], [2, -1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_are_independent(impl):
    one = _two_choice_logits(FIRST, SECOND)
    logits = torch.cat([one, one.flip(0)])
    r = impl.route(logits, 2, capacity_factor=1.0, group_size=8)
    assert r.capacity == 4
    a = impl.route(one, 2, capacity_factor=1.0)
    b = impl.route(one.flip(0), 2, capacity_factor=1.0)
    assert torch.equal(r.slot, torch.cat([a.slot, b.slot]))
    assert torch.equal(r.counts, a.counts + b.counts)
    # One group of 16 (C = 8) routes differently: slots run on across the halves.
    whole = impl.route(logits, 2, capacity_factor=1.0)
    assert whole.capacity == 8 and whole.slot[8:].max() > 3


@pytest.mark.parametrize("impl", IMPLS)
def test_dropless_slots_are_dense(impl):
    logits = torch.randn(37, 5)
    r = impl.route(logits, 3)
    assert r.capacity is None and r.kept.all()
    for e in range(5):
        slots = sorted(r.slot[r.expert == e].tolist())
        assert slots == list(range(len(slots)))
        assert r.counts[e] == len(slots)
    assert r.counts.sum() == 37 * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    r = impl.route(torch.zeros(0, 4), 2, capacity_factor=1.0)
    assert r.expert.shape == r.slot.shape == r.weight.shape == (0, 2)
    assert r.counts.tolist() == [0, 0, 0, 0] and r.capacity == 0
    r = impl.route(torch.zeros(0, 4), 2, capacity_factor=1.0, group_size=4)
    assert r.counts.tolist() == [0, 0, 0, 0] and r.capacity == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_group_size_must_divide(impl):
    with pytest.raises(ValueError, match="group_size=3"):
        impl.route(torch.randn(8, 4), 2, group_size=3)


# -------------------------------------------------------------- torch backend vs oracle
CASES = [
    # T, E, k, capacity_factor, batch_priority, group_size
    (1, 1, 1, None, False, None),
    (1, 4, 4, 1.0, True, None),
    (7, 3, 2, 0.5, False, None),
    (7, 1, 1, 1.0, True, 7),
    (59, 8, 2, 1.05, True, None),
    (59, 5, 5, None, False, 59),
    (111, 8, 2, 0.7, True, 37),
    (111, 11, 3, 2.2, False, 3),
    (96, 16, 1, 0.25, True, 8),
    (64, 6, 2, None, True, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["vmoe", "naive"])
@pytest.mark.parametrize("T,E,k,cf,bpr,gs", CASES)
def test_torch_backend_matches_oracle(T, E, k, cf, bpr, gs, gate, dtype):
    base = torch.randn(T, 2 * E) * 3
    if T % 2:
        base = base.round()  # plenty of exact ties
    logits = base[:, ::2].to(dtype).requires_grad_()  # non-contiguous
    logits_ref = logits.detach().clone().requires_grad_()
    a = fast.route(logits, k, gate, cf, bpr, gs)
    b = ref.route(logits_ref, k, gate, cf, bpr, gs)
    assert a.capacity == b.capacity
    for field in ("expert", "slot", "counts"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.expert.dtype == a.slot.dtype == a.counts.dtype == torch.int64
    assert a.weight.dtype == dtype
    # Weights (and their gradients) against float64 at the same chosen experts.
    l64 = logits.detach().double().requires_grad_()
    scores = torch.softmax(l64, -1) if gate == "vmoe" else l64
    w64 = scores.gather(1, a.expert)
    w64 = w64 if gate == "vmoe" else torch.softmax(w64, -1)
    assert_close_to_reference(a.weight, w64, b.weight, name="weight")
    grad = torch.randn_like(a.weight.float())
    (g,) = torch.autograd.grad(a.weight, logits, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(b.weight, logits_ref, grad.to(dtype))
    (g64,) = torch.autograd.grad(w64, l64, grad.double())
    assert_close_to_reference(g, g64, g_ref, name="d weight / d logits")


def test_torch_backend_random_sweep_matches_oracle():
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        E = int(torch.randint(1, 10, (), generator=gen))
        k = int(torch.randint(1, E + 1, (), generator=gen))
        S = int(torch.randint(1, 20, (), generator=gen))
        T = S * int(torch.randint(0, 4, (), generator=gen))
        logits = (torch.randn(T, E, generator=gen) * 2).round(decimals=1)
        cf = [None, 0.3, 1.0, 1.25][int(torch.randint(0, 4, (), generator=gen))]
        bpr = bool(torch.randint(0, 2, (), generator=gen))
        gate = ["vmoe", "naive"][int(torch.randint(0, 2, (), generator=gen))]
        a = fast.route(logits, k, gate, cf, bpr, S)
        b = ref.route(logits, k, gate, cf, bpr, S)
        assert a.capacity == b.capacity
        for field in ("expert", "slot", "counts", "weight"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (field, T, E, k, S, cf, bpr, gate)


def test_torch_route_compiles_fullgraph():
    torch._dynamo.reset()

    def f(logits):
        r = fast.route(logits, 2, "vmoe", 1.0, True, 8)
        return r.expert, r.weight, r.slot, r.counts

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    logits = torch.randn(24, 4)
    (e, w, s, c), (e0, w0, s0, c0) = compiled(logits), f(logits)
    assert torch.equal(e, e0) and torch.equal(s, s0) and torch.equal(c, c0)
    torch.testing.assert_close(w, w0)  # inductor's fused softmax may differ in the last bit


# ------------------------------------------------------------------------------- ops
def test_ops_route_dispatches_and_matches_oracle():
    logits = torch.randn(16, 4)
    a = ops_routing.route(logits, 2, capacity_factor=1.0, batch_priority=True, group_size=8, backend="torch")
    b = ref.route(logits, 2, capacity_factor=1.0, batch_priority=True, group_size=8)
    for field in ("expert", "slot", "counts", "weight"):
        assert torch.equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(logits=torch.randn(8)), ValueError, r"logits must be 2-D \[T, E\], got shape \(8,\)"),
        (dict(logits=torch.randn(2, 8, 4)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.ones(8, 4, dtype=torch.long)), TypeError, "logits must be a floating-point tensor"),
        (dict(logits=[[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.randn(8, 2), k=3), ValueError, "k=3 > num_experts=2"),
        (dict(k=0), ValueError, "k=0 < 1"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(gate="topk"), ValueError, "gate must be one of"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be a finite number > 0"),
        (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
        (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
        (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
        (dict(capacity_factor="1.0"), TypeError, "capacity_factor must be a float"),
        (dict(group_size=3), ValueError, "group_size=3 must divide the number of tokens T=8"),
        (dict(group_size=0), ValueError, "group_size=0 < 1"),
        (dict(batch_priority=1), TypeError, "batch_priority must be a bool"),
        (dict(logits=torch.tensor([[0.0, float("nan")]] * 8)), ValueError, "logits contains NaN or infinite"),
        (dict(logits=torch.tensor([[0.0, float("inf")]] * 8)), ValueError, "logits contains NaN or infinite"),
    ],
)
def test_ops_route_rejects_bad_inputs(kwargs, error, message):
    args = dict(logits=torch.randn(8, 4), k=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ops_routing.route(**args)


# ---------------------------------------------------------------------------- aux loss
def _phi_upper(z):
    return 0.5 * math.erfc(z / math.sqrt(2))  # 1 − Φ(z)


def _cv2(v):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return var / mean**2


def _hand_aux(clean, noisy, k, noise_std, training):
    E = len(clean[0])
    importance = [0.0] * E
    for row in clean:
        z = sum(math.exp(v) for v in row)
        for e, v in enumerate(row):
            importance[e] += math.exp(v) / z
    loss = 0.005 * _cv2(importance)
    if training:
        sigma = noise_std / E
        load = [0.0] * E
        for row_c, row_n in zip(clean, noisy):
            tau = sorted(row_n, reverse=True)[k - 1]
            for e in range(E):
                load[e] += _phi_upper((tau - row_c[e]) / sigma) / len(clean)
        loss += 0.005 * _cv2(load)
    return loss


AUX_IMPLS = [pytest.param(ref.vmoe_aux_loss, id="oracle"), pytest.param(ops_routing.vmoe_aux_loss, id="ops")]


@pytest.mark.parametrize("aux", AUX_IMPLS)
def test_aux_loss_hand_computed(aux):
    clean = [[0.0, 0.0, 0.3], [math.log(3.0), 0.0, -0.5], [0.2, 1.0, 0.1]]
    noisy = [[0.1, -0.1, 0.4], [1.0, 0.2, -0.3], [0.5, 0.9, 0.0]]
    c, n = torch.tensor(clean, dtype=torch.float64), torch.tensor(noisy, dtype=torch.float64)
    for k in (1, 2):
        want = _hand_aux(clean, noisy, k, 1.0, True)
        assert aux(c, n, k, 1.0).item() == pytest.approx(want, rel=1e-12)
    want_eval = _hand_aux(clean, noisy, 1, 1.0, False)
    assert aux(c, None, 1, 1.0, training=False).item() == pytest.approx(want_eval, rel=1e-12)
    assert aux(c, n, 1, 0.0).item() == pytest.approx(want_eval, rel=1e-12)  # no noise → no load term
    # Two groups: the mean of the per-group losses.
    c2, n2 = torch.cat([c, c.flip(0) * 2]), torch.cat([n, n.flip(0) * 2])
    want2 = 0.5 * (_hand_aux(clean, noisy, 2, 2.0, True) + _hand_aux((c.flip(0) * 2).tolist(), (n.flip(0) * 2).tolist(), 2, 2.0, True))
    assert aux(c2, n2, 2, 2.0, group_size=3).item() == pytest.approx(want2, rel=1e-12)


def test_aux_loss_fast_matches_oracle_with_gradients():
    clean = torch.randn(24, 6, dtype=torch.float64, requires_grad=True)
    noisy = (clean.detach() + 0.3 * torch.randn(24, 6, dtype=torch.float64)).requires_grad_()
    for training in (True, False):
        a = ops_routing.vmoe_aux_loss(clean, noisy, 2, 1.0, group_size=8, training=training)
        b = ref.vmoe_aux_loss(clean, noisy, 2, 1.0, group_size=8, training=training)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        ga = torch.autograd.grad(a, [clean, noisy], allow_unused=True)
        gb = torch.autograd.grad(b, [clean, noisy], allow_unused=True)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    c, n = clean[:8, :3].detach().requires_grad_(), noisy[:8, :3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, n: ops_routing.vmoe_aux_loss(c, n, 2, 1.0, group_size=4), (c, n))


def test_aux_loss_edge_cases_and_validation():
    assert ops_routing.vmoe_aux_loss(torch.zeros(0, 4), torch.zeros(0, 4), 2, 1.0).item() == 0.0
    assert ops_routing.vmoe_aux_loss(torch.randn(5, 1), torch.randn(5, 1), 1, 1.0).item() == 0.0  # E=1: CV=0
    balanced = torch.zeros(8, 4)
    assert ops_routing.vmoe_aux_loss(balanced, balanced, 2, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="k=5 > num_experts=4"):
        ops_routing.vmoe_aux_loss(balanced, balanced, 5, 1.0)
    with pytest.raises(ValueError, match="noisy_logits must have the shape"):
        ops_routing.vmoe_aux_loss(balanced, None, 2, 1.0)
    with pytest.raises(ValueError, match="group_size=3"):
        ops_routing.vmoe_aux_loss(balanced, balanced, 2, 1.0, group_size=3)
    with pytest.raises(ValueError, match="noise_std"):
        ops_routing.vmoe_aux_loss(balanced, balanced, 2, -1.0)
