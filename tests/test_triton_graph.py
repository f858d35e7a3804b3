"""Triton graph attention (kernels/graph.py, m2mkd_fast/triton_backend/graph.py) against
the dense oracle m2mkd_fast.reference.graph_attention: outputs and all gradients, every mode,
fp32 and bf16, tile skipping, empty rows, poisoned buffers, custom-op registration.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), with 32×32 tiles (16×16
in the tile-skipping tests) so that small shapes still span several tiles. The interpreter's
cost is per operation, not per element: few, large tiles keep the file fast.
"""

from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

import m2mkd_fast as mk  # noqa: E402
from m2mkd_fast import reference  # noqa: E402
from m2mkd_fast.kernels import graph as K  # noqa: E402
from m2mkd_fast.triton_backend.graph import graph_attention as triton_graph_attention  # noqa: E402

from tolerance import TINY_ATOL, assert_close_to_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "sig_r", "sig_s", "bandwidth")
MODES = {
    "deterministic": dict(truncation=0.9),
    "sampled": dict(truncation=0.9, temperature=0.5, seed=1234),
    "threshold": dict(truncation=0.9, threshold=True),
    "dense": dict(truncation=None),
}


def make_inputs(B, H, U, V, C, S, dtype=torch.float32, beta=0.8, sig_r=None, sig_s=None, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(B, H, U, C, generator=g)
    k = torch.randn(B, H, V, C, generator=g)
    v = torch.randn(B, H, V, C, generator=g)
    sig_r = torch.randn(U, S, generator=g) if sig_r is None else sig_r
    sig_s = torch.randn(V, S, generator=g) if sig_s is None else sig_s
    bandwidth = torch.tensor(beta)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, sig_r, sig_s, bandwidth)]


def run(fn, inputs, grad_out=None, **kw):
    """Output and gradients of all six inputs (None where no gradient reaches an input)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kw)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), grads


def bandwidth_error_scale(inputs, grad_out, **kw) -> float:
    """fp32 eps · Σ|g·ℓ|/β with g = dL/dℓ (float64 oracle): the rounding scale of dL/dβ, a sum of
    B·H·U·V terms that mostly cancel (here by factors ~100), which max-norm comparisons against
    the same-dtype oracle cannot judge alone. Read through the oracle's distance matrix."""
    captured = []
    distance = reference.graph._distance

    def spy(*args):
        dist = distance(*args)
        dist.retain_grad()
        captured.append(dist)
        return dist

    with mock.patch.object(reference.graph, "_distance", spy):
        leaves = [t.detach().double().requires_grad_() for t in inputs]
        reference.graph_attention(*leaves, **kw).backward(grad_out.double())
    # ℓ = −dist/β on kept edges: g·ℓ = (dL/d dist)·dist
    terms = sum(float((d.grad * d).abs().sum().detach()) for d in captured if d.grad is not None)
    return torch.finfo(torch.float32).eps * terms / float(inputs[5])


def check_against_oracle(inputs, grad=True, blocks=(32, 32), **kw):
    """The kernel vs the float64 oracle, within 2x the same-dtype oracle's error (tolerance.py);
    for dL/dβ also within the rounding scale of its sum (bandwidth_error_scale)."""
    B, H, U, C = inputs[0].shape
    grad_out = torch.randn(B, H, U, C, device=DEVICE).to(inputs[0].dtype) if grad else None
    out, grads = run(triton_graph_attention, inputs, grad_out, block_u=blocks[0], block_v=blocks[1], **kw)
    out64, grads64 = run(reference.graph_attention, [t.double() for t in inputs], grad_out, **kw)
    out_d, grads_d = run(reference.graph_attention, inputs, grad_out, **kw)
    assert out.dtype == inputs[0].dtype
    assert_close_to_reference(out, out64, out_d, name="o")
    if grad:
        for name, g, g64, gd, t in zip(NAMES, grads, grads64, grads_d, inputs):
            if g64 is None:
                assert g is None, f"d{name}: the oracle gives no gradient, the kernel does"
                continue
            assert g is not None, f"d{name}: no gradient"
            assert g.dtype == t.dtype and g.shape == t.shape
            atol = None
            if name == "bandwidth":
                atol = max(TINY_ATOL[t.dtype], bandwidth_error_scale(inputs, grad_out, **kw))
            assert_close_to_reference(g, g64, gd, name=f"d{name}", atol=atol)
    return out, grads


