"""Mixed precision (docs/design.md §2.7): float32 routing under autocast, matmul ops that follow
autocast on every backend, fp16 safety, and every op × backend × precision against float64."""

import pytest
import torch

import m2mkd_fast as mk
from m2mkd_fast import reference
from m2mkd_fast.backend import available_backends
from m2mkd_fast.layers.moe import MoEMLP
from tolerance import TINY_ATOL, assert_close_to_reference

BACKENDS = available_backends("cpu")
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _layer_call(layer, x, seed, autocast_dtype=None):
    """(y, aux_loss, load, dropped, expert choices) of one MoEMLP call."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = layer(x)
    return y, layer.aux_loss, layer.stats["load"], layer.stats["dropped"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("training", [False, True])
def test_moe_layer_routes_in_float32_under_autocast(backend, autocast_dtype, training):
    """The issue's case (7 of 200 tokens changed experts under bf16 routing): under autocast the
    layer makes exactly the float32 decisions, its aux loss is float32, its output the autocast dtype."""
    torch.manual_seed(0)
    layer = MoEMLP(64, 128, 8, k=2, capacity_factor=1.05, backend=backend).train(training)
    x = torch.randn(200, 64)
    y32, aux32, load32, dropped32 = _layer_call(layer, x, seed=1)
    y, aux, load, dropped = _layer_call(layer, x, seed=1, autocast_dtype=autocast_dtype)
    assert y.dtype == autocast_dtype and aux.dtype == torch.float32
    assert torch.equal(load, load32) and torch.equal(dropped, dropped32)
    torch.testing.assert_close(aux, aux32, rtol=0, atol=0)
    assert dropped32.sum() > 0  # capacity 1.05 drops pairs: the slots are exercised too


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_expert_choices_match_float32_under_autocast(backend, monkeypatch):
    """Beyond the counts: every token's experts and slots equal those of float32."""
    import m2mkd_fast.layers.moe as moe_layer

    seen = []
    route = moe_layer.route

    def recording_route(*args, **kwargs):
        seen.append(route(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(moe_layer, "route", recording_route)
    torch.manual_seed(0)
    layer = MoEMLP(64, 128, 8, k=2, capacity_factor=1.05, backend=backend).eval()
    x = torch.randn(200, 64)
    _layer_call(layer, x, seed=1)
    for dtype in AUTOCAST_DTYPES:
        _layer_call(layer, x, seed=1, autocast_dtype=dtype)
    for r in seen[1:]:
        assert torch.equal(r.expert, seen[0].expert) and torch.equal(r.slot, seen[0].slot)
        assert r.weight.dtype == torch.float32
        torch.testing.assert_close(r.weight, seen[0].weight, rtol=0, atol=0)


# ------------------------------------------------------------- every op × backend × precision
# A precision: (name, dtype the inputs are given in, autocast dtype or None, dtype of the compute).
# Inputs are drawn in float64 and rounded to the compute dtype first, so the backend, the float64
# oracle and the oracle run in the compute dtype all see the same numbers (tests/tolerance.py).
PRECISIONS = [
    ("fp32", torch.float32, None, torch.float32),
    ("bf16", torch.bfloat16, None, torch.bfloat16),
    ("fp16", torch.float16, None, torch.float16),
    ("autocast-bf16", torch.float32, torch.bfloat16, torch.bfloat16),
    ("autocast-fp16", torch.float32, torch.float16, torch.float16),
]


def _atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """What no implementation can avoid (as in test_graph_attention._grad_atol): one ulp of the
    largest |value| in 16 bits; 32 ulps of (1 + max |value|) in float32 (long reductions)."""
    scale = 1 + ref64.abs().max().item() if ref64.numel() else 1.0
    if dtype == torch.float32:
        return 32 * torch.finfo(torch.float32).eps * scale
    return max(TINY_ATOL[dtype], torch.finfo(dtype).eps * scale)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _run(fn, tensors, wrt, grad, autocast=None):
    """(output, gradients w.r.t. tensors[i] for i in wrt) of fn(*tensors) under an optional autocast."""
    leaves = [t if t is None or i not in wrt else t.detach().requires_grad_() for i, t in enumerate(tensors)]
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], grad.to(out.dtype))
    return out, grads


