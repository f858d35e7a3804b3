"""C++ folded read-in attention (m2mkd_fast.cpp_backend.readin) against the oracle: the output
and all seven gradients, odd shapes (several row blocks, V = 1), bf16, non-contiguous inputs,
empty batch / receivers, float64 gradcheck, thread counts, opcheck."""

import pytest
import torch

_C = pytest.importorskip("m2mkd_fast._C", reason="the C++ extension m2mkd_fast._C is not built")

import m2mkd_fast as mk  # noqa: E402
from m2mkd_fast.cpp_backend.readin import readin_attention  # noqa: E402
from m2mkd_fast.reference import readin_attention as ref_readin  # noqa: E402
from m2mkd_fast.reference import readin_attention_materialised  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

NAMES = ("q", "x", "w_k", "w_v", "s_k", "s_v", "b_v")


def make_inputs(B, U, V, Din, H, C, bias=True):
    return [
        torch.randn(B, U, H, C),
        torch.randn(B, V, Din),
        torch.randn(H, C, Din) / Din**0.5,
        torch.randn(H, C, Din) / Din**0.5,
        1 + 0.3 * torch.randn(U, Din),
        1 + 0.3 * torch.randn(U, Din),
    ] + ([torch.randn(H, C)] if bias else [])


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def check_against_oracle(inputs, dtype):
    base = [t.to(dtype) for t in inputs]
    grad_out = torch.randn(inputs[0].shape)
    out, g = grads(readin_attention, base, grad_out)
    out64, g64 = grads(ref_readin, [t.double() for t in inputs], grad_out)
    out_ref, g_ref = grads(ref_readin, base, grad_out)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, out_ref, name="output")
    for name, a, b, c in zip(NAMES, g, g64, g_ref):
        assert_close_to_reference(a, b, c, name=f"grad {name}")


@pytest.mark.parametrize(
    "shape",
    [
        (2, 64, 64, 256, 6, 64),  # Tiny-ImageNet read-in shapes (B small)
        (2, 5, 7, 16, 3, 4),
        (2, 33, 300, 20, 4, 8),  # U·H = 132 rows > one block of 32768 / 300 = 109 rows
        (1, 1, 1, 3, 1, 1),
        (3, 7, 59, 111, 2, 5),
    ],
)
def test_matches_oracle_fp32(shape):
    check_against_oracle(make_inputs(*shape), torch.float32)


def test_without_value_bias():
    inputs = make_inputs(2, 9, 13, 24, 2, 8, bias=False)
    check_against_oracle(inputs, torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    readin_attention(*leaves, None).sum().backward()
    assert all(t.grad is not None for t in leaves)


def test_matches_oracle_bf16():
    check_against_oracle(make_inputs(2, 11, 17, 32, 2, 16), torch.bfloat16)


def test_matches_materialised_seed_formulation():
    inputs = [t.double() for t in make_inputs(2, 6, 9, 12, 2, 4)]
    torch.testing.assert_close(readin_attention(*inputs), readin_attention_materialised(*inputs), rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs():
    q, x, w_k, w_v, s_k, s_v, b_v = make_inputs(2, 9, 11, 16, 2, 8)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
    w_k_nc = w_k.transpose(1, 2).contiguous().transpose(1, 2)
    s_k_nc = s_k.t().contiguous().t()
    args = (q_nc, x_nc, w_k_nc, w_v, s_k_nc, s_v, b_v)
    assert not any(t.is_contiguous() for t in (q_nc, x_nc, w_k_nc)) and not s_k_nc.is_contiguous()
    torch.testing.assert_close(readin_attention(*args), readin_attention(*[t.contiguous() for t in args]), rtol=0, atol=0)
    check_against_oracle(list(args), torch.float32)


def test_empty_batch_and_receivers():
    q, x, w_k, w_v, s_k, s_v, b_v = make_inputs(2, 3, 4, 8, 2, 3)
    for args in [(q[:0], x[:0], w_k, w_v, s_k, s_v, b_v), (q[:, :0], x, w_k, w_v, s_k[:0], s_v[:0], b_v)]:
        leaves = [t.clone().requires_grad_() for t in args]
        out = readin_attention(*leaves)
        assert out.shape == args[0].shape
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in leaves)
        if args[0].shape[1] == 0:  # no receivers: nothing attends to x
            assert torch.equal(leaves[1].grad, torch.zeros_like(x))


def test_float64_gradcheck():
    inputs = tuple(t.double().requires_grad_() for t in make_inputs(2, 3, 4, 5, 2, 3))
    assert torch.autograd.gradcheck(readin_attention, inputs)


def test_independent_of_thread_count():
    inputs = make_inputs(4, 16, 20, 32, 3, 8)
    grad_out = torch.randn(inputs[0].shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, g1 = grads(readin_attention, inputs, grad_out)
        torch.set_num_threads(2)
        out2, g2 = grads(readin_attention, inputs, grad_out)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out1, out2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["baseline", "avx512"])
def test_instruction_set_paths(isa):
    previous = _C.active_isa()
    try:
        _C.set_isa(isa)
        check_against_oracle(make_inputs(2, 7, 37, 40, 3, 8), torch.float32)
    finally:
        _C.set_isa(previous)


def test_dispatch_through_ops():
    inputs = make_inputs(2, 4, 5, 8, 2, 4)
    torch.testing.assert_close(mk.ops.readin_attention(*inputs, backend="cpp"), readin_attention(*inputs), rtol=0, atol=0)


def test_kernel_rejects_bad_inputs():
    q, x, w_k, w_v, s_k, s_v, b_v = make_inputs(2, 3, 4, 8, 2, 3)
    op = torch.ops.m2mkd_fast.readin_cpp_fwd
    with pytest.raises(RuntimeError, match="w_k, w_v must be \\[H, C, Din\\]"):
        op(q, x, w_k[:1], w_v, s_k, s_v, b_v)
    with pytest.raises(RuntimeError, match="s_k, s_v must be \\[U, Din\\]"):
        op(q, x, w_k, w_v, s_k[:2], s_v, b_v)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(q, x.double(), w_k, w_v, s_k, s_v, b_v)
    with pytest.raises(RuntimeError, match="at least one token"):
        op(q, x[:, :0], w_k, w_v, s_k, s_v, b_v)
