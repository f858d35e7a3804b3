"""Kernel-modulated graph attention (docs/design.md §2.4): oracle, every CPU backend (torch, cpp, triton interpreted), the op's checks."""

import math

import pytest
import torch
import torch.nn.functional as F

import m2mkd_fast as mk
from m2mkd_fast.reference.graph import graph_attention as ref_graph
from m2mkd_fast.reference.graph import graph_log_affinity, graph_noise
from m2mkd_fast.reference.random import philox_uniform
from m2mkd_fast.torch_backend import graph as torch_graph_module
from m2mkd_fast.torch_backend.graph import graph_attention as torch_graph
from tolerance import assert_close_to_reference, grad_atol

NAMES = ["q", "k", "v", "sig_r", "sig_s", "bandwidth"]
EPS32 = torch.finfo(torch.float32).eps
INF = float("inf")
MODES = {
    "no_sample": dict(),
    "sample": dict(temperature=0.5, seed=2**33 + 17),
    "threshold": dict(threshold=True),
    "dense": dict(truncation=None),
}
# β for threshold mode: with it every test case keeps edges (dist/β ≤ ln 2 within τ = 0.9) and
# cuts some at ln 2 (the default β = 0.8 keeps none in two of the SHAPES)
THRESHOLD_BETA = 1.2

# Every backend that runs on CPU tensors here: torch, cpp when the extension is built, triton under
# TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA). The interpreter costs seconds per
# call, so triton runs only on TRITON_SHAPES and small cases (tests/test_triton_graph.py covers it
# in depth); it has no float64 kernels, so the float64 tests run the others (FLOAT64_IMPLS).
BACKENDS = mk.available_backends("cpu")
TRITON_SHAPES = {(3, 1, 1, 59, 5)}
FLOAT64_IMPLS = ["oracle"] + [b for b in BACKENDS if b != "triton"]


def _backend(name):
    """The op pinned to one backend (through ops.graph_attention: its checks, then the backend)."""

    def fn(*args, **kwargs):
        return mk.ops.graph_attention(*args, backend=name, **kwargs)

    return fn


def _implementation(name):
    return ref_graph if name == "oracle" else _backend(name)



