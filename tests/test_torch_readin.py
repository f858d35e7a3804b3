"""Read-in attention (docs/design.md §2.3): oracle forms, the torch backend, and the op's checks."""


import pytest
import torch

import m2mkd_fast as mk
from m2mkd_fast.reference.readin import readin_attention as ref_folded
from m2mkd_fast.reference.readin import readin_attention_materialised as ref_materialised
from m2mkd_fast.torch_backend.readin import readin_attention as torch_readin
from tolerance import assert_close_to_reference, grad_atol

NAMES = ["q", "x", "w_k", "w_v", "s_k", "s_v", "b_v"]


def _inputs(batch, receivers, senders, heads, head_dim, in_dim, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    tensors = [
        rnd(batch, receivers, heads, head_dim),
        rnd(batch, senders, in_dim),
        rnd(heads, head_dim, in_dim, scale=in_dim**-0.5 * 2),
        rnd(heads, head_dim, in_dim, scale=in_dim**-0.5),
        rnd(receivers, in_dim, scale=0.2, shift=1.0),
        rnd(receivers, in_dim, scale=0.2, shift=1.0),
        rnd(heads, head_dim) if bias else None,
    ]
    return tensors


def test_hand_computed_single_head():
    # U=1, H=1, C=1, Din=1, V=2: scores q·w_k·s_k·x_v / √1, value w_v·s_v·x_v + b_v
    q = torch.tensor([[[[2.0]]]], dtype=torch.float64)
    x = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    w_k = torch.tensor([[[0.5]]], dtype=torch.float64)
    w_v = torch.tensor([[[3.0]]], dtype=torch.float64)
    s_k = torch.tensor([[2.0]], dtype=torch.float64)
    s_v = torch.tensor([[0.5]], dtype=torch.float64)
    b_v = torch.tensor([[0.25]], dtype=torch.float64)
    a = torch.softmax(torch.tensor([2.0, -2.0], dtype=torch.float64), 0)
    expected = a[0] * (1.5 + 0.25) + a[1] * (-1.5 + 0.25)
    for fn in (ref_folded, ref_materialised, torch_readin):
        torch.testing.assert_close(fn(q, x, w_k, w_v, s_k, s_v, b_v).reshape(()), expected, rtol=0, atol=1e-14)
    # scale uses the head dim C of q, not Din: with C=4 the scores are halved
    q4 = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    q4[..., 0] = 2.0
    w_k4 = torch.zeros(1, 4, 1, dtype=torch.float64)
    w_k4[0, 0, 0] = 0.5
    w_v4 = torch.full((1, 4, 1), 3.0, dtype=torch.float64)
    a4 = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64), 0)
    expected4 = (a4[0] * 1.5 - a4[1] * 1.5).expand(4)
    for fn in (ref_folded, ref_materialised, torch_readin):
        torch.testing.assert_close(fn(q4, x, w_k4, w_v4, s_k, s_v).reshape(4), expected4, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4, 6), (1, 7, 1, 2, 3, 5)])
def test_folded_equals_materialised_even_with_a_key_bias(shape):
    tensors = _inputs(*shape)
    tensors = [t.requires_grad_() for t in tensors]
    b_k = torch.randn(shape[3], shape[4], dtype=torch.float64) * 3
    folded = ref_folded(*tensors)
    materialised = ref_materialised(*tensors, b_k=b_k)
    torch.testing.assert_close(folded, materialised, rtol=0, atol=1e-12)
    grad = torch.randn_like(folded)
    got = torch.autograd.grad(folded, tensors, grad)
    want = torch.autograd.grad(materialised, tensors, grad)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11, msg=name)