def _compare(op, oracle, base, wrt, precision, given=None):
    """The op on ``base`` (float64 values) at ``precision`` against the float64 oracle and the oracle
    run in the compute dtype: forward and the gradients w.r.t. base[i], i in wrt.

    given(i, dtype) is the dtype in which argument i is passed (default: every tensor in ``dtype``).
    """
    name, dtype, autocast, compute = precision
    given = given or (lambda i, d: d)
    rounded = [None if t is None else t.to(compute).double() for t in base]

    def cast(d):
        return [None if t is None else t.to(given(i, d)) for i, t in enumerate(rounded)]

    with torch.no_grad():
        shape = oracle(*rounded).shape
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out64, g64 = _run(oracle, rounded, wrt, grad)
    out_ref, g_ref = _run(oracle, cast(compute), wrt, grad)
    out, g = _run(op, cast(dtype), wrt, grad, autocast)
    assert out.dtype == compute, f"{name}: output dtype {out.dtype}, expected {compute}"
    assert_close_to_reference(out, out64, out_ref, atol=_atol(out64, compute), name=f"out ({name})")
    for i, a, r64, r in zip(wrt, g, g64, g_ref):
        assert a.dtype == cast(dtype)[i].dtype, f"{name}: gradient {i} dtype {a.dtype}"
        assert_close_to_reference(a, r64, r, atol=_atol(r64, compute), name=f"d input {i} ({name})")


def _op(name, backend):
    return lambda *args, **kwargs: getattr(mk.ops, name)(*args, backend=backend, **kwargs)


PRECISION_IDS = [p[0] for p in PRECISIONS]


