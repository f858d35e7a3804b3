"""C++ routing (m2mkd_fast.cpp_backend.routing) against the oracle: identical integers (expert,
slot, counts, capacity) and weights for both gates, capacities, BPR, groups, dtypes with ties,
tiny / empty inputs, thread counts; weight gradients; the custom ops' checks."""

import pytest
import torch

_C = pytest.importorskip("m2mkd_fast._C", reason="the C++ extension m2mkd_fast._C is not built")

import m2mkd_fast as mk  # noqa: E402
from m2mkd_fast.cpp_backend import routing as cpp  # noqa: E402
from m2mkd_fast.reference import routing as ref  # noqa: E402


def assert_same(a, b, exact_weight=True):
    assert torch.equal(a.expert, b.expert), "expert"
    assert torch.equal(a.slot, b.slot), "slot"
    assert torch.equal(a.counts, b.counts), "counts"
    assert a.capacity == b.capacity, "capacity"
    assert a.weight.dtype == b.weight.dtype
    if exact_weight:
        assert torch.equal(a.weight, b.weight), "weight"
    else:
        torch.testing.assert_close(a.weight, b.weight)


def logits_with_ties(T, E, dtype):
    logits = torch.randn(T, E)
    logits[::3] = (logits[::3] * 2).round() / 2  # many exact ties
    logits[1::7, : E // 2] = logits[1::7, :1]
    return logits.to(dtype)


@pytest.mark.parametrize("gate", ["vmoe", "naive"])
@pytest.mark.parametrize("capacity_factor", [None, 1.05, 0.5, 2.2])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("group_size", [None, 37])
def test_identical_to_oracle(gate, capacity_factor, batch_priority, group_size):
    for dtype in (torch.float32, torch.bfloat16):
        logits = logits_with_ties(111, 11, dtype)
        for k in (1, 2, 11):
            args = (logits, k, gate, capacity_factor, batch_priority, group_size)
            assert_same(cpp.route(*args), ref.route(*args))


def test_float64_and_float16():
    for dtype in (torch.float64, torch.float16):
        logits = logits_with_ties(64, 8, dtype)
        assert_same(cpp.route(logits, 2, "vmoe", 1.0, True, 16), ref.route(logits, 2, "vmoe", 1.0, True, 16))


def test_softmax_ties_not_logit_order():
    # distinct logits whose softmax values round to one float32: a tie for the vmoe gate
    logits = torch.tensor([[0.0, 1e-8, -5.0]])
    assert cpp.route(logits, 1, "vmoe").expert.tolist() == [[0]]
    assert cpp.route(logits, 1, "naive").expert.tolist() == [[1]]


def test_small_and_empty_inputs():
    for T, E, k in [(1, 1, 1), (1, 5, 5), (7, 3, 2), (0, 4, 2)]:
        logits = torch.randn(T, E)
        for cf in (None, 1.0):
            assert_same(cpp.route(logits, k, "vmoe", cf), ref.route(logits, k, "vmoe", cf))
            assert_same(cpp.route(logits, k, "naive", cf, True), ref.route(logits, k, "naive", cf, True))


def test_v_moe_pretraining_shapes():
    logits = torch.randn(4 * 1576, 8)
    args = (logits, 2, "vmoe", 1.05, False, 1576)
    r = cpp.route(*args)
    assert_same(r, ref.route(*args))
    assert r.capacity == 416 and (r.slot < 416).all() and (r.slot >= 0).sum() == r.counts.sum()


@pytest.mark.parametrize("gate", ["vmoe", "naive"])
def test_weight_gradients_match_oracle(gate):
    logits = torch.randn(50, 6, dtype=torch.float64)
    grad = torch.randn(50, 2, dtype=torch.float64)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    cpp.route(a, 2, gate, 1.0).weight.backward(grad)
    ref.route(b, 2, gate, 1.0).weight.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: cpp.route(x, 2, gate).weight, (logits.clone().requires_grad_(),))


def test_independent_of_thread_count():
    logits = logits_with_ties(4096, 8, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = cpp.route(logits, 2, "vmoe", 1.05, True, 512)
        torch.set_num_threads(2)
        b = cpp.route(logits, 2, "vmoe", 1.05, True, 512)
    finally:
        torch.set_num_threads(threads)
    assert_same(a, b)


def test_dispatch_through_ops():
    logits = torch.randn(40, 5)
    assert_same(mk.ops.route(logits, 2, capacity_factor=1.0, backend="cpp"), ref.route(logits, 2, capacity_factor=1.0))


def test_kernel_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="k must satisfy 1 <= k <= E"):
        torch.ops.m2mkd_fast.routing_cpp_topk(torch.randn(3, 2), 3)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.m2mkd_fast.routing_cpp_slots(torch.tensor([[0, 4]]), None, 4, -1, 1)
    with pytest.raises(RuntimeError, match="must divide T"):
        torch.ops.m2mkd_fast.routing_cpp_slots(torch.zeros(5, 1, dtype=torch.long), None, 4, -1, 2)
    with pytest.raises(ValueError, match="group_size"):
        cpp.route(torch.randn(5, 3), 1, group_size=2)
    with pytest.raises(ValueError, match="capacity_factor"):
        cpp.route(torch.randn(5, 3), 1, capacity_factor=0.0)
