"""C++ graph attention (m2mkd_fast.cpp_backend.graph) against the dense oracle: outputs and the
gradients of q, k, v, both signatures and β in every mode, the Philox stream bit for bit, empty
rows, odd shapes, bf16, non-contiguous inputs, every instruction-set path, thread counts."""

import math

import pytest
import torch

_C = pytest.importorskip("m2mkd_fast._C", reason="the C++ extension m2mkd_fast._C is not built")

import m2mkd_fast as mk  # noqa: E402
from m2mkd_fast.cpp_backend.graph import edge_list, graph_attention  # noqa: E402
from m2mkd_fast.reference import graph_attention as ref_graph  # noqa: E402
from m2mkd_fast.reference.random import philox_uniform as ref_philox  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

NAMES = ("q", "k", "v", "sig_r", "sig_s", "bandwidth")
MODES = {
    "deterministic": {},
    "sampled": {"temperature": 0.5, "seed": 1234},
    "threshold": {"threshold": True},
    "dense": {"truncation": None},
    "dense_sampled": {"truncation": None, "temperature": 0.7, "seed": 2**40 + 7},
    "sparse": {"truncation": 0.35},  # many rows without an edge
}


def make_inputs(B, H, U, V, C, S, dtype=torch.float32, beta=0.8):
    return [
        torch.randn(B, H, U, C),
        torch.randn(B, H, V, C),
        torch.randn(B, H, V, C),
        torch.randn(U, S),
        torch.randn(V, S),
        torch.tensor(beta),
    ]


def grads(fn, inputs, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    got = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), got


def check_against_oracle(inputs, dtype, **kwargs):
    base = [t.to(dtype) for t in inputs]
    grad_out = torch.randn(inputs[0].shape)
    out, g = grads(graph_attention, base, grad_out, **kwargs)
    out64, g64 = grads(ref_graph, [t.double() for t in inputs], grad_out, **kwargs)
    out_ref, g_ref = grads(ref_graph, base, grad_out, **kwargs)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, out_ref, name="output")
    threshold = kwargs.get("threshold", False)
    for name, a, b, c in zip(NAMES, g, g64, g_ref):
        if threshold and name in ("sig_r", "sig_s", "bandwidth"):
            assert a is None or not a.any(), f"{name}: threshold mode must give no gradient"
            continue
        assert a is not None, f"{name}: no gradient"
        atol = None
        if name == "bandwidth":
            # one scalar summing every edge's contribution: allow rounding relative to its size
            atol = (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, b.abs().item())
        assert_close_to_reference(a, b, c, atol=atol, name=f"grad {name}")
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(2, 3, 37, 41, 64, 8), (1, 2, 7, 59, 16, 5), (2, 1, 11, 13, 7, 4)])
def test_matches_oracle_fp32(mode, shape):
    check_against_oracle(make_inputs(*shape), torch.float32, **MODES[mode])


@pytest.mark.parametrize("mode", ["deterministic", "sampled"])
def test_matches_oracle_bf16(mode):
    check_against_oracle(make_inputs(2, 2, 19, 23, 32, 8), torch.bfloat16, **MODES[mode])


def test_head_dims_of_every_fast_kernel():
    for C in (16, 32, 128, 48):  # 48: a multiple of 16 without a fast kernel -> generic path
        check_against_oracle(make_inputs(1, 2, 9, 21, C, 6), torch.float32, **MODES["sampled"])


def test_tiny_and_single_edge_shapes():
    for shape in [(1, 1, 1, 1, 1, 1), (1, 1, 1, 5, 3, 2), (3, 1, 4, 1, 16, 3)]:
        check_against_oracle(make_inputs(*shape), torch.float32, truncation=None)


def test_rows_without_edges_give_zero_output_and_gradients():
    q, k, v, sig_r, sig_s, beta = make_inputs(2, 2, 6, 9, 16, 4)
    sig_s = sig_s.clone()
    sig_r = sig_r.clone()
    sig_r[:3] = -sig_s[0]  # receivers 0..2 point away from sender 0 ...
    sig_s[:] = sig_s[0]  # ... and every sender is sender 0: dist = 2 > 0.9 for rows 0..2
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sig_r, sig_s, beta)]
    out = graph_attention(*leaves, temperature=0.5, seed=3)
    assert torch.isfinite(out).all()
    assert (out[:, :, :3] == 0).all()
    out.sum().backward()
    assert (leaves[0].grad[:, :, :3] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    # every row empty
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sig_r[:3], sig_s, beta)]
    leaves[0] = q[:, :, :3].clone().requires_grad_()
    out = graph_attention(*leaves)
    assert (out == 0).all()
    out.sum().backward()
    assert (leaves[0].grad == 0).all() and (leaves[1].grad == 0).all() and (leaves[2].grad == 0).all()