def _inputs(batch, heads, receivers, senders, head_dim, sig_dim=16, dtype=torch.float64, seed=0, beta=0.8):
    """Random inputs, rounded to ``dtype`` and returned in float64 (upcast them for the reference)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, receivers, head_dim), (batch, heads, senders, head_dim), (batch, heads, senders, head_dim), (receivers, sig_dim), (senders, sig_dim)]
    tensors = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    tensors.append(torch.tensor(beta, dtype=torch.float64))
    return [t.to(dtype).to(torch.float64) for t in tensors]


def _leaves(tensors, dtype):
    return [t.to(dtype).requires_grad_() for t in tensors]


# ---------------------------------------------------------------- hand-computed oracle cases


def test_log_affinity_hand_computed_with_ties():
    sig_r = torch.tensor([[2.0, 0.0]])
    sig_s = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])  # dist 0, 1, 2, 1 − 1/√2
    beta = torch.tensor(0.5)
    d3 = 1 - 1 / math.sqrt(2)
    ell = graph_log_affinity(sig_r, sig_s, beta, truncation=0.9)
    torch.testing.assert_close(ell, torch.tensor([[0.0, -INF, -INF, -d3 / 0.5]]))
    ell_tie = graph_log_affinity(sig_r, sig_s, beta, truncation=1.0)  # dist == τ is kept
    torch.testing.assert_close(ell_tie, torch.tensor([[0.0, -2.0, -INF, -d3 / 0.5]]))
    ell_all = graph_log_affinity(sig_r, sig_s, beta, truncation=None)
    torch.testing.assert_close(ell_all, torch.tensor([[0.0, -2.0, -4.0, -d3 / 0.5]]))
    # threshold: 0 where dist/β ≤ ln 2 (0 and 0.586 yes, 2 no) and within truncation, −∞ elsewhere
    thr = graph_log_affinity(sig_r, sig_s, beta, truncation=1.0, threshold=True)
    torch.testing.assert_close(thr, torch.tensor([[0.0, -INF, -INF, 0.0]]))
    assert not thr.requires_grad


@pytest.mark.parametrize("impl", FLOAT64_IMPLS)
def test_attention_hand_computed(impl):
    # one receiver, three senders, one head, C = 4: scores q·k/2 plus the kernel bias
    sig_r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    sig_s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # dist 0, 0.293, 1
    beta = torch.tensor(1.0, dtype=torch.float64)
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0, 0, 0, 0], [4.0, 0, 0, 0], [0.0, 0, 0, 0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]]], dtype=torch.float64)
    d1 = 1 - 1 / math.sqrt(2)
    logits = torch.tensor([1.0 - 0.0, 2.0 - d1], dtype=torch.float64)  # the third sender is truncated
    a = torch.softmax(logits, 0)
    expected = torch.tensor([a[0], a[1], 0.0, 0.0], dtype=torch.float64)
    fn = _implementation(impl)
    torch.testing.assert_close(fn(q, k, v, sig_r, sig_s, beta).reshape(4), expected, rtol=0, atol=1e-14)
    # no truncation: the third sender joins with bias −1
    a3 = torch.softmax(torch.tensor([1.0, 2.0 - d1, 0.0 - 1.0], dtype=torch.float64), 0)
    out = fn(q, k, v, sig_r, sig_s, beta, truncation=None).reshape(4)
    torch.testing.assert_close(out, torch.cat([a3, a3.new_zeros(1)]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["oracle"] + BACKENDS)
def test_edge_at_the_truncation_radius_is_kept(impl, dtype):
    """dist == τ exactly (orthogonal signatures, τ = 1): the edge is kept, with bias −1/β."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels refuse float64")
    sig_r = torch.tensor([[1.0, 0.0]], dtype=dtype)
    sig_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)  # dist 0 and exactly 1
    q = torch.zeros(1, 1, 1, 16, dtype=dtype)
    k = torch.zeros(1, 1, 2, 16, dtype=dtype)
    v = torch.eye(2, 16, dtype=dtype)[None, None]  # the output holds the attention weights
    out = _implementation(impl)(q, k, v, sig_r, sig_s, torch.tensor(1.0, dtype=dtype), truncation=1.0)
    expected = torch.softmax(torch.tensor([0.0, -1.0], dtype=torch.float64), 0)  # [0.731, 0.269]
    torch.testing.assert_close(out[0, 0, 0, :2].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", FLOAT64_IMPLS)
def test_sampled_bias_follows_the_shared_stream(impl):
    """Recover the bias from the attention weights (q = 0, one-hot values) and rebuild it by hand
    from philox_uniform at offsets (b·U + u)·V + v: checks the stream, the offsets and the formula."""
    fn = _implementation(impl)
    batch, receivers, senders, heads, seed, t = 2, 3, 5, 2, 987654321987, 0.5
    sig_r = torch.randn(receivers, 8, dtype=torch.float64)
    sig_s = torch.randn(senders, 8, dtype=torch.float64)
    beta = torch.tensor(0.7, dtype=torch.float64)
    q = torch.zeros(batch, heads, receivers, senders, dtype=torch.float64)
    k = torch.randn(batch, heads, senders, senders, dtype=torch.float64)
    v = torch.eye(senders, dtype=torch.float64).expand(batch, heads, senders, senders)
    attn = fn(q, k, v, sig_r, sig_s, beta, truncation=None, temperature=t, seed=seed)  # [B,H,U,V] = weights
    dist = 1 - F.normalize(sig_r, dim=-1) @ F.normalize(sig_s, dim=-1).t()
    p = torch.exp(-dist / beta).clamp(EPS32, 1 - EPS32)
    for b in range(batch):
        for u in range(receivers):
            offsets = torch.tensor([(b * receivers + u) * senders + s for s in range(senders)])
            n = philox_uniform(seed, offsets).double().clamp(EPS32, 1 - EPS32)
            z = (torch.log(p[u]) - torch.log1p(-p[u]) + torch.log(n) - torch.log1p(-n)) / t
            bias = F.logsigmoid(z)
            for h in range(heads):
                log_a = torch.log(attn[b, h, u])
                torch.testing.assert_close(log_a - log_a[0], bias - bias[0], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- every backend vs the oracle

SHAPES = [  # B, H, U, V, C
    (2, 3, 59, 111, 8),
    (1, 2, 7, 1, 16),
    (3, 1, 1, 59, 5),
    (2, 2, 111, 7, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "backend,shape",
    [(b, s) for b in BACKENDS for s in SHAPES if b != "triton" or s in TRITON_SHAPES],
    ids=lambda p: p if isinstance(p, str) else "x".join(map(str, p)),
)
def test_backend_matches_oracle_forward_and_all_grads(backend, shape, mode, dtype):
    kwargs = MODES[mode]
    base = _inputs(*shape, dtype=dtype, seed=sum(shape), beta=THRESHOLD_BETA if mode == "threshold" else 0.8)
    leaves64, leaves_ref, leaves = _leaves(base, torch.float64), _leaves(base, dtype), _leaves(base, dtype)
    out64 = ref_graph(*leaves64, **kwargs)
    assert torch.count_nonzero(out64) > 0  # some receiver keeps an edge
    out_ref = ref_graph(*leaves_ref, **kwargs)
    out = _backend(backend)(*leaves, **kwargs)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, out_ref, name=f"o ({mode})")
    grad = torch.randn_like(out64)
    wrt = [i for i in range(6) if mode != "threshold" or i < 3]  # threshold: no gradient to σ, β
    g64 = torch.autograd.grad(out64, [leaves64[i] for i in wrt], grad)
    g_ref = torch.autograd.grad(out_ref, [leaves_ref[i] for i in wrt], grad.to(dtype))
    g = torch.autograd.grad(out, [leaves[i] for i in wrt], grad.to(dtype))
    for i, a, r64, r in zip(wrt, g, g64, g_ref):
        assert a.dtype == dtype
        assert_close_to_reference(a, r64, r, atol=grad_atol(r64, dtype), name=f"d{NAMES[i]} ({mode})")


@pytest.mark.parametrize("mode", ["no_sample", "sample", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_signatures_beside_bf16_activations(backend, mode):
    """q, k, v in bf16 with σ, β in fp32 (a NAC under autocast): every backend against the oracle
    on the same mixed inputs; σ and β get fp32 gradients."""
    kwargs = MODES[mode]
    shape = (3, 1, 1, 59, 5) if backend == "triton" else (2, 3, 59, 111, 8)
    base = _inputs(*shape, dtype=torch.bfloat16, seed=7)

    def mixed():
        return _leaves(base[:3], torch.bfloat16) + _leaves(base[3:], torch.float32)

    leaves64, leaves_ref, leaves = _leaves(base, torch.float64), mixed(), mixed()
    out64, out_ref, out = ref_graph(*leaves64, **kwargs), ref_graph(*leaves_ref, **kwargs), _backend(backend)(*leaves, **kwargs)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, out64, out_ref, name=f"o ({mode})")
    grad = torch.randn_like(out64)
    g64 = torch.autograd.grad(out64, leaves64, grad)
    g_ref = torch.autograd.grad(out_ref, leaves_ref, grad.bfloat16())
    g = torch.autograd.grad(out, leaves, grad.bfloat16())
    for name, a, r64, r, leaf in zip(NAMES, g, g64, g_ref, leaves):
        assert a.dtype == leaf.dtype
        # dσ, dβ are fp32 but sum terms rounded in bf16 (the activations): the bf16 allowance
        assert_close_to_reference(a, r64, r, atol=grad_atol(r64, torch.bfloat16), name=f"d{name} ({mode})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_round_the_signatures(backend):
    """Under bf16 autocast the op computes the kernel bias from the fp32 signatures: the result is
    the one without autocast, not the one from bf16-rounded signatures (which differs)."""
    shape = (3, 1, 1, 59, 5) if backend == "triton" else (2, 3, 59, 111, 8)
    base = _inputs(*shape, seed=3)
    q, k, v = (t.bfloat16() for t in base[:3])
    sig_r, sig_s, beta = (t.float() for t in base[3:])
    op = _backend(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = op(q, k, v, sig_r, sig_s, beta)
    outside = op(q, k, v, sig_r, sig_s, beta)
    rounded = op(q, k, v, sig_r.bfloat16().float(), sig_s.bfloat16().float(), beta)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    assert not torch.equal(rounded, outside)


@pytest.mark.parametrize("mode", ["no_sample", "sample", "dense"])
def test_kernel_without_gradient_takes_the_fused_path(mode):
    """σ and β frozen: the bias needs no gradient and the backend hands it to SDPA as a mask."""
    kwargs = MODES[mode]
    base = _inputs(2, 3, 59, 111, 8, seed=5)
    leaves64 = _leaves(base[:3], torch.float64) + base[3:]
    leaves = _leaves(base[:3], torch.float32) + [t.float() for t in base[3:]]
    leaves_ref = _leaves(base[:3], torch.float32) + [t.float() for t in base[3:]]
    out64, out, out_ref = ref_graph(*leaves64, **kwargs), torch_graph(*leaves, **kwargs), ref_graph(*leaves_ref, **kwargs)
    assert_close_to_reference(out, out64, out_ref, name="o")
    grad = torch.randn_like(out64)
    for a, r64, r, name in zip(
        torch.autograd.grad(out, leaves[:3], grad.float()),
        torch.autograd.grad(out64, leaves64[:3], grad),
        torch.autograd.grad(out_ref, leaves_ref[:3], grad.float()),
        NAMES,
    ):
        assert_close_to_reference(a, r64, r, atol=grad_atol(r64, torch.float32), name=f"d{name}")


def test_long_sender_runs_without_edges():
    """Whole key blocks of −∞ (a fused kernel's tiles) before or after a row's only edges."""
    senders, c = 1100, 4
    sig_s = torch.randn(senders, 8, dtype=torch.float64)
    sig_r = torch.randn(4, 8, dtype=torch.float64)
    sig_r[0], sig_r[1], sig_r[2] = sig_s[-1], sig_s[0], sig_s[530]  # a single edge at the end, start, middle
    q = torch.randn(2, 2, 4, c, dtype=torch.float64)
    k = torch.randn(2, 2, senders, c, dtype=torch.float64)
    v = torch.randn(2, 2, senders, c, dtype=torch.float64)
    beta = torch.tensor(1.0, dtype=torch.float64)
    for kwargs in (dict(truncation=1e-6), dict(truncation=1e-6, threshold=True), dict(truncation=1e-6, temperature=0.5, seed=1)):
        for dtype in (torch.float32, torch.float64):
            args = [t.to(dtype) for t in (q, k, v, sig_r, sig_s, beta)]
            out = torch_graph(*args, **kwargs)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, :, 0], v[:, :, -1].to(dtype))
            torch.testing.assert_close(out[:, :, 1], v[:, :, 0].to(dtype))
            torch.testing.assert_close(out[:, :, 2], v[:, :, 530].to(dtype))
            assert torch.count_nonzero(out[:, :, 3]) == 0


def test_dense_noise_path_equals_the_kept_edge_path(monkeypatch):
    base = _inputs(2, 2, 9, 13, 4)
    kwargs = dict(temperature=0.5, seed=77)
    sparse_bias, _ = torch_graph_module.graph_bias(*base[3:], 2, 0.9, 0.5, 77)
    sparse = torch_graph(*base, **kwargs)
    monkeypatch.setattr(torch_graph_module, "_sparse_noise_ok", lambda device: False)
    dense_bias, _ = torch_graph_module.graph_bias(*base[3:], 2, 0.9, 0.5, 77)
    assert torch.isneginf(sparse_bias).any() and torch.isfinite(sparse_bias).any()
    assert torch.equal(sparse_bias, dense_bias)
    assert torch.equal(sparse, torch_graph(*base, **kwargs))


# ---------------------------------------------------------------- sampling properties


@pytest.mark.parametrize("impl", FLOAT64_IMPLS)
def test_sampling_reproducible_same_over_heads_fresh_per_batch_element(impl):
    fn = _implementation(impl)
    q, k, v, sig_r, sig_s, beta = _inputs(1, 1, 6, 10, 4)
    heads, batch = 3, 2
    q, k, v = (t.expand(batch, heads, -1, -1) for t in (q, k, v))  # identical heads and batch elements
    out = fn(q, k, v, sig_r, sig_s, beta, temperature=0.5, seed=5)
    assert torch.equal(out, fn(q, k, v, sig_r, sig_s, beta, temperature=0.5, seed=5))
    assert not torch.equal(out, fn(q, k, v, sig_r, sig_s, beta, temperature=0.5, seed=6))
    for h in range(1, heads):
        assert torch.equal(out[:, h], out[:, 0])  # the same sample for every head
    assert not torch.allclose(out[0], out[1])  # a fresh sample per batch element
    assert not torch.allclose(out, fn(q, k, v, sig_r, sig_s, beta))  # sampling changes the result


def test_seed_clamp_difference_is_bounded():
    base = _inputs(2, 2, 20, 30, 8)
    sig_s = torch.cat([base[3], base[4][20:]])  # every receiver is among the senders: no empty row
    args = base[:4] + [sig_s, base[5]]
    exact = ref_graph(*args, temperature=0.5, seed=3)
    seedlike = ref_graph(*args, temperature=0.5, seed=3, seed_clamp=True)
    diff = (exact - seedlike).abs().max().item()
    # a truncated edge gets y = sigmoid((logit ε + logit n)/t): typically e^-32, but the tail of logit n
    # makes its mean mass ~e^-15.9 ≈ 1.2e-7 per edge: a small, nonzero difference
    assert 0 < diff < 1e-5


def _dtypes(impl):
    """float32 everywhere, float64 where the implementation has it (Triton has no float64 kernels)."""
    return (torch.float32,) if impl == "triton" else (torch.float32, torch.float64)


EMPTY_MODES = {"no_sample": dict(), "sample": dict(temperature=0.5, seed=1), "threshold": dict(threshold=True)}


def _unrelated_signatures(receivers, senders, gen):
    """Senders in the positive orthant of dims 0-3; receivers orthogonal to every sender (dims 4-7,
    distance 1) or, every other one, the negation of a sender (distance 2 to it, ≥ 1 to the
    others): with truncation 0.9 no receiver has an edge."""
    sig_s = torch.zeros(senders, 8, dtype=torch.float64)
    sig_s[:, :4] = torch.randn(senders, 4, generator=gen, dtype=torch.float64).abs() + 0.1
    sig_r = torch.zeros(receivers, 8, dtype=torch.float64)
    sig_r[:, 4:] = torch.randn(receivers, 4, generator=gen, dtype=torch.float64)
    sig_r[::2] = -sig_s[torch.arange(0, receivers, 2) % senders]
    return sig_r, sig_s


@pytest.mark.parametrize("mode", list(EMPTY_MODES))
@pytest.mark.parametrize("impl", ["oracle"] + BACKENDS)
def test_some_rows_empty_give_zero_output_and_zero_grads(impl, mode):
    """Receivers 0, 1 sit on a sender (distance 0); receivers 2.. have no edge at all. Empty rows
    must not change anything else: rows 0, 1 and dk, dv, dσ_s, dβ equal those of the problem
    with receivers 0, 1 only (deterministic modes; sampling draws per (b, u) offset, which
    depends on U)."""
    fn, kwargs = _implementation(impl), EMPTY_MODES[mode]
    batch, heads, receivers, senders, c = 2, 3, 6, 5, 4
    gen = torch.Generator().manual_seed(4)
    q, k, v, _, _, beta = _inputs(batch, heads, receivers, senders, c, seed=4)
    sig_r, sig_s = _unrelated_signatures(receivers, senders, gen)
    sig_r[:2] = sig_s[:2]
    for dtype in _dtypes(impl):
        leaves = _leaves([q, k, v, sig_r, sig_s, beta], dtype)
        out = fn(*leaves, **kwargs)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.count_nonzero(out[:, :, 2:]) == 0 and torch.count_nonzero(out[:, :, :2]) == out[:, :, :2].numel()
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        for name, g in zip(NAMES, grads):
            assert g is None or torch.isfinite(g).all(), name
        assert torch.count_nonzero(grads[0][:, :, 2:]) == 0 and torch.count_nonzero(grads[0][:, :, :2]) > 0
        assert grads[3] is None or torch.count_nonzero(grads[3][2:]) == 0
        if mode == "sample" or dtype != _dtypes(impl)[-1]:
            continue
        tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        sub = _leaves([q[:, :, :2], k, v, sig_r[:2], sig_s, beta], dtype)
        out_sub = fn(*sub, **kwargs)
        torch.testing.assert_close(out[:, :, :2], out_sub, **tol)
        grads_sub = torch.autograd.grad(out_sub, sub, grad[:, :, :2], allow_unused=True)
        for name, g, g_sub in zip(NAMES[1:], grads[1:], grads_sub[1:]):
            if name == "sig_r":
                g = None if g is None else g[:2]
            if g is None or g_sub is None:  # threshold mode: no gradient to σ, β
                assert mode == "threshold" and name in ("sig_r", "sig_s", "bandwidth"), name
                assert g is None or torch.count_nonzero(g) == 0, name
                continue
            torch.testing.assert_close(g, g_sub, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("mode", list(EMPTY_MODES))
@pytest.mark.parametrize("impl", ["oracle"] + BACKENDS)
def test_all_rows_empty_give_zero_output_and_zero_grads(impl, mode):
    fn, kwargs = _implementation(impl), EMPTY_MODES[mode]
    batch, heads, receivers, senders, c = 2, 3, 6, 5, 4
    gen = torch.Generator().manual_seed(7)
    q, k, v, _, _, beta = _inputs(batch, heads, receivers, senders, c, seed=7)
    sig_r, sig_s = _unrelated_signatures(receivers, senders, gen)
    dist = 1 - F.normalize(sig_r, dim=-1) @ F.normalize(sig_s, dim=-1).t()
    assert dist.min() > 0.9  # no edge anywhere (default truncation 0.9)
    for dtype in _dtypes(impl):
        leaves = _leaves([q, k, v, sig_r, sig_s, beta], dtype)
        out = fn(*leaves, **kwargs)
        assert out.shape == q.shape and out.dtype == dtype
        assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        for name, g in zip(NAMES, grads):
            assert g is not None or name in ("sig_r", "sig_s", "bandwidth"), name
            assert g is None or (torch.isfinite(g).all() and torch.count_nonzero(g) == 0), name


def test_threshold_mode_gives_signatures_and_bandwidth_no_gradient():
    for fn in (ref_graph, torch_graph):
        leaves = _leaves(_inputs(2, 2, 7, 9, 4, beta=THRESHOLD_BETA), torch.float32)
        out = fn(*leaves, threshold=True)
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads[:3])
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[3:])
        # and in the other modes they do get one
        out = fn(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves[3:])
        assert all(torch.count_nonzero(g) > 0 for g in grads)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.5, seed=11), dict(truncation=None)], ids=["ell", "sample", "dense"])
