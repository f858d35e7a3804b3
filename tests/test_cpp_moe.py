"""C++ grouped expert MLP (m2mkd_fast.cpp_backend.moe) against the oracle: output and the
gradients of x, the routing weights, w1, b1, w2, b2; both activations, capacities with dropped
pairs, experts without tokens, no biases, bf16, non-contiguous inputs, empty input, float64
gradcheck, thread counts, opcheck."""

import pytest
import torch

_C = pytest.importorskip("m2mkd_fast._C", reason="the C++ extension m2mkd_fast._C is not built")

import m2mkd_fast as mk  # noqa: E402
from m2mkd_fast.cpp_backend.moe import moe_mlp  # noqa: E402
from m2mkd_fast.reference import moe as ref_moe  # noqa: E402
from m2mkd_fast.reference import route  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

NAMES = ("x", "weight", "w1", "b1", "w2", "b2")


def make_case(T, d, h, E, k, capacity_factor=None, bias=True, skew=False):
    logits = torch.randn(T, E)
    if skew:  # expert 0 and the last expert never chosen
        logits[:, 0] -= 50
        logits[:, -1] -= 50
    r = route(logits, k, capacity_factor=capacity_factor)
    params = [torch.randn(T, d), r.weight.detach(), torch.randn(E, d, h) / d**0.5, 0.1 * torch.randn(E, h),
              torch.randn(E, h, d) / h**0.5, 0.1 * torch.randn(E, d)]
    if not bias:
        params[3] = params[5] = None
    return r, params


def run(impl, r, params, dtype, grad_out, activation):
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in params]
    y = impl(leaves[0], r._replace(weight=leaves[1]), leaves[2], leaves[3], leaves[4], leaves[5], activation)
    live = [t for t in leaves if t is not None]
    return y.detach(), torch.autograd.grad(y, live, grad_out.to(y.dtype))


def check_against_oracle(r, params, dtype=torch.float32, activation="gelu"):
    grad_out = torch.randn(params[0].shape)
    y, g = run(moe_mlp, r, params, dtype, grad_out, activation)
    y64, g64 = run(ref_moe.moe_mlp, r, [None if t is None else t.double() for t in params], torch.float64, grad_out, activation)
    yr, gr = run(ref_moe.moe_mlp, r, params, dtype, grad_out, activation)
    assert y.dtype == dtype
    assert_close_to_reference(y, y64, yr, name="output")
    names = [n for n, t in zip(NAMES, params) if t is not None]
    for name, a, b, c in zip(names, g, g64, gr):
        assert_close_to_reference(a, b, c, name=f"grad {name}")
    return g


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("shape", [(111, 16, 40, 4, 2), (59, 7, 13, 5, 1), (1, 3, 4, 1, 1), (300, 24, 48, 8, 2)])
def test_matches_oracle_fp32(shape, capacity_factor, activation):
    r, params = make_case(*shape, capacity_factor=capacity_factor)
    if capacity_factor is not None:
        assert (r.slot < 0).any() or shape[0] < 4
    check_against_oracle(r, params, activation=activation)


def test_dropped_pairs_get_zero_weight_gradient_and_idle_experts_zero_grads():
    r, params = make_case(64, 8, 16, 6, 2, capacity_factor=0.5, skew=True)
    g = check_against_oracle(r, params)
    assert (r.slot < 0).any()
    assert (g[1][r.slot < 0] == 0).all()
    for grad_param in (g[2], g[3], g[4], g[5]):
        assert (grad_param[0] == 0).all() and (grad_param[-1] == 0).all()


def test_without_biases():
    r, params = make_case(50, 8, 12, 4, 2, bias=False)
    check_against_oracle(r, params)


def test_bf16():
    r, params = make_case(64, 16, 32, 4, 2)
    check_against_oracle(r, params, dtype=torch.bfloat16)


def test_non_contiguous_inputs():
    r, params = make_case(40, 8, 12, 4, 2)
    x, weight, w1, b1, w2, b2 = params
    x_nc = x.t().contiguous().t()
    w1_nc = w1.transpose(1, 2).contiguous().transpose(1, 2)
    r_nc = r._replace(weight=weight.t().contiguous().t())
    assert not x_nc.is_contiguous() and not w1_nc.is_contiguous()
    torch.testing.assert_close(moe_mlp(x_nc, r_nc, w1_nc, b1, w2, b2), moe_mlp(x, r, w1, b1, w2, b2), rtol=0, atol=0)


def test_empty_input():
    r, params = make_case(0, 4, 6, 3, 2)
    leaves = [t.requires_grad_() for t in params]
    y = moe_mlp(leaves[0], r._replace(weight=leaves[1]), *leaves[2:])
    assert y.shape == (0, 4)
    y.sum().backward()
    assert (leaves[2].grad == 0).all() and (leaves[4].grad == 0).all()


def test_no_grad_forward_matches():
    r, params = make_case(30, 8, 12, 4, 2)
    with torch.no_grad():
        y0 = moe_mlp(params[0], r, *params[2:])
    torch.testing.assert_close(y0, moe_mlp(params[0], r, *params[2:]), rtol=0, atol=0)


def test_float64_gradcheck():
    r, params = make_case(12, 3, 5, 3, 2, capacity_factor=0.7)
    leaves = tuple(t.double().requires_grad_() for t in params)

    def fn(x, weight, w1, b1, w2, b2):
        return moe_mlp(x, r._replace(weight=weight), w1, b1, w2, b2)

    assert torch.autograd.gradcheck(fn, leaves)


def test_independent_of_thread_count():
    r, params = make_case(500, 16, 32, 8, 2)
    grad_out = torch.randn(500, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = run(moe_mlp, r, params, torch.float32, grad_out, "gelu")
        torch.set_num_threads(2)
        y2, g2 = run(moe_mlp, r, params, torch.float32, grad_out, "gelu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_through_ops():
    r, params = make_case(20, 4, 6, 3, 2)
    x, _, w1, b1, w2, b2 = params
    torch.testing.assert_close(mk.ops.moe_mlp(x, r, w1, b1, w2, b2, backend="cpp"), moe_mlp(x, r, w1, b1, w2, b2), rtol=0, atol=0)


def test_bad_inputs():
    r, params = make_case(10, 4, 6, 3, 2)
    x, weight, w1, b1, w2, b2 = params
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_mlp(x, r, w1, b1, w2, b2, activation="relu")
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.m2mkd_fast.moe_cpp_fwd(x, r.expert + 5, r.slot, weight, w1, b1, w2, b2, "none", True)
    with pytest.raises(RuntimeError, match="w1 / w2 shapes"):
        torch.ops.m2mkd_fast.moe_cpp_fwd(x, r.expert, r.slot, weight, w1, b1, w2[:, :2], b2, "none", True)