SHAPES = [  # B, U, V, H, C, Din
    (2, 7, 59, 3, 8, 24),
    (1, 59, 1, 2, 16, 7),
    (3, 1, 111, 1, 5, 33),
    (2, 111, 7, 6, 4, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_oracle_forward_and_all_grads(shape, dtype):
    with_bias = shape[0] != 1
    base = _inputs(*shape, bias=with_bias, seed=sum(shape))
    present = [(n, t) for n, t in zip(NAMES, base) if t is not None]

    def run(fn, dt):
        ts = [t.to(dt).requires_grad_() for _, t in present]
        args = ts + ([] if with_bias else [None])
        out = fn(*args)
        return out, ts

    out64, leaves64 = run(ref_folded, torch.float64)
    out_ref, leaves_ref = run(ref_folded, dtype)
    out, leaves = run(torch_readin, dtype)
    assert out.dtype == dtype and out.shape == out64.shape
    assert_close_to_reference(out, out64, out_ref, name="m")
    grad = torch.randn_like(out64)
    g64 = torch.autograd.grad(out64, leaves64, grad)
    g_ref = torch.autograd.grad(out_ref, leaves_ref, grad.to(dtype))
    g = torch.autograd.grad(out, leaves, grad.to(dtype))
    for (name, _), a, r64, r in zip(present, g, g64, g_ref):
        assert a.dtype == dtype
        assert_close_to_reference(a, r64, r, atol=grad_atol(r64, dtype), name=f"d{name}")


def test_non_contiguous_inputs():
    q, x, w_k, w_v, s_k, s_v, b_v = _inputs(2, 7, 9, 3, 4, 10)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B,U,H,C] with permuted strides
    x_nc = torch.stack([x, x], dim=-1).flatten(-2)[..., ::2]  # strided last dim
    w_k_nc = w_k.transpose(0, 1).contiguous().transpose(0, 1)
    s_k_nc = s_k.t().contiguous().t()
    assert not (q_nc.is_contiguous() or x_nc.is_contiguous() or w_k_nc.is_contiguous() or s_k_nc.is_contiguous())
    want = ref_folded(q, x, w_k, w_v, s_k, s_v, b_v)
    got = mk.ops.readin_attention(q_nc, x_nc, w_k_nc, w_v, s_k_nc, s_v, b_v, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gradcheck_float64():
    tensors = [t.requires_grad_() for t in _inputs(2, 3, 4, 2, 3, 5)]
    assert torch.autograd.gradcheck(torch_readin, tuple(tensors), fast_mode=True)
    assert torch.autograd.gradcheck(ref_materialised, tuple(tensors), fast_mode=True)
    small = [t.requires_grad_() for t in _inputs(1, 2, 3, 2, 2, 3)]
    assert torch.autograd.gradcheck(lambda *a: mk.ops.readin_attention(*a, backend="torch"), tuple(small))


def test_empty_batch_and_receivers():
    q, x, w_k, w_v, s_k, s_v, b_v = _inputs(2, 3, 4, 2, 3, 5)
    assert mk.ops.readin_attention(q[:0], x[:0], w_k, w_v, s_k, s_v, b_v, backend="torch").shape == (0, 3, 2, 3)
    assert mk.ops.readin_attention(q[:, :0], x, w_k, w_v, s_k[:0], s_v[:0], b_v, backend="torch").shape == (2, 0, 2, 3)


def test_op_dispatches_to_the_torch_backend():
    args = _inputs(2, 3, 4, 2, 3, 5)
    torch.testing.assert_close(mk.ops.readin_attention(*args, backend="torch"), torch_readin(*args), rtol=0, atol=0)
    with mk.use_backend("torch"):
        torch.testing.assert_close(mk.ops.readin_attention(*args), torch_readin(*args), rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    q, x, w_k, w_v, s_k, s_v, b_v = _inputs(2, 3, 4, 2, 3, 5)
    op = mk.ops.readin_attention
    cases = [
        ((q[0], x, w_k, w_v, s_k, s_v), ValueError, r"q must be \[B, U, H, C\]"),
        ((q, x[0], w_k, w_v, s_k, s_v), ValueError, r"x must be \[B, V, Din\]"),
        ((q, x[:1], w_k, w_v, s_k, s_v), ValueError, "x batch size 1 does not match q's 2"),
        ((q, x[:, :0], w_k, w_v, s_k, s_v), ValueError, r"at least one token"),
        ((q, x, w_k[:1], w_v, s_k, s_v), ValueError, r"w_k must be \[H, C, Din\] = \(2, 3, 5\)"),
        ((q, x, w_k, w_v[..., :4], s_k, s_v), ValueError, r"w_v must be \[H, C, Din\]"),
        ((q, x, w_k, w_v, s_k[:2], s_v), ValueError, r"s_k must be \[U, Din\] = \(3, 5\)"),
        ((q, x, w_k, w_v, s_k, s_v[None]), ValueError, r"s_v must be \[U, Din\]"),
        ((q, x, w_k, w_v, s_k, s_v, b_v[:1]), ValueError, r"b_v must be \[H, C\]"),
        ((q, x.float(), w_k, w_v, s_k, s_v), TypeError, "x has dtype torch.float32 but q has torch.float64"),
        ((q, x, w_k, w_v, s_k.float(), s_v), TypeError, "s_k has dtype"),
        ((q.long(), x, w_k, w_v, s_k, s_v), TypeError, "q must be a floating-point tensor"),
        ((q, x, "w", w_v, s_k, s_v), TypeError, "w_k must be a tensor"),
        ((q, x, w_k, w_v, s_k, s_v.to("meta")), ValueError, "s_v is on meta but q is on cpu"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            op(*args, backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        op(q, x, w_k, w_v, s_k, s_v, backend="fast")
