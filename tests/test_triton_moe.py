"""Triton grouped expert MLP (kernels/moe.py, m2mkd_fast/triton_backend/moe.py).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before any kernel import), with
dot operands cast to fp32 (the interpreter's bf16 dot is broken) and bf16 rounding done by hand
(the interpreter truncates): this checks what the kernels compute, in fp32 and through the bf16
input/output path, not GPU code generation or speed (tests/test_aot_compile.py compiles them
for sm_80 / sm_90a; tests marked ``gpu`` run on a CUDA device).

y and the gradients of x, the routing weights, w1, b1, w2 and b2 are compared with the oracle
(m2mkd_fast.reference.moe.moe_mlp) by FlashAttention's rule (tests/tolerance.py): error against
float64 at most 2x the same-dtype oracle's. Every Triton call runs with PyTorch's
uninitialised-memory poisoning on (torch.empty → NaN / max int), so an element a kernel forgets
to write fails.
"""


import pytest
import torch

from m2mkd_fast.reference.moe import moe_mlp as ref_moe
from m2mkd_fast.reference.routing import route as ref_route
from m2mkd_fast.routing_result import Routing
from poison import poisoned
from tolerance import assert_close_to_reference

triton = pytest.importorskip("triton")

from m2mkd_fast.triton_backend import moe as tb  # noqa: E402  (after conftest set TRITON_INTERPRET)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["x", "weight", "w1", "b1", "w2", "b2"]


def _problem(T, d, h, E, k, gate="vmoe", cf=None, bpr=False, gs=None, bias=True, logits=None):
    """Float64 tensors [x, weight, w1, b1, w2, b2] and the routing (expert, slot) of T tokens."""
    logits = torch.randn(T, E, device=DEVICE) * 2 if logits is None else logits
    r = ref_route(logits, k, gate, cf, bpr, gs)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    tensors = [
        torch.randn(T, d, **f64),
        r.weight.double(),
        torch.randn(E, d, h, **f64) * d**-0.5,
        torch.randn(E, h, **f64) * 0.5 if bias else None,
        torch.randn(E, h, d, **f64) * h**-0.5,
        torch.randn(E, d, **f64) * 0.5 if bias else None,
    ]
    return tensors, r