# ------------------------------------------------------------------------------------------
# oracle comparisons
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_oracle(mode, dtype):
    inputs = make_inputs(2, 2, 37, 50, 16, 16, dtype)
    check_against_oracle(inputs, **MODES[mode])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sampling_in_kernel_matches_oracle(monkeypatch, dtype):
    """The sample drawn inside every (batch, head) program instead of once into the per-pass
    cache (the default, which every other sampled test exercises)."""
    monkeypatch.setattr(K, "SAMPLE_CACHE", False)
    check_against_oracle(make_inputs(2, 2, 37, 50, 16, 16, dtype), **MODES["sampled"])


def test_sample_cache_and_in_kernel_sampling_agree(monkeypatch):
    """In-kernel sampling, and the cache over the whole batch or in chunks (one batch element
    each here: the noise stream must follow the batch index across chunks) agree."""
    B, H, U, V, C, S = 3, 2, 20, 33, 16, 16
    q, k, v, sig_r, sig_s, beta = make_inputs(B, H, U, V, C, S)
    sr, ss = F_normalize(sig_r), F_normalize(sig_s)
    ell = K.log_affinity(sr, ss, beta, 0.9, False)
    lb, jac = K.sample(ell, B, 0.5, 21, True, blocks=(16, 16))
    kept = (ell > float("-inf")).expand(B, U, V)
    assert (lb[kept] <= 0).all() and (jac[kept] >= 0).all() and (jac[kept] > 0).any()
    o1, lse1 = K.forward(q, k, v, ell, 0.5, 21, sample_cache=False)
    o2, lse2 = K.forward(q, k, v, ell, 0.5, 21, sample_cache=True)
    torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(o1)
    g1 = K.backward(do, q, k, v, o1, lse1, ell, sr, ss, 0.5, 21, True, sample_cache=False)
    g2 = K.backward(do, q, k, v, o2, lse2, ell, sr, ss, 0.5, 21, True, sample_cache=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(K, "SAMPLE_CACHE_BYTES", U * V * 8)
    assert len(K._batch_chunks(B, U, V, 2, 8)) == B
    o3, lse3 = K.forward(q, k, v, ell, 0.5, 21, sample_cache=True)
    torch.testing.assert_close(o3, o2, atol=0, rtol=0)
    g3 = K.backward(do, q, k, v, o3, lse3, ell, sr, ss, 0.5, 21, True, sample_cache=True)
    for a, b in zip(g3, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "shape", [(1, 1, 7, 9, 8, 4), (2, 1, 1, 1, 16, 4), (1, 2, 37, 9, 16, 16)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("mode", ["deterministic", "sampled"])
def test_odd_shapes(shape, mode):
    check_against_oracle(make_inputs(*shape), **MODES[mode])


def test_sampled_noise_is_the_shared_stream():
    """q = k = 0 and v = the identity read the attention weights themselves, softmax_v of the
    sampled bias: log o must equal the oracle's log-softmax of its bias (same Philox uniforms)."""
    B, H, U, V, S, C = 2, 2, 7, 9, 4, 16
    _, _, _, sig_r, sig_s, beta = make_inputs(B, H, U, V, C, S)
    q = torch.zeros(B, H, U, C, device=DEVICE)
    k = torch.zeros(B, H, V, C, device=DEVICE)
    v = torch.eye(V, C, device=DEVICE).expand(B, H, V, C)
    kw = dict(truncation=None, temperature=0.5, seed=987654321)
    o = triton_graph_attention(q, k, v, sig_r, sig_s, beta, block_u=16, block_v=16, **kw)[..., :V]
    expected = reference.graph_attention(*[t.double() for t in (q, k, v, sig_r, sig_s, beta)], **kw)[..., :V]
    assert (expected.amax(-1) < 0.9).all() and (expected.amin(-1) > 0).all()  # informative weights
    torch.testing.assert_close(torch.log(o.double()), torch.log(expected), atol=2e-5, rtol=0)


def test_sampled_seed_semantics():
    inputs = make_inputs(2, 2, 20, 33, 16, 16)
    kw = dict(truncation=0.9, temperature=0.5, block_u=32, block_v=64)
    a = triton_graph_attention(*inputs, seed=7, **kw)
    b = triton_graph_attention(*inputs, seed=7, **kw)
    c = triton_graph_attention(*inputs, seed=8, **kw)
    big = triton_graph_attention(*inputs, seed=2**40 + 7, **kw)  # the high key word matters
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert (a - big).abs().max() > 1e-2
    # the sample is per batch element: two identical batch elements get different outputs
    q, k, v, *rest = inputs
    same = [t[:1].expand(2, *t.shape[1:]) for t in (q, k, v)]
    o = triton_graph_attention(*same, *rest, seed=7, **kw)
    assert (o[0] - o[1]).abs().max() > 1e-2
    # ...and the same for every head
    qh, kh, vh = (t[:, :1].expand(-1, 2, -1, -1) for t in (q, k, v))
    o = triton_graph_attention(qh, kh, vh, *rest, seed=7, **kw)
    assert torch.equal(o[:, 0], o[:, 1])


# ------------------------------------------------------------------------------------------
# graph structure: empty rows, skipped tiles, dense and single-edge graphs
# ------------------------------------------------------------------------------------------


def clustered_signatures(U, V, S, n_clusters, shuffle, gen_seed=0):
    """Each latent sits near one of n_clusters orthogonal directions (distance ≈ 1 > τ between
    clusters, ≈ 0 within): block-diagonal graph when sorted, scattered when shuffled."""
    g = torch.Generator().manual_seed(gen_seed)
    centers = torch.eye(S)[:n_clusters] * 10

    def draw(n):
        cluster = torch.arange(n) * n_clusters // n
        if shuffle:
            cluster = cluster[torch.randperm(n, generator=g)]
        return centers[cluster] + 0.3 * torch.randn(n, S, generator=g)

    return draw(U), draw(V)


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("mode", ["deterministic", "sampled"])
def test_skips_empty_tiles(mode, monkeypatch):
    """Clustered signatures leave tiles empty; buffers are NaN-poisoned and the sample cache is
    written on 16×16 tiles but read on 32×32 ones, so its unwritten (skipped) parts must never
    be read."""
    monkeypatch.setattr(K, "_empty", poisoned)
    monkeypatch.setattr(K, "SAMPLE_TILE", (16, 16))
    U, V, S = 37, 50, 16
    sig_r, sig_s = clustered_signatures(U, V, S, 3, shuffle=False)
    inputs = make_inputs(1, 2, U, V, 16, S, sig_r=sig_r, sig_s=sig_s)
    ell = K.log_affinity(*[F_normalize(t) for t in inputs[3:5]], inputs[5], 0.9, False)
    tiles = K.tile_lists(ell, 16, 16)
    total = tiles.cnt_u.numel() * tiles.cnt_v.numel()
    assert 0 < int(tiles.cnt_u.sum()) < total, "the clustered graph must leave some tiles empty"
    assert int(tiles.cnt_u.sum()) == int(tiles.cnt_v.sum())
    check_against_oracle(inputs, blocks=(16, 16), **MODES[mode])
    check_against_oracle(inputs, blocks=(32, 32), **MODES[mode])


def F_normalize(t):
    return torch.nn.functional.normalize(t.float(), dim=-1, eps=1e-12)


def test_scattered_clusters():
    U, V, S = 37, 50, 16
    sig_r, sig_s = clustered_signatures(U, V, S, 4, shuffle=True)
    check_against_oracle(make_inputs(1, 2, U, V, 16, S, sig_r=sig_r, sig_s=sig_s), blocks=(16, 32), **MODES["sampled"])


@pytest.mark.parametrize("mode", ["deterministic", "sampled", "threshold"])
def test_rows_without_edges(mode):
    U, V, S = 37, 50, 16
    g = torch.Generator().manual_seed(1)
    sig_s = torch.randn(V, S, generator=g)
    sig_s[:, 0] = sig_s[:, 0].abs() + 3.0  # every sender leans towards +e0
    sig_r = torch.randn(U, S, generator=g)
    empty = torch.zeros(U, dtype=torch.bool)
    empty[[0, 5, 16, 17, 31, 36]] = True
    sig_r[empty] = 0.0
    sig_r[empty, 0] = -1.0  # pointing away from every sender: distance > 1 > τ
    inputs = make_inputs(1, 2, U, V, 16, S, sig_r=sig_r, sig_s=sig_s)
    ell = reference.graph_log_affinity(sig_r, sig_s, inputs[5], 0.9, mode == "threshold")
    no_edge = ~(ell > float("-inf")).any(dim=1)
    assert no_edge[empty].all() and (~no_edge).sum() >= 10
    out, grads = check_against_oracle(inputs, blocks=(16, 32), **MODES[mode])
    assert torch.equal(out[:, :, no_edge], torch.zeros_like(out[:, :, no_edge]))
    assert torch.equal(grads[0][:, :, no_edge], torch.zeros_like(grads[0][:, :, no_edge]))
    assert (out[:, :, ~no_edge].abs().sum(-1) > 0).all()


def test_all_rows_empty():
    U, V, S = 7, 9, 4
    sig_r = torch.zeros(U, S)
    sig_r[:, 0] = 1.0
    sig_s = torch.zeros(V, S)
    sig_s[:, 0] = -1.0
    inputs = make_inputs(1, 2, U, V, 16, S, sig_r=sig_r, sig_s=sig_s)
    out, grads = check_against_oracle(inputs, **MODES["deterministic"])
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_fully_dense_graph():
    U, V, S = 37, 50, 16
    direction = torch.randn(S)
    sig_r = direction.expand(U, S) * torch.rand(U, 1) + 1e-3 * torch.randn(U, S)
    sig_s = direction.expand(V, S) * torch.rand(V, 1) + 1e-3 * torch.randn(V, S)
    inputs = make_inputs(2, 1, U, V, 16, S, sig_r=sig_r, sig_s=sig_s)
    ell = K.log_affinity(F_normalize(sig_r), F_normalize(sig_s), inputs[5], 0.9, False)
    assert bool((ell > float("-inf")).all())
    check_against_oracle(inputs, **MODES["sampled"])


def test_single_edge_per_row():
    """One-hot signatures: u's only neighbour is v = u; the output is v's value exactly."""
    U, S = 20, 32
    sig = torch.eye(U, S)
    inputs = make_inputs(2, 2, U, U, 16, S, sig_r=sig, sig_s=sig.clone())
    out, _ = check_against_oracle(inputs, **MODES["deterministic"])
    torch.testing.assert_close(out, inputs[2], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# layouts, buffers, options
# ------------------------------------------------------------------------------------------


def test_noncontiguous_inputs_and_expanded_grad():
    B, H, U, V, C, S = 2, 2, 20, 33, 16, 16
    q, k, v, sig_r, sig_s, beta = make_inputs(B, H, U, V, C, S)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B,H,U,C] view with head stride C
    kt = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    vt = torch.cat([v, v], dim=-1)[..., ::2]  # channel stride 2
    assert not (qt.is_contiguous() or kt.is_contiguous() or vt.is_contiguous())
    sig_rt = torch.cat([sig_r, sig_r], dim=0)[::2]
    args = [qt, kt, vt, sig_rt, sig_s, beta]
    leaves = [t.detach().clone().requires_grad_() for t in args]
    kw = dict(truncation=0.9, temperature=0.5, seed=3)
    triton_graph_attention(*leaves, block_u=32, block_v=32, **kw).sum().backward()  # grad_out has zero strides
    ref_leaves = [t.detach().double().requires_grad_() for t in args]
    reference.graph_attention(*ref_leaves, **kw).sum().backward()
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4, msg=f"d{name}")


def test_poisoned_buffers(monkeypatch):
    """Every element of every kernel output is written: NaN-filled buffers leave no trace."""
    monkeypatch.setattr(K, "_empty", poisoned)
    inputs = make_inputs(2, 2, 37, 50, 16, 16)  # ragged tiles: 37 = 32 + 5, 50 = 32 + 18
    out, grads = check_against_oracle(inputs, **MODES["sampled"])
    assert all(torch.isfinite(g).all() for g in grads)


def test_heads_per_program_and_blocks_agree():
    """Backward partials per batch element (heads looped in-program) or per (batch, head), and
    different tile sizes, give the same result."""
    B, H, U, V, C, S = 2, 2, 20, 33, 16, 16
    q, k, v, sig_r, sig_s, beta = make_inputs(B, H, U, V, C, S)
    sr, ss = F_normalize(sig_r), F_normalize(sig_s)
    ell = K.log_affinity(sr, ss, beta, 0.9, False)
    o, lse = K.forward(q, k, v, ell, 0.5, 11, blocks=(16, 16))
    o32, lse32 = K.forward(q, k, v, ell, 0.5, 11, blocks=(32, 64))
    torch.testing.assert_close(o, o32, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse32, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(o)
    a = K.backward(do, q, k, v, o, lse, ell, sr, ss, 0.5, 11, True, blocks=(16, 16), heads_per_program=1)
    b = K.backward(do, q, k, v, o, lse, ell, sr, ss, 0.5, 11, True, blocks=(32, 64), heads_per_program=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_through_ops_and_layers_of_dispatch():
    inputs = make_inputs(1, 2, 7, 9, 16, 4)
    kw = dict(truncation=0.9, temperature=0.5, seed=5)
    a = mk.ops.graph_attention(*inputs, backend="triton", **kw)
    b = triton_graph_attention(*inputs, **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_inputs():
    inputs = make_inputs(1, 1, 7, 9, 16, 4)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_graph_attention(*[t.double() for t in inputs])
    with pytest.raises(ValueError, match="block_u"):
        triton_graph_attention(*inputs, block_u=24, block_v=16)
    with pytest.raises(ValueError, match="seed"):
        triton_graph_attention(*inputs, temperature=0.5)


def test_fp16():
    check_against_oracle(make_inputs(1, 2, 37, 50, 16, 16, torch.float16), **MODES["sampled"])


# ------------------------------------------------------------------------------------------
# custom-op registration, compile
# ------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 2, 7, 9, 16, 4)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, sig_r, sig_s, beta):
        o = triton_graph_attention(q, k, v, sig_r, sig_s, beta, truncation=0.9, temperature=0.5, seed=9)
        return (o * o).sum()

    f(*leaves).backward()
    ref = [t.detach().clone().requires_grad_() for t in inputs]
    o = triton_graph_attention(*ref, truncation=0.9, temperature=0.5, seed=9)
    (o * o).sum().backward()
    for name, a, b in zip(NAMES, leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_default_blocks(mode, dtype):
    """On a GPU: the real tile sizes and autotuned configs, NAC-like shapes, vs the oracle."""
    inputs = make_inputs(2, 3, 200, 263, 64, 64, dtype)
    check_against_oracle(inputs, blocks=(0, 0), **MODES[mode])