def test_gradcheck_float64(kwargs):
    leaves = _leaves(_inputs(2, 1, 3, 5, 2, sig_dim=3, seed=9), torch.float64)
    for impl in FLOAT64_IMPLS:
        fn = _implementation(impl)
        assert torch.autograd.gradcheck(lambda *a: fn(*a, **kwargs), tuple(leaves), fast_mode=True), impl


def test_gradcheck_float64_through_the_op():
    leaves = _leaves(_inputs(1, 1, 3, 4, 2, sig_dim=3, seed=10), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: mk.ops.graph_attention(*a, temperature=0.5, seed=3, backend="torch"), tuple(leaves))


def test_non_contiguous_inputs():
    q, k, v, sig_r, sig_s, beta = _inputs(2, 3, 7, 9, 4)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_nc = torch.stack([k, k], -1).flatten(-2)[..., ::2]
    v_nc = v.transpose(2, 3).contiguous().transpose(2, 3)
    sig_r_nc = sig_r.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (q_nc, k_nc, v_nc, sig_r_nc))
    for kwargs in MODES.values():
        want = ref_graph(q, k, v, sig_r, sig_s, beta, **kwargs)
        got = mk.ops.graph_attention(q_nc, k_nc, v_nc, sig_r_nc, sig_s, beta, backend="torch", **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_oracle_uniform_argument_is_the_seeded_stream():
    q, k, v, sig_r, sig_s, beta = _inputs(2, 2, 5, 6, 4)
    seeded = ref_graph(q, k, v, sig_r, sig_s, beta, temperature=0.5, seed=42)
    given = ref_graph(q, k, v, sig_r, sig_s, beta, temperature=0.5, uniform=graph_noise(42, 2, 5, 6))
    assert torch.equal(seeded, given)


# ---------------------------------------------------------------- the op


def test_op_dispatches_to_the_torch_backend():
    args = _inputs(2, 2, 5, 6, 4)
    for kwargs in MODES.values():
        torch.testing.assert_close(mk.ops.graph_attention(*args, backend="torch", **kwargs), torch_graph(*args, **kwargs), rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    q, k, v, sig_r, sig_s, beta = _inputs(2, 2, 5, 6, 4)
    op = mk.ops.graph_attention
    cases = [
        ((q[0], k, v, sig_r, sig_s, beta), {}, ValueError, r"q must be \[B, H, U, C\]"),
        ((q, k[..., :3], v, sig_r, sig_s, beta), {}, ValueError, r"k must be \[B, H, V, C\]"),
        ((q, k, v[:, :, :5], sig_r, sig_s, beta), {}, ValueError, r"v must have k's shape"),
        ((q, k, v, sig_r[:4], sig_s, beta), {}, ValueError, r"sig_r must be \[U, S\] with U = 5"),
        ((q, k, v, sig_r, sig_s[:, :3], beta), {}, ValueError, r"sig_s must be \[V, S\] = \(6, 16\)"),
        ((q, k, v, sig_r, sig_s, beta[None]), {}, ValueError, "bandwidth must be 0-dim"),
        ((q, k, v, sig_r, sig_s, -beta), {}, ValueError, "bandwidth must be finite and > 0"),
        ((q, k, v, sig_r, sig_s, beta / 0), {}, ValueError, "bandwidth must be finite and > 0"),
        ((q, k, v, sig_r, sig_s, beta.long()), {}, TypeError, "bandwidth must be a floating-point tensor"),
        ((q, k.float(), v, sig_r, sig_s, beta), {}, TypeError, "k has dtype"),
        ((q, k, v, sig_r.to("meta"), sig_s, beta), {}, ValueError, "sig_r is on meta but q is on cpu"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.5), ValueError, "seed must be given"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.5, seed=1.5), ValueError, "seed must be an int"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.5, seed=-1), ValueError, "seed must be an int"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.5, seed=2**63), ValueError, "seed must be an int"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.0, seed=1), ValueError, "temperature must be"),
        ((q, k, v, sig_r, sig_s, beta), dict(temperature=0.5, seed=1, threshold=True), ValueError, "exclusive"),
        ((q, k, v, sig_r, sig_s, beta), dict(truncation=0.0), ValueError, "truncation must be a number > 0 or None"),
        ((q, k, v, sig_r, sig_s, beta), dict(truncation=float("nan")), ValueError, "truncation must be"),
        ((q, k, v, sig_r, sig_s, beta), dict(threshold=1), TypeError, "threshold must be a bool"),
    ]
    for args, kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            op(*args, backend="torch", **kwargs)
    big = torch.empty(1, 1, 2**16, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"B·U·V = 4294967296 must be below 2\*\*31"):
        op(big, big, big, torch.empty(2**16, 1, dtype=torch.float64), torch.empty(2**16, 1, dtype=torch.float64), beta, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_seed_draws_the_int_seeds_sample(backend):
    """A 0-dim int64 CPU tensor seed (what a layer passes under torch.compile) is the same seed."""
    args = [t.float() for t in _inputs(2, 2, 6, 10, 4)]
    want = mk.ops.graph_attention(*args, temperature=0.5, seed=2**40 + 5, backend=backend)
    got = mk.ops.graph_attention(*args, temperature=0.5, seed=torch.tensor(2**40 + 5), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="0-dim int64 CPU tensor"):
        mk.ops.graph_attention(*args, temperature=0.5, seed=torch.tensor([5]), backend=backend)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        mk.ops.graph_attention(*args, temperature=0.5, seed=torch.tensor(-1), backend=backend)
