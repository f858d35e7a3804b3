"""m2mKD module pairs (docs/design.md §2.5): PairTask with the micro meta model, teacher and students.

For every pair index of a 4-stage split: the meta model and the teacher are frozen (no gradient,
eval mode whatever the task's mode); the teacher logits are meta[i+1:](T_i(meta[:i](x))); every
trainable student parameter gets a finite gradient, through the frozen meta tail; the stitch
layers have the form of their student kind; the NAC students never use graph attention.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import m2mkd_fast.models  # noqa: F401  (registers the models with timm)
from m2mkd_fast import ops
from m2mkd_fast.distill.nac_students import NACMediatorStudent, NACReadInStudent, NACReadOutStudent
from m2mkd_fast.distill.students import pair_student, width
from m2mkd_fast.distill.tasks import PairTask, StitchedModule
from m2mkd_fast.layers import Stitch

STAGES = 4
META_DIM = 96  # meta_vit_micro
VMOE_DIM = 48  # a V-MoE student narrower than the meta model: a swapped stitch direction shows
NAC_DIM = 64  # nac_micro


pytestmark = pytest.mark.usefixtures("one_thread")


def _models(kind):
    """(meta, teacher, full student), with dropout and DropPath in meta and teacher so that a
    frozen model left in training mode would change the results."""
    torch.manual_seed(0)
    drop = dict(drop_rate=0.2, drop_path_rate=0.2, proj_drop_rate=0.2)
    meta = timm.create_model("meta_vit_micro", num_classes=10, num_stages=STAGES, **drop)
    teacher = timm.create_model("staged_vit_micro", num_classes=10, num_stages=STAGES, **drop)
    # the ops on the torch backend: what is under test is the pairing, not the backends
    if kind == "vmoe":
        student = timm.create_model("vmoe_micro", num_classes=10, num_stages=STAGES, embed_dim=VMOE_DIM, num_heads=3,
                                    moe_backend="torch")
    else:
        student = timm.create_model("nac_micro", num_classes=10, prior_steps=10, backend="torch")
    assert meta.num_stages == teacher.num_stages == student.num_stages == STAGES
    return meta, teacher, student


def _pair(kind, index):
    meta, teacher, full = _models(kind)
    meta_copy, teacher_copy = copy.deepcopy(meta).eval(), copy.deepcopy(teacher).eval()
    student = pair_student(kind, full, index, width(meta), seed=0)
    return PairTask(meta, teacher, student, index), meta_copy, teacher_copy, full


def _images(batch=3):
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(5))


def _all_eval(model):
    return not any(m.training for m in model.modules())


def _run_stages(model, x, start, end):
    """Stages [start, end) one call each (not the task's ranged calls)."""
    for j in range(start, end):
        x = model(x, start=j, end=j + 1)
    return x


PAIRS = [(kind, i) for kind in ("vmoe", "nac") for i in range(STAGES)]


@pytest.mark.parametrize("kind,index", PAIRS)
def test_frozen_models_trainable_student_and_gradients(kind, index):
    task, _, _, _ = _pair(kind, index)
    meta, teacher, student = task.meta, task.teacher, task.student
    # only the student is in the task's module tree: its parameters and state are what trains
    assert {id(p) for p in task.parameters()} == {id(p) for p in student.parameters()}
    assert all(k.startswith("student.") for k in task.state_dict())
    assert not any(p.requires_grad for p in meta.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    if kind == "nac" and index > 0:  # β of the mediator / read-out: unused without signatures
        assert frozen == [n for n, _ in student.named_parameters() if n.endswith("attn.bandwidth")] and len(frozen) == 1
    else:
        assert frozen == []

    task.train()
    assert student.training and _all_eval(meta) and _all_eval(teacher)
    s_logits, t_logits, aux = task(_images())
    assert s_logits.shape == t_logits.shape == (3, 10)
    assert s_logits.requires_grad and not t_logits.requires_grad
    loss = (s_logits * torch.randn(s_logits.shape, generator=torch.Generator().manual_seed(1))).sum()
    if kind == "vmoe":
        assert isinstance(aux, torch.Tensor) and torch.isfinite(aux)
        loss = loss + 0.01 * aux
    else:
        assert aux is None
    loss.backward()
    assert _all_eval(meta) and _all_eval(teacher)
    assert all(p.grad is None for p in meta.parameters()) and all(p.grad is None for p in teacher.parameters())
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # gradients reach every trainable tensor of the student, through the frozen meta tail when
    # index < last (an MoE expert tensor holds all experts: some token reaches one of them)
    zero = [n for n, p in student.named_parameters() if p.requires_grad and torch.count_nonzero(p.grad) == 0]
    if kind == "nac" and index == STAGES - 1:
        # the read-out pair has one receiver per image (the reference's randn(B, 1, D)): pooling
        # over a single latent is the identity, so its scorer gets no gradient in this pair
        assert zero == ["pool_scorer.weight", "pool_scorer.bias"], zero
    else:
        assert not zero, f"zero gradient: {zero}"


@pytest.mark.parametrize("kind,index", PAIRS)
def test_logits_are_the_meta_tail_of_each_module(kind, index):
    """Teacher logits = meta[i+1:](T_i(meta[:i](x))); student logits = meta[i+1:](S_i(meta[:i](x))),
    computed by hand with copies of the meta model and teacher taken before the task froze them."""
    task, meta, teacher, _ = _pair(kind, index)
    x = _images()
    for mode in (True, False):  # the teacher side is the same whether the task trains or not
        task.train(mode)
        torch.manual_seed(3)
        s_logits, t_logits, _ = task(x)
        with torch.no_grad():
            h = _run_stages(meta, x, 0, index)
            want_t = _run_stages(meta, _run_stages(teacher, h, index, index + 1), index + 1, STAGES)
        torch.testing.assert_close(t_logits, want_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(task.forward_teacher(x), want_t, rtol=0, atol=1e-6)
    # eval: the student is deterministic (but for the NAC read-out's Gumbel pooling: same seed),
    # so its logits can be rebuilt too
    with torch.no_grad():
        torch.manual_seed(3)
        want_s = _run_stages(meta, task.student(h), index + 1, STAGES)
    torch.testing.assert_close(s_logits.detach(), want_s, rtol=0, atol=1e-6)
    if index == STAGES - 1:
        torch.manual_seed(3)
        torch.testing.assert_close(s_logits.detach(), task.student(h), rtol=0, atol=0)  # the module's own logits


def _linear_in_out(stitch):
    assert isinstance(stitch, Stitch) and isinstance(stitch.proj, nn.Linear) and stitch.proj.bias is not None
    return stitch.proj.in_features, stitch.proj.out_features


@pytest.mark.parametrize("index", range(STAGES))
def test_vmoe_stitches_are_layernorm_then_linear(index):
    task, _, _, full = _pair("vmoe", index)
    student = task.student
    assert isinstance(student, StitchedModule)
    assert {id(p) for p in student.module.parameters()} == {id(p) for p in full.stages[index].parameters()}
    assert (student.stitch_in is None) == (index == 0)
    assert (student.stitch_out is None) == (index == STAGES - 1)
    for stitch, (d_in, d_out) in ((student.stitch_in, (META_DIM, VMOE_DIM)), (student.stitch_out, (VMOE_DIM, META_DIM))):
        if stitch is None:
            continue
        assert _linear_in_out(stitch) == (d_in, d_out)
        norm = stitch.norm
        assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (d_in,) and norm.eps == 1e-5
        assert norm.elementwise_affine
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        t = torch.randn(2, 5, d_in)
        by_hand = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
        by_hand = (by_hand * norm.weight + norm.bias) @ stitch.proj.weight.t() + stitch.proj.bias
        torch.testing.assert_close(stitch(t), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", range(STAGES))
def test_nac_students_single_linear_stitches_and_dense_attention(index, monkeypatch):
    task, _, _, full = _pair("nac", index)
    student = task.student
    expected = {0: NACReadInStudent, STAGES - 1: NACReadOutStudent}.get(index, NACMediatorStudent)
    assert type(student) is expected
    stitch_in, stitch_out = getattr(student, "stitch_in", None), getattr(student, "stitch_out", None)
    assert (stitch_in is None) == (index == 0)  # read-in: post-stitch only
    assert (stitch_out is None) == (index == STAGES - 1)  # read-out: pre-stitch only
    if stitch_in is not None:
        assert _linear_in_out(stitch_in) == (META_DIM, NAC_DIM)
    if stitch_out is not None:
        assert _linear_in_out(stitch_out) == (NAC_DIM, META_DIM)
    for stitch in (stitch_in, stitch_out):
        if stitch is not None:
            assert isinstance(stitch.norm, nn.Identity) and not any(isinstance(m, nn.LayerNorm) for m in stitch.modules())
            assert sum(p.numel() for p in stitch.parameters()) == stitch.proj.weight.numel() + stitch.proj.bias.numel()
    # one fixed random code (a buffer, no noise) for every latent
    assert "code" in dict(student.named_buffers()) and "code" not in dict(student.named_parameters())
    assert all(m.code_noise == 0 for m in student.modules() if hasattr(m, "code_noise"))
    # read-in / read-out receivers: drawn per call (the reference's randn(B, 1, D)), neither buffer nor parameter
    assert not any("receivers" in n for n, _ in list(student.named_buffers()) + list(student.named_parameters()))

    # no graph attention anywhere: the mediator and read-out attend densely, without signatures
    def no_graph_attention(*args, **kwargs):
        raise AssertionError("a NAC m2mKD student called graph_attention")

    monkeypatch.setattr(ops, "graph_attention", no_graph_attention)
    calls = []
    block = {0: None, STAGES - 1: getattr(student, "read_out", None)}.get(index, getattr(student, "propagator", None))
    if block is not None:
        block.register_forward_pre_hook(lambda module, args: calls.append(args))
    task.eval()
    x = _images()
    h = _run_stages(task.meta, x, 0, index) if index > 0 else x
    with torch.no_grad():
        torch.manual_seed(3)  # the read-out's Gumbel pooling draws noise in eval too
        out = student(h)
    if block is None:
        return
    (args,) = calls
    z_r, _, sig_r, z_s, _, sig_s = args
    assert sig_r is None and sig_s is None
    if index < STAGES - 1:
        assert z_r is z_s  # receivers = senders = the pre-stitched meta tokens
        torch.testing.assert_close(z_s, stitch_in(h), rtol=0, atol=0)
    else:
        torch.testing.assert_close(z_s, stitch_in(h), rtol=0, atol=0)
        assert z_r.shape == (x.shape[0], 1, NAC_DIM)  # one fresh random receiver per image
    # β is not used: another value changes nothing
    beta = block.attn.bandwidth
    assert not beta.requires_grad
    with torch.no_grad():
        beta.fill_(0.123)
        torch.manual_seed(3)
        torch.testing.assert_close(student(h), out, rtol=0, atol=0)
    # the dense attention by hand (mediator, eval): z + LS(exit(softmax(qkᵀ/√C) v)), then the FFN
    if index < STAGES - 1:
        attn, c = block.attn, student.codes(z_r.shape[1])
        with torch.no_grad():
            zn = attn.norm_receiver(z_r)
            q, k, v = (attn._heads(lin(zn, c)) for lin in (attn.q, attn.k, attn.v))
            a = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim**0.5, dim=-1)
            m = (a @ v).transpose(1, 2).flatten(2)
            z = z_r + attn.layer_scale.gamma * attn.exit(m, c)
            want = stitch_out(block.ffn(z, c))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(F.normalize(out, dim=-1), F.normalize(stitch_out(z_r), dim=-1), atol=1e-2)
