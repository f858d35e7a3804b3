"""Triton read-in attention (kernels/readin.py, m2mkd_fast/triton_backend/readin.py).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before any kernel import), with
dot operands cast to fp32 (the interpreter's bf16 dot is broken): this checks what the kernels
compute, in fp32 and through the bf16 input/output path, not GPU performance. Tests marked
``gpu`` run the same comparisons on a CUDA device at real shapes.

Accuracy follows tests/tolerance.py (FlashAttention's rule): error against a float64 oracle at
most 2× the same-dtype PyTorch oracle's error (plus a tiny atol), outputs and every gradient.
"""

import math
import zlib

import pytest
import torch

from m2mkd_fast.reference.readin import readin_attention as ref_folded
from m2mkd_fast.reference.readin import readin_attention_materialised as ref_materialised
from tolerance import assert_close_to_reference, grad_atol

triton = pytest.importorskip("triton")

from m2mkd_fast.kernels import readin as kern  # noqa: E402  (after conftest set TRITON_INTERPRET)
from m2mkd_fast.triton_backend import readin as tb  # noqa: E402
from m2mkd_fast import ops  # noqa: E402

NAMES = ["q", "x", "w_k", "w_v", "s_k", "s_v", "b_v"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, receivers, senders, heads, head_dim, in_dim, bias=True, gen=None, device="cpu"):
    """Float64 inputs of the op with realistic magnitudes (s ≈ 1 ± 0.2, as 1 + γ·LN(S c))."""

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device)

    return [
        rnd(batch, receivers, heads, head_dim),
        rnd(batch, senders, in_dim),
        rnd(heads, head_dim, in_dim, scale=2 * in_dim**-0.5),
        rnd(heads, head_dim, in_dim, scale=in_dim**-0.5),
        rnd(receivers, in_dim, scale=0.2, shift=1.0),
        rnd(receivers, in_dim, scale=0.2, shift=1.0),
        rnd(heads, head_dim) if bias else None,
    ]