def test_empty_dimensions():
    for shape in [(0, 2, 5, 6, 16, 3), (2, 2, 0, 6, 16, 3), (2, 2, 5, 0, 16, 3)]:
        inputs = [t.requires_grad_() for t in make_inputs(*shape)]
        out = graph_attention(*inputs, temperature=0.5, seed=1)
        assert out.shape == inputs[0].shape and (out == 0).all()
        out.sum().backward()


def test_non_contiguous_inputs():
    q, k, v, sig_r, sig_s, beta = make_inputs(2, 3, 21, 17, 16, 6)
    q_nc = q.transpose(2, 3).contiguous().transpose(2, 3)
    k_nc = torch.randn(2, 3, 16, 17).transpose(2, 3)
    sig_r_nc = torch.randn(6, 21).t()
    args = (q_nc, k_nc, v, sig_r_nc, sig_s, beta)
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous() and not sig_r_nc.is_contiguous()
    kwargs = MODES["sampled"]
    # (the signature matmul may round differently for a transposed operand: not bitwise)
    torch.testing.assert_close(
        graph_attention(*args, **kwargs), graph_attention(*[t.contiguous() for t in args], **kwargs), rtol=1e-5, atol=1e-5
    )
    check_against_oracle([t.contiguous() for t in args], torch.float32, **kwargs)


def test_float64_gradcheck():
    torch.manual_seed(1)
    inputs = [t.double().requires_grad_() for t in make_inputs(2, 2, 5, 6, 3, 4)]
    for kwargs in ({"temperature": 0.5, "seed": 11}, {}, {"truncation": None}):
        assert torch.autograd.gradcheck(lambda *a: graph_attention(*a, **kwargs), tuple(inputs))


def test_philox_stream_is_triton_rand_bit_for_bit():
    offsets = torch.cat([torch.arange(4096), torch.randint(0, 2**31 - 1, (20000,)), torch.tensor([2**31 - 1])])
    for seed in (0, 1, 1234, 2**32 - 1, 2**32 + 5, 2**63 - 1):
        got = torch.ops.m2mkd_fast.graph_cpp_philox(seed, offsets)
        assert torch.equal(got, ref_philox(seed, offsets)), seed


def test_sampled_bias_uses_the_shared_noise():
    """The per-edge log-sample is the oracle's (same noise, same formula) on every kept edge."""
    B, U, V, S = 3, 13, 17, 5
    sig_r, sig_s, beta = torch.randn(U, S, dtype=torch.float64), torch.randn(V, S, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    row_ptr, row, col, logit = edge_list(sig_r, sig_s, beta)
    sample, _ = torch.ops.m2mkd_fast.graph_cpp_sample(logit, row, col, B, U, V, torch.tensor(77), 0.5)
    from m2mkd_fast.reference.graph import graph_noise, graph_sampled_bias

    expected = graph_sampled_bias(sig_r, sig_s, beta, 0.9, 0.5, graph_noise(77, B, U, V), False)[:, row, col]
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-12)
    assert row.numel() > 0 and torch.isfinite(sample).all()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_path(isa):
    previous = _C.active_isa()
    try:
        _C.set_isa(isa)
        check_against_oracle(make_inputs(2, 2, 23, 29, 64, 8), torch.float32, **MODES["sampled"])
        check_against_oracle(make_inputs(1, 2, 9, 10, 7, 4), torch.float32, **MODES["sampled"])
    finally:
        _C.set_isa(previous)


def test_independent_of_thread_count():
    inputs = make_inputs(4, 3, 40, 50, 64, 8)
    grad_out = torch.randn(inputs[0].shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, g1 = grads(graph_attention, inputs, grad_out, **MODES["sampled"])
        torch.set_num_threads(2)
        out2, g2 = grads(graph_attention, inputs, grad_out, **MODES["sampled"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out1, out2)
    for a, b in zip(g1[:3], g2[:3]):
        assert torch.equal(a, b)
    for a, b in zip(g1[3:], g2[3:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dispatch_through_ops():
    inputs = make_inputs(2, 2, 8, 9, 16, 4)
    got = mk.ops.graph_attention(*inputs, temperature=0.5, seed=5, backend="cpp")
    torch.testing.assert_close(got, graph_attention(*inputs, temperature=0.5, seed=5), rtol=0, atol=0)


def test_kernel_rejects_bad_inputs():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    row_ptr, col, bias = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 3]), torch.zeros(1, 2)
    op = torch.ops.m2mkd_fast.graph_cpp_fwd
    with pytest.raises(RuntimeError, match="row_ptr must have U \\+ 1 entries"):
        op(q, k, v, row_ptr[:3], col, bias, 0.25)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q, k.double(), v, row_ptr, col, bias, 0.25)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(q, k, v, row_ptr, col, torch.zeros(1, 3), 0.25)
    with pytest.raises(RuntimeError, match="B\\*U\\*V must be < 2\\*\\*31"):
        torch.ops.m2mkd_fast.graph_cpp_sample(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2**16, 2**8, 2**8, torch.tensor(0), 0.5)