def _run(fn, tensors, r, dtype, grad_out, activation, weight_dtype=None):
    """fn's y and the gradients of <y, grad_out> w.r.t. every tensor input (None stays None)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    if weight_dtype is not None:
        leaves[1] = tensors[1].detach().to(weight_dtype).requires_grad_(True)
    x, weight, w1, b1, w2, b2 = leaves
    y = fn(x, r._replace(weight=weight), w1, b1, w2, b2, activation)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, used, grad_out.to(y.dtype)) if y.numel() else [torch.zeros_like(t) for t in used]
    it = iter(grads)
    return y.detach(), [None if t is None else next(it) for t in leaves]


def _triton(x, r, w1, b1, w2, b2, activation):
    with poisoned():
        return tb.moe_mlp(x, r, w1, b1, w2, b2, activation)


def _compare(tensors, r, dtype, activation="gelu", weight_dtype=None):
    T, d = tensors[0].shape
    grad_out = torch.randn(T, d, dtype=torch.float64, device=DEVICE)
    with poisoned():
        y, grads = _run(tb.moe_mlp, tensors, r, dtype, grad_out, activation, weight_dtype)
    y_ref, g_ref = _run(ref_moe, tensors, r, dtype, grad_out, activation, weight_dtype)
    y64, g64 = _run(ref_moe, tensors, r, torch.float64, grad_out, activation)
    assert y.dtype == dtype and y.shape == (T, d)
    assert_close_to_reference(y, y64, y_ref, name="y")
    for name, g, gr, g6 in zip(NAMES, grads, g_ref, g64):
        if g6 is None:
            assert g is None
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == gr.dtype, f"grad {name}: dtype {g.dtype} != {gr.dtype}"
        assert_close_to_reference(g, g6, gr, name=f"grad {name}")
    return y, grads


# (T, d, h, E, k, capacity_factor, batch_priority, group_size, bias, activation): T = 0; one token
# and one expert; T below one block with drops; several row tiles per expert with ragged
# edges (blocks of 32 under the interpreter), h over two column tiles; groups; BPR; no biases
CASES = [
    (0, 8, 16, 3, 2, None, False, None, True, "gelu"),
    (1, 8, 16, 1, 1, None, False, None, True, "gelu"),
    (7, 16, 8, 3, 2, 0.5, False, None, True, "gelu"),
    (59, 24, 40, 4, 2, None, False, None, True, "gelu_tanh"),
    (111, 40, 24, 3, 1, 1.0, False, 37, True, "gelu"),
    (111, 16, 40, 4, 2, 1.0, True, None, False, "gelu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,d,h,E,k,cf,bpr,gs,bias,activation", CASES)
def test_moe_mlp_matches_oracle(T, d, h, E, k, cf, bpr, gs, bias, activation, dtype):
    tensors, r = _problem(T, d, h, E, k, cf=cf, bpr=bpr, gs=gs, bias=bias)
    if cf is not None and T > 7:
        assert (r.slot < 0).any(), "the case should drop pairs"
    _compare(tensors, r, dtype, activation)


def test_naive_gate_and_float32_weights_with_bfloat16_activations():
    # r.weight in float32 (router logits kept in float32) is cast to x.dtype; its gradient
    # comes back in float32
    tensors, r = _problem(59, 16, 24, 4, 2, gate="naive")
    _, grads = _compare(tensors, r, torch.bfloat16, weight_dtype=torch.float32)
    assert grads[1].dtype == torch.float32


def test_experts_without_tokens_get_zero_gradients():
    logits = torch.randn(23, 5, device=DEVICE)
    logits[:, 3:] = -30.0  # experts 3 and 4 never chosen
    tensors, r = _problem(23, 8, 16, 5, 2, logits=logits)
    assert not (r.expert >= 3).any()
    _, grads = _compare(tensors, r, torch.float32)
    for name, g in zip(NAMES[2:], grads[2:]):
        assert g is not None and torch.equal(g[3:], torch.zeros_like(g[3:])), name
        assert g[:3].abs().sum() > 0, name


def test_all_pairs_dropped_and_repeated_experts():
    # a hand-made routing: token 0 sends both choices to expert 1 (allowed, counted twice),
    # tokens 1..3 have every pair dropped; expert 0 has no tokens
    T, d, h, E = 4, 8, 8, 2
    expert = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 1]], device=DEVICE)
    slot = torch.tensor([[0, 1], [-1, -1], [-1, -1], [-1, -1]], device=DEVICE)
    weight = torch.rand(T, 2, device=DEVICE, dtype=torch.float64)
    r = Routing(expert, weight, slot, torch.tensor([0, 2], device=DEVICE), None)
    tensors, _ = _problem(T, d, h, E, 2)
    tensors[1] = weight
    y, grads = _compare(tensors, r, torch.float32)
    assert torch.equal(y[1:], torch.zeros_like(y[1:]))
    assert torch.equal(grads[0][1:], torch.zeros_like(grads[0][1:]))
    assert torch.equal(grads[1][1:], torch.zeros_like(grads[1][1:]))


def test_noncontiguous_inputs():
    T, d, h, E, k = 37, 16, 24, 3, 2
    tensors, r = _problem(T, d, h, E, k, cf=1.0)
    base = dict(zip(NAMES, [t.float() for t in tensors]))
    grad_out = torch.randn(1, d, device=DEVICE).expand(T, d)  # a broadcast (stride 0) gradient
    # same values, other strides: the views are built from the leaves, so gradients flow back
    variants = {
        "x with strided columns": ("x", lambda t: torch.cat([t, t], 1)[:, ::2]),
        "x with strided rows": ("x", lambda t: torch.cat([t, t], 1)[:, :d]),
        "w1 column-major": ("w1", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
        "w2 column-major": ("w2", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
        "strided routing weights": ("weight", lambda t: torch.cat([t, t], 1)[:, ::2]),
    }
    for label, (name, view) in variants.items():
        results = []
        for fn in (_triton, ref_moe):
            leaves = {n: t.detach().clone().requires_grad_() for n, t in base.items()}
            args = dict(leaves)
            args[name] = view(leaves[name])
            assert not args[name].is_contiguous()
            y = fn(args["x"], r._replace(weight=args["weight"]), args["w1"], args["b1"], args["w2"], args["b2"], "gelu")
            results.append((y, torch.autograd.grad(y, list(leaves.values()), grad_out)))
        (y, grads), (y_ref, grads_ref) = results
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=label)
        for n, g, g_ref in zip(NAMES, grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"{label}: grad {n}")


@pytest.mark.parametrize("wanted", [("x",), ("weight",), ("w1", "b2"), ("w2",)])
def test_only_the_requested_gradients(wanted):
    tensors, r = _problem(29, 8, 16, 3, 2, cf=1.0)
    grad_out = torch.randn(29, 8, device=DEVICE)
    results = []
    for fn in (_triton, ref_moe):
        leaves = {n: t.float().requires_grad_(n in wanted) for n, t in zip(NAMES, tensors)}
        y = fn(leaves["x"], r._replace(weight=leaves["weight"]), leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], "gelu")
        results.append(torch.autograd.grad(y, [leaves[n] for n in wanted], grad_out))
    for n, g, g_ref in zip(wanted, *results):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"grad {n}")


def test_results_are_deterministic():
    tensors, r = _problem(45, 16, 24, 3, 2, cf=1.0)
    grad_out = torch.randn(45, 16, dtype=torch.float64, device=DEVICE)
    first = _run(tb.moe_mlp, tensors, r, torch.bfloat16, grad_out, "gelu")
    second = _run(tb.moe_mlp, tensors, r, torch.bfloat16, grad_out, "gelu")
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_no_grad_forward_skips_the_saved_activations():
    tensors, r = _problem(20, 8, 16, 3, 2)
    x, weight, w1, b1, w2, b2 = [t.float() for t in tensors]
    with torch.no_grad():
        outs = tb._moe_mlp_fwd(x, r.expert, weight, r.slot, w1, b1, w2, b2, "none", False)
    assert outs[1].shape[0] == 0  # Z not computed without a backward to come
    torch.testing.assert_close(outs[0], ref_moe(x, r._replace(weight=weight), w1, b1, w2, b2), rtol=1e-5, atol=1e-5)


def test_through_ops_layer():
    from m2mkd_fast import ops

    tensors, r = _problem(13, 8, 16, 3, 2)
    x, weight, w1, b1, w2, b2 = [t.float() for t in tensors]
    y = ops.moe_mlp(x, r._replace(weight=weight), w1, b1, w2, b2, backend="triton")
    torch.testing.assert_close(y, ref_moe(x, r._replace(weight=weight), w1, b1, w2, b2), rtol=1e-5, atol=1e-5)


def test_traces_with_torch_compile_fullgraph():
    # aot_eager: dynamo + AOTAutograd trace through the custom ops' fake implementations and
    # autograd registrations (route and moe_mlp) in one graph, without inductor's compile cost
    from m2mkd_fast.triton_backend.routing import route

    tensors, _ = _problem(24, 8, 16, 3, 2)
    x, _, w1, b1, w2, b2 = [t.float() for t in tensors]
    logits = torch.randn(24, 3, device=DEVICE)

    def layer(x, logits, w1, b1, w2, b2):
        r = route(logits, 2, "vmoe", 1.0, True, 8)
        return tb.moe_mlp(x, r, w1, b1, w2, b2, "gelu_tanh"), r.counts

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, logits, w1, b1, w2, b2)]
        y, counts = fn(*leaves)
        outs.append((y, counts, torch.autograd.grad(y.square().sum(), leaves)))
    (y, counts, grads), (y_c, counts_c, grads_c) = outs
    torch.testing.assert_close(y_c, y)
    assert torch.equal(counts_c, counts)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)


def test_rejects_unknown_activation():
    tensors, r = _problem(3, 8, 8, 2, 1)
    x, weight, w1, b1, w2, b2 = [t.float() for t in tensors]
    with pytest.raises(ValueError, match="activation"):
        tb.moe_mlp(x, r, w1, b1, w2, b2, "relu")


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_larger_shape_matches_oracle(dtype):
    tensors, r = _problem(1025, 128, 256, 8, 2, cf=1.05)
    _compare(tensors, r, dtype)


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_synchronise_the_host():
    from m2mkd_fast.triton_backend.routing import route

    T, d, h, E = 2048, 256, 512, 8
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    params = [torch.randn(E, d, h, device="cuda", dtype=torch.bfloat16, requires_grad=True),
              torch.zeros(E, h, device="cuda", dtype=torch.bfloat16, requires_grad=True),
              torch.randn(E, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True),
              torch.zeros(E, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    for _ in range(2):  # the first call compiles and autotunes
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            r = route(logits, 2, "vmoe", 1.05)
            tb.moe_mlp(x, r, *params).float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_compiled_layer_fullgraph():
    import m2mkd_fast as mk

    layer = mk.layers.MoEMLP(64, 128, 4, k=2, capacity_factor=1.25, backend="triton").cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    y_eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    y.sum().backward()