def _run(fn, tensors, dtype, grad_out):
    """fn's output and the gradients of <output, grad_out> w.r.t. every tensor input."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, used, grad_out.to(dtype))
    it = iter(grads)
    return out.detach(), [None if t is None else next(it) for t in leaves]


def _check_against(oracle, tensors, dtype, grad_out, factor=2.0):
    out64, g64 = _run(oracle, tensors, torch.float64, grad_out)
    out_ref, g_ref = _run(oracle, tensors, dtype, grad_out)
    out, grads = _run(tb.readin_attention, tensors, dtype, grad_out)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, out_ref, factor=factor, name="m")
    for name, g, g_r, g_64 in zip(NAMES, grads, g_ref, g64):
        if g_64 is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close_to_reference(g, g_64, g_r, factor=factor, atol=grad_atol(g_64, dtype), name=f"grad {name}")


# (B, U, V, H, C, Din): V=1, V not a multiple of the block (16 under the interpreter), several
# row tiles (H·U = 36 > 16), Din with one piece (16, 64) and two pieces (48 = 32 + 16)
SHAPES = [
    (1, 1, 1, 1, 8, 16),
    (1, 5, 9, 2, 16, 320),
    (2, 7, 33, 3, 8, 48),
    (2, 12, 5, 2, 16, 64),
    (1, 12, 33, 3, 16, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}U{}V{}H{}C{}D{}".format(*s))
def test_matches_folded_oracle(shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    tensors = _inputs(*shape, gen=gen, device=DEVICE)
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], generator=gen, dtype=torch.float64).to(DEVICE)
    _check_against(ref_folded, tensors, dtype, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_materialised_seed_form(dtype):
    shape = (2, 7, 33, 2, 8, 48)
    gen = torch.Generator().manual_seed(7)
    tensors = _inputs(*shape, gen=gen, device=DEVICE)
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], generator=gen, dtype=torch.float64).to(DEVICE)
    _check_against(ref_materialised, tensors, dtype, grad_out)


def test_no_bias_and_fresh_inputs():
    # without b_v; inputs from the global (per-test seeded) generator, not a fixed one
    shape = (2, 7, 5, 2, 8, 32)
    tensors = _inputs(*shape, bias=False, device=DEVICE)
    grad_out = torch.randn(2, 7, 2, 8, dtype=torch.float64, device=DEVICE)
    _check_against(ref_folded, tensors, torch.float32, grad_out)


def test_non_contiguous_inputs():
    B, U, V, H, C, D = 2, 7, 9, 2, 8, 48
    gen = torch.Generator().manual_seed(3)
    base = _inputs(B, U, V, H, C, D, gen=gen, device=DEVICE)
    grad_out = torch.randn(B, U, H, C, generator=gen, dtype=torch.float64).to(DEVICE)
    expected, g_expected = _run(ref_folded, base, torch.float32, grad_out)

    def views(q, x, w_k, w_v, s_k, s_v, b_v):
        # transposed storage for q and the weights, a strided slice for x and the scales
        q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
        x_s = torch.cat([x, torch.zeros_like(x)], dim=-1)[..., :D]
        w_k_t = w_k.transpose(1, 2).contiguous().transpose(1, 2)
        s_k_s = torch.stack([s_k, s_k], dim=1)[:, 0]
        return q_t, x_s, w_k_t, w_v, s_k_s, s_v, b_v

    def fn(*leaves):
        v = views(*leaves)
        assert not v[0].is_contiguous() and not v[1].is_contiguous() and not v[4].is_contiguous()
        return tb.readin_attention(*v)

    out, grads = _run(fn, base, torch.float32, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, g, ge in zip(NAMES, grads, g_expected):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------------------------------
# the kernels alone: q' [B, R, Din] over x [B, N, Din], outputs o and lse, gradients incl. dlse
# ------------------------------------------------------------------------------------------
def _core64(qp, x, scale):
    s = torch.einsum("brd,bnd->brn", qp, x) * scale
    return torch.softmax(s, -1) @ x, torch.logsumexp(s, -1)


@pytest.mark.parametrize("B,R,N,D", [(1, 5, 9, 8), (2, 36, 33, 48), (1, 7, 1, 16), (1, 20, 17, 80), (1, 3, 4, 40),
                                     (1, 18, 17, 320), (2, 9, 5, 256), (1, 5, 3, 272)])
def test_kernels_against_formula(B, R, N, D):
    """Forward (o, logsumexp from the stats) and backward (dq', dx) on their own, incl. Din not a
    multiple of 16 (8, 40), two pieces (80 = 64 + 16, NAC's 256 = 128 + 128 and 320 = 256 + 64,
    272 padded to 256 + 64) and the dX reduction split over rows."""
    qp = torch.randn(B, R, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x = torch.randn(B, N, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    scale = 0.37
    o64, lse64 = _core64(qp, x, scale)
    do = torch.randn_like(o64)
    dq64, dx64 = torch.autograd.grad(o64, (qp, x), do)
    q32, x32 = qp.detach().float().requires_grad_(True), x.detach().float().requires_grad_(True)
    o32, lse32 = _core64(q32, x32, scale)
    dq32, dx32 = torch.autograd.grad(o32, (q32, x32), do.float())

    o, stats = kern.readin_fwd(qp.detach().float(), x.detach().float(), scale)
    assert_close_to_reference(o, o64, o32, name="o")
    assert_close_to_reference(kern.logsumexp_from_stats(stats), lse64, lse32, name="lse")
    for splits in (None, 3):
        dq, dx = kern.readin_bwd(do.float(), qp.detach().float(), x.detach().float(), o, stats, scale, dx_splits=splits)
        assert_close_to_reference(dq, dq64, dq32, atol=grad_atol(dq64, torch.float32), name=f"dq (splits={splits})")
        assert_close_to_reference(dx, dx64, dx32, atol=grad_atol(dx64, torch.float32), name=f"dx (splits={splits})")


def test_poisoned_outputs(monkeypatch):
    """Every output buffer the launchers allocate (o, stats, dq', dx, delta, split partials) starts
    as NaN: an element the kernels fail to write shows up."""
    B, R, N, D = 2, 21, 19, 48
    qp = torch.randn(B, R, D, device=DEVICE)
    x = torch.randn(B, N, D, device=DEVICE)
    do = torch.randn(B, R, D, device=DEVICE)
    o_ref, stats_ref = kern.readin_fwd(qp, x, 0.3)
    dq_ref, dx_ref = kern.readin_bwd(do, qp, x, o_ref, stats_ref, 0.3)

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(kern.torch, "empty", nan_empty)
    monkeypatch.setattr(kern.torch, "empty_like", nan_empty_like)
    assert torch.empty(2).isnan().all()  # the patch is live
    o, stats = kern.readin_fwd(qp, x, 0.3)
    for splits in (None, 2):
        dq, dx = kern.readin_bwd(do, qp, x, o, stats, 0.3, dx_splits=splits)
        for name, t, ref in (("o", o, o_ref), ("stats", stats, stats_ref), ("dq", dq, dq_ref), ("dx", dx, dx_ref)):
            assert torch.isfinite(t).all(), f"{name}: unwritten (NaN) elements"
            torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-5)


def test_dx_split_choice():
    """The dX reduction is split over query rows only when B·cdiv(N, BLOCK_N) leaves SMs idle,
    and every split owns a whole number of granules of rows."""
    splits, rows = kern._dx_splits(1, 300, 5, torch.device("cpu"))
    assert splits > 1 and rows * splits >= 300 and rows * (splits - 1) < 300
    splits, rows = kern._dx_splits(64, 300, 400, torch.device("cpu"))
    assert splits == 1 and rows >= 300


def test_din_pieces():
    assert kern.din_pieces(320) == (256, 64)
    assert kern.din_pieces(256) == (128, 128)
    assert kern.din_pieces(48) == (32, 16)
    assert kern.din_pieces(8) == (16, 0)
    assert kern.din_pieces(384) == (256, 128)
    assert kern.din_pieces(192) == (128, 64)
    assert kern.din_pieces(272) == (256, 64)  # padded: few variants, each verified with ptxas
    assert kern.din_pieces(400) == (256, 256)
    assert kern.din_pieces(24) == (32, 0)
    for din in range(1, kern.MAX_DIN + 1):  # every Din maps to a listed variant that covers it
        da, db = kern.din_pieces(din)
        assert (da, db) in kern.VARIANTS["bf16"] and da + db >= din
        assert db == 0 or da < din  # a second piece only once the first is full
    assert kern.din_pieces(512) == (256, 256)
    with pytest.raises(ValueError, match="Din"):
        kern.din_pieces(kern.MAX_DIN + 16)


def test_verified_table_is_consistent():
    """The config table: variants and configs are the declared candidates, shared memory within
    the target's limit, and the NAC shapes (Din 256 and 320, bf16) run on sm_80 and sm_90a."""
    for (kind, target, dtype, da, db), entries in kern.VERIFIED.items():
        assert (da, db) in kern.VARIANTS[dtype] and target in kern.TARGETS
        for bm, bn, warps, stages, shared in entries:
            assert (bm, bn, warps, stages) in kern.CANDIDATES[(kind, dtype)]
            assert 0 < shared <= kern.SHARED_LIMIT[target]
    for target in kern.TARGETS:
        for din in (256, 320, 64, 192):
            da, db = kern.din_pieces(din)
            assert all(kern.VERIFIED.get((kind, target, "bf16", da, db)) for kind in ("fwd", "dq", "dx")), (target, din)


def test_supported_and_pruner_follow_the_table(monkeypatch):
    """On a (pretend) GPU the autotuner sees only configs ptxas verified for that target, dtype
    and Din, filtered by the device's shared memory; without any, the op uses the torch backend."""
    monkeypatch.setattr(kern, "interpreting", lambda: False)
    monkeypatch.setattr(kern, "_device_target", lambda device: (90, 227 * 1024))
    cuda = torch.device("cuda")
    assert kern.supported(cuda, torch.bfloat16, 320) and kern.supported(cuda, torch.float16, 256)
    assert kern.supported(cuda, torch.float32, 64)
    assert not kern.supported(cuda, torch.float32, 320)  # fp32 FMA dots spill at this Din
    assert not kern.supported(cuda, torch.bfloat16, 512) and not kern.supported(cuda, torch.float64, 64)
    assert not kern.supported(torch.device("cpu"), torch.bfloat16, 320)

    class FakeX:
        device, dtype = cuda, torch.bfloat16

    da, db = kern.din_pieces(320)
    args = dict(X=FakeX(), DA=da, DB=db, HAS_B=True)
    configs = [kern._cfg(*c) for c in kern.CANDIDATES[("fwd", "bf16")]]
    kept = kern._pruner("fwd")(configs, {}, **args)
    want = {e[:4] for e in kern.VERIFIED[("fwd", 90, "bf16", da, db)]}
    assert kept and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == want
    # a device with 99 KiB per block (sm_86/89) keeps only the configs that fit
    monkeypatch.setattr(kern, "_device_target", lambda device: (80, 99 * 1024))
    kept = kern._pruner("dq")([kern._cfg(*c) for c in kern.CANDIDATES[("dq", "bf16")]], {}, **args)
    fits = {e[:4] for e in kern.VERIFIED[("dq", 80, "bf16", da, db)] if e[4] <= 99 * 1024}
    assert fits and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == fits


def test_kernel_rejects_bad_inputs():
    x = torch.randn(1, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        kern.readin_fwd(torch.randn(2, 4, 16, device=DEVICE), x, 1.0)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        kern.readin_fwd(torch.randn(1, 4, 16, device=DEVICE, dtype=torch.float64), x.double(), 1.0)


def test_large_din_falls_back():
    """Din beyond the kernels' register budget: the backend says it does not support the case,
    dispatch runs it on the next backend (also when Triton is asked for), same numbers."""
    shape = (1, 3, 4, 1, 8, kern.MAX_DIN + 16)
    tensors = [t.float() for t in _inputs(*shape, device=DEVICE)]
    assert not tb.supports(*tensors)
    with pytest.raises(ValueError, match="no verified kernel config"):
        tb.readin_attention(*tensors)
    got = ops.readin_attention(*tensors, backend="triton")
    torch.testing.assert_close(got, ref_folded(*tensors), rtol=1e-4, atol=1e-5)


def test_support_check_traces_when_din_changes():
    """torch.compile(fullgraph=True) through the op: the support check traces as Din changes
    between calls (a recompile with a dynamic Din), the unsupported Din falling through."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: ops.readin_attention(*t, backend="triton"), fullgraph=True, backend="aot_eager")
    for din in (32, kern.MAX_DIN + 16, 40):
        tensors = [t.float() for t in _inputs(1, 3, 4, 1, 8, din, device=DEVICE)]
        torch.testing.assert_close(compiled(*tensors), ref_folded(*tensors), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# custom op: schema, fake impl, autograd registration; torch.compile
# ------------------------------------------------------------------------------------------


def test_fake_impl_on_meta():
    q, x, w_k, w_v, s_k, s_v, b_v = [t.float().to("meta") for t in _inputs(128, 192, 784, 8, 64, 320)]
    m = tb.readin_attention(q, x, w_k, w_v, s_k, s_v, b_v)
    assert m.shape == (128, 192, 8, 64) and m.device.type == "meta"
    o, stats = tb.readin_attn(torch.empty(3, 40, 320, device="meta", dtype=torch.bfloat16),
                              torch.empty(3, 9, 320, device="meta", dtype=torch.bfloat16), 0.125)
    assert o.shape == (3, 40, 320) and o.dtype == torch.bfloat16
    assert stats.shape == (3, 40, 2) and stats.dtype == torch.float32


def test_compile_fullgraph():
    """torch.compile(fullgraph=True), inductor, through the custom op, forward and backward: the
    fake impl traces, the registered autograd is used, inductor compiles the projections around
    the op (on CPU with the machine's compiler; the kernels themselves run interpreted, ~15 s)."""
    B, U, V, H, C, D = 2, 5, 7, 2, 8, 32
    tensors = [t.float() for t in _inputs(B, U, V, H, C, D, device=DEVICE)]
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    compiled = torch.compile(tb.readin_attention, fullgraph=True)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    leaves_e = [t.clone().requires_grad_(True) for t in tensors]
    out_e = tb.readin_attention(*leaves_e)
    grads_e = torch.autograd.grad(out_e.square().sum(), leaves_e)
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


# ------------------------------------------------------------------------------------------
# real GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 64, 64, 6, 64, 256), (2, 192, 784, 8, 64, 320), (3, 17, 111, 3, 32, 80)],
                         ids=["tiny_imagenet", "imagenet", "odd"])
def test_gpu_matches_oracle(shape, dtype):
    gen = torch.Generator().manual_seed(11)
    tensors = _inputs(*shape, gen=gen, device="cuda")
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], generator=gen, dtype=torch.float64).cuda()
    _check_against(ref_folded, tensors, dtype, grad_out)


@pytest.mark.gpu
def test_compile_inductor_gpu():
    tensors = [t.bfloat16() for t in _inputs(2, 64, 100, 4, 32, 128, device="cuda")]
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    compiled = torch.compile(tb.readin_attention, fullgraph=True)
    out = compiled(*leaves)
    out.float().square().sum().backward()
    out_e = tb.readin_attention(*tensors)
    torch.testing.assert_close(out, out_e)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_scale_uses_head_dim():
    """The kernel's softmax scale is 1/√C with C the head dim of q, not Din."""
    B, U, V, H, C, D = 1, 3, 5, 1, 4, 16
    tensors = [t.float() for t in _inputs(B, U, V, H, C, D, device=DEVICE)]
    out = tb.readin_attention(*tensors)
    torch.testing.assert_close(out, ref_folded(*tensors), rtol=1e-5, atol=1e-5)
    wrong = ref_folded(tensors[0] * math.sqrt(C / D), *tensors[1:])  # as if scaled by 1/√Din
    assert (out - wrong).abs().max() > 1e-3


def test_public_op_dispatches_to_triton():
    """mk.ops.readin_attention(backend="triton") runs this backend (validated, autograd on)."""
    import m2mkd_fast as mk
    from m2mkd_fast import backend

    assert backend.select("readin_attention", torch.device(DEVICE), "triton")[1] is tb.readin_attention
    tensors = [t.float().requires_grad_(True) for t in _inputs(2, 3, 5, 2, 8, 32, device=DEVICE)]
    out = mk.ops.readin_attention(*tensors, backend="triton")
    torch.testing.assert_close(out, ref_folded(*tensors), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None for t in tensors)