@pytest.mark.parametrize("precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_precision(backend, precision):
    gen = torch.Generator().manual_seed(1)
    T, d, h, E, k = 23, 16, 24, 3, 2
    r = reference.route(_randn(gen, T, E), k, capacity_factor=0.75)
    assert (r.slot < 0).any()
    weight = r.weight.detach()
    base = [_randn(gen, T, d), weight, _randn(gen, E, d, h, scale=0.3), _randn(gen, E, h), _randn(gen, E, h, d, scale=0.3), _randn(gen, E, d)]

    def bind(fn):
        return lambda x, w, w1, b1, w2, b2: fn(x, r._replace(weight=w), w1, b1, w2, b2, "gelu")

    # the routing weight is float32 under autocast (as the layer's router gives it), else x's dtype
    given = (lambda i, d: torch.float32 if i == 1 and precision[2] is not None else d)
    _compare(bind(_op("moe_mlp", backend)), bind(reference.moe_mlp), base, range(6), precision, given)


@pytest.mark.parametrize("precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_readin_attention_precision(backend, precision):
    gen = torch.Generator().manual_seed(2)
    B, U, H, C, V, Din = 2, 3, 2, 8, 7, 16
    base = [
        _randn(gen, B, U, H, C), _randn(gen, B, V, Din), _randn(gen, H, C, Din, scale=0.3), _randn(gen, H, C, Din, scale=0.3),
        1 + 0.2 * _randn(gen, U, Din), 1 + 0.2 * _randn(gen, U, Din), _randn(gen, H, C),
    ]
    _compare(_op("readin_attention", backend), reference.readin_attention, base, range(7), precision)


@pytest.mark.parametrize("mode", ["no_sample", "sample"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_attention_precision(backend, precision, mode):
    gen = torch.Generator().manual_seed(3)
    B, H, U, V, C, S = 2, 2, 5, 9, 8, 4
    base = [_randn(gen, B, H, U, C), _randn(gen, B, H, V, C), _randn(gen, B, H, V, C), _randn(gen, U, S), _randn(gen, V, S), torch.tensor(1.2, dtype=torch.float64)]
    kwargs = dict(temperature=0.5, seed=7) if mode == "sample" else {}

    def bind(fn):
        return lambda *args: fn(*args, **kwargs)

    # σ and β stay float32 beside 16-bit q, k, v (docs/design.md §2.7)
    given = (lambda i, d: d if i < 3 else torch.float32)
    _compare(bind(_op("graph_attention", backend)), bind(reference.graph_attention), base, range(6), precision, given)


@pytest.mark.parametrize("precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_route_precision(backend, precision):
    """Integers equal to the oracle's in the routing dtype (the logits' dtype; float32 under
    autocast, which routing ignores); weights and their gradient by the 2× rule against float64."""
    name, dtype, autocast, _ = precision
    logits = (torch.randn(37, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2).to(dtype)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        r = mk.ops.route(logits.requires_grad_(), 2, capacity_factor=1.25, backend=backend)
    logits_ref = logits.detach().clone().requires_grad_()
    expected = reference.route(logits_ref, 2, capacity_factor=1.25)
    assert (expected.slot < 0).any()
    for field in ("expert", "slot", "counts"):
        assert torch.equal(getattr(r, field), getattr(expected, field)), f"{field} ({name})"
    assert r.weight.dtype == dtype
    l64 = logits.detach().double().requires_grad_()
    w64 = torch.softmax(l64, -1).gather(1, r.expert)
    assert_close_to_reference(r.weight, w64, expected.weight, name=f"weight ({name})")
    grad = torch.randn(w64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g,) = torch.autograd.grad(r.weight, logits, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(expected.weight, logits_ref, grad.to(dtype))
    (g64,) = torch.autograd.grad(w64, l64, grad)
    assert_close_to_reference(g, g64, g_ref, name=f"d weight / d logits ({name})")


# ------------------------------------------------------------------------------ fp16 safety
def _fp16_large(gen, *shape):
    return (300 + torch.rand(*shape, generator=gen)).half()


@pytest.mark.parametrize("kwargs", [{}, dict(temperature=0.5, seed=1), dict(truncation=None), dict(threshold=True)], ids=["ell", "sample", "dense", "threshold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_attention_fp16_large_scores_stay_finite(backend, kwargs):
    """q, k ≈ 300 in fp16: q·k ≈ 1.4e6 overflows fp16, so the scores must be formed in float32.
    Output and gradients are finite; the output is as close to float64 as the oracle computed in
    float32 (the policy's score precision) by the 2× rule."""
    gen = torch.Generator().manual_seed(6)
    B, H, U, V, C = 1, 2, 3, 8, 16
    sig_s = torch.randn(V, 4, generator=gen)
    base = [_fp16_large(gen, B, H, U, C), _fp16_large(gen, B, H, V, C), torch.randn(B, H, V, C, generator=gen).half(), sig_s[:U].clone(), sig_s, torch.tensor(1.0)]
    leaves = [t.requires_grad_() if i < 3 else t for i, t in enumerate(base)]
    out = mk.ops.graph_attention(*leaves, backend=backend, **kwargs)
    grads = torch.autograd.grad(out.float().square().sum(), leaves[:3])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    out64 = reference.graph_attention(*[t.detach().double() for t in base], **kwargs)
    out32 = reference.graph_attention(*[t.detach().float() for t in base], **kwargs)
    assert_close_to_reference(out, out64, out32, atol=_atol(out64, torch.float16), name="o")


@pytest.mark.parametrize("backend", BACKENDS)
def test_readin_attention_fp16_large_scores_stay_finite(backend):
    gen = torch.Generator().manual_seed(7)
    B, U, H, C, V, Din = 1, 3, 2, 16, 8, 16
    q, x = _fp16_large(gen, B, U, H, C), _fp16_large(gen, B, V, Din)
    w = [(torch.randn(H, C, Din, generator=gen) / 4).half() for _ in range(2)]
    s = [torch.ones(U, Din).half() for _ in range(2)]
    leaves = [t.requires_grad_() for t in (q, x, *w)]
    m = mk.ops.readin_attention(*leaves, *s, None, backend=backend)
    grads = torch.autograd.grad((m.float() * 1e-3).sum(), leaves)
    assert torch.isfinite(m).all() and all(torch.isfinite(g).all() for g in grads)
    args = [t.detach() for t in leaves] + s
    m64 = reference.readin_attention(*[t.double() for t in args])
    m32 = reference.readin_attention(*[t.float() for t in args])
    assert_close_to_reference(m, m64, m32, atol=_atol(m64, torch.float16), name="m")


# ------------------------------------------------------------------------------ float64
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
def test_triton_refuses_float64():
    """The Triton kernels compute in at most float32: float64 is refused, not silently rounded."""
    logits = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        mk.ops.route(logits, 2, backend="triton")
    r = mk.ops.route(logits.float(), 2, backend="torch")
    x, w1, w2 = torch.randn(8, 8, dtype=torch.float64), torch.randn(4, 8, 8, dtype=torch.float64), torch.randn(4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        mk.ops.moe_mlp(x, r, w1, None, w2, None, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_reconciles_mixed_operands(backend):
    """As F.linear does: under autocast, bf16 activations beside float32 weights are accepted (the
    weights are cast); the result equals the op on explicitly cast operands, bit for bit."""
    gen = torch.Generator().manual_seed(8)
    T, d, h, E = 9, 16, 8, 2
    x = torch.randn(T, d, generator=gen).bfloat16()
    w1, w2 = torch.randn(E, d, h, generator=gen), torch.randn(E, h, d, generator=gen)
    r = mk.ops.route(torch.randn(T, E, generator=gen), 1, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mk.ops.moe_mlp(x, r, w1, None, w2, None, backend=backend)
    assert torch.equal(y, mk.ops.moe_mlp(x, r, w1.bfloat16(), None, w2.bfloat16(), None, backend=backend))
    with pytest.raises(TypeError, match="w1 dtype"):
        mk.ops.moe_mlp(x, r, w1, None, w2, None, backend=backend)  # outside autocast: one dtype


# ------------------------------------------------------------------------ the training precision
def _pair_and_finetune_tasks(kind):
    """(pair task of module 1, fine-tune task of the full student) with the micro models."""
    import timm

    import m2mkd_fast.models  # noqa: F401  (registers the models with timm)
    from m2mkd_fast.distill.students import pair_student, width
    from m2mkd_fast.distill.tasks import EndToEnd, PairTask

    torch.manual_seed(0)
    meta = timm.create_model("meta_vit_micro", num_classes=10, num_stages=4)
    teacher = timm.create_model("staged_vit_micro", num_classes=10, num_stages=4)
    if kind == "vmoe":
        student = timm.create_model("vmoe_micro", num_classes=10, num_stages=4, embed_dim=48, num_heads=3, moe_backend="torch")
    else:
        student = timm.create_model("nac_micro", num_classes=10, prior_steps=10, backend="torch")
    pair = PairTask(meta, teacher, pair_student(kind, student, 1, width(meta), seed=0), 1)
    return pair.train(), EndToEnd(student).train()


@pytest.mark.parametrize("kind", ["vmoe", "nac"])
def test_pair_and_finetune_steps_under_bf16_match_float32(kind):
    """The trainer's step (forward_loss) under bf16 autocast on CPU: the forward really runs in
    bf16 (bf16 logits), the float32 loss is within bf16 rounding (2^-7 relative) of the float32
    step's, and every trainable parameter gets a finite float32 gradient."""
    from m2mkd_fast.distill.loss import DistillationLoss, one_hot_targets
    from m2mkd_fast.distill.trainer import forward_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(8, 1, 28, 28, generator=gen)
        target = one_hot_targets(torch.randint(0, 10, (8,), generator=gen), 10, 0.1)
        pair, finetune = _pair_and_finetune_tasks(kind)
        for task, criterion in ((pair, DistillationLoss("soft", 0.5, 1.0)), (finetune, DistillationLoss("none"))):
            torch.manual_seed(3)
            loss32, logits32 = forward_loss(task, criterion, x, target, "fp32")
            torch.manual_seed(3)
            loss16, logits16 = forward_loss(task, criterion, x, target, "bf16")
            assert logits32.dtype == torch.float32 and logits16.dtype == torch.bfloat16
            assert loss16.dtype == torch.float32
            torch.testing.assert_close(loss16, loss32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
            params = [p for p in task.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss16, params)
            assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    finally:
        torch.set_num_threads(threads)


def test_fp16_training_phase_through_the_cli(tmp_path):
    """--precision fp16 on a training phase: the config takes it, the trainer steps through a
    GradScaler, the phase finishes with finite weights and records the precision."""
    import json

    from m2mkd_fast.cli import main
    from m2mkd_fast.distill.checkpoint import load_weights

    threads = torch.get_num_threads()
    sets = ["meta.train.epochs=1", "meta.train.train_limit=64", "meta.train.batch_size=32", "data.test_limit=32"]
    try:
        rc = main(["pretrain-meta", "--config", "quick", "--precision", "fp16", "--run-dir", str(tmp_path), "--no-progress",
                   "--threads", "1"] + [a for s in sets for a in ("--set", s)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    sd, meta = load_weights(tmp_path / "meta" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert meta["config"]["precision"] == "fp16"
    assert json.loads((tmp_path / "meta" / "done.json").read_text())["phase"] == "pretrain-meta"


def test_precision_config_key_is_checked(capsys):
    from m2mkd_fast.cli import main

    assert main(["show-config", "--set", "precision=fp8"]) == 2
    assert "precision" in capsys.readouterr().err
