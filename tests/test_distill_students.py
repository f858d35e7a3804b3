"""m2mKD module pairs and assembly (docs/design.md §2.5) on the CPU presets: what trains, what flows
where, and that assembly puts every distilled weight in the right place."""

import pytest
import torch

import m2mkd_fast.models  # noqa: F401 - registers the models
from m2mkd_fast.data.datasets import DataBundle
from m2mkd_fast.distill.checkpoint import CheckpointError
from m2mkd_fast.distill.nac_students import NACMediatorStudent, NACReadInStudent, NACReadOutStudent
from m2mkd_fast.distill.students import assemble, build_model, check_stage_composition, module_state, pair_student
from m2mkd_fast.distill.tasks import EndToEnd, IncubationTask, PairTask, model_aux_loss

DATA = DataBundle(None, None, 10, 1, 28, (0.5,), (0.5,), "t", "t")
STUDENTS = [("vmoe", "vmoe_micro", {"num_stages": 4}), ("vmoe", "vmoe_micro_all", {"num_stages": 4}),
            ("nac", "nac_micro", {"prior_steps": 5})]


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    meta = build_model("meta_vit_micro", {"num_stages": 4}, DATA)
    teacher = build_model("staged_vit_micro", {"num_stages": 4}, DATA)
    return meta, teacher


@pytest.mark.parametrize("kind, name, kw", STUDENTS)
def test_pairs_train_only_the_student_and_assemble(kind, name, kw, frozen):
    meta, teacher = frozen
    x = torch.randn(4, 1, 28, 28)
    meta_before = {k: v.clone() for k, v in meta.state_dict().items()}
    states = []
    for i in range(4):
        torch.manual_seed(i)
        full = build_model(name, kw, DATA)
        student = pair_student(kind, full, i, 96, seed=3)
        task = PairTask(meta, teacher, student, i)
        task.train()
        assert not meta.training and not teacher.training  # frozen models stay in eval mode
        s, t, aux = task(x)
        assert s.shape == t.shape == (4, 10)
        if i < 3:  # teacher logits = meta tail of the teacher module
            h = meta(x, 0, i) if i else x
            assert torch.allclose(t, meta(teacher(h, i, i + 1), i + 1, 4), atol=1e-6)
        loss = s.square().mean() + (aux if aux is not None else 0)
        loss.backward()
        trainable = [n for n, p in task.named_parameters() if p.requires_grad]
        assert trainable and all(task.get_parameter(n).grad is not None for n in trainable), \
            [n for n in trainable if task.get_parameter(n).grad is None]
        assert all(p.grad is None for p in meta.parameters()) and all(p.grad is None for p in teacher.parameters())
        assert set(dict(task.named_parameters())) == {f"student.{n}" for n, _ in student.named_parameters()}
        with torch.no_grad():  # a recognisable distilled state
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(0.01 * (i + 1))
        states.append(module_state(kind, student))
    for k, v in meta.state_dict().items():
        assert torch.equal(v, meta_before[k])
    torch.manual_seed(99)
    fresh = build_model(name, kw, DATA)
    report = assemble(kind, fresh, states)
    sd = fresh.state_dict()
    for i, st in enumerate(states):
        if kind == "vmoe":
            stage_sd = fresh.stages[i].state_dict()
            for k, v in st.items():
                assert torch.equal(stage_sd[k], v), (i, k)
        else:
            for k, v in st.items():
                assert torch.equal(sd[k], v), (i, k)
    if kind == "vmoe":
        assert report["loaded_params"] == report["total_params"]
        assert check_stage_composition(fresh, x) == 0.0
    else:  # signatures, β, codes and the seeder start fresh; all else comes from the modules
        assert set(report["fresh"]) >= {"input_latents", "mediator_latents", "output_latents", "seeder"}
        assert not any(k.endswith("bandwidth") for st in states for k in st)
        assert 0.9 < report["loaded_params"] / report["total_params"] < 1.0


def test_nac_students_follow_the_paper(frozen):
    nac = build_model("nac_micro", {"prior_steps": 5}, DATA)
    rin, med, rout = (pair_student("nac", nac, i, 96, seed=0) for i in (0, 1, 3))
    assert isinstance(rin, NACReadInStudent) and isinstance(med, NACMediatorStudent) and isinstance(rout, NACReadOutStudent)
    # fixed random states and one shared code: buffers, not parameters; no code noise
    for s in (rin, med, rout):
        assert "code" in dict(s.named_buffers()) and "code" not in dict(s.named_parameters())
        assert not any(getattr(m, "code_noise", 0.0) for m in s.modules())
    # read-in / read-out receivers: one fresh randn(B, 1, D) latent per image and call, as the reference
    assert not any("receivers" in k for s in (rin, rout) for k, _ in s.named_buffers())
    x = torch.randn(2, 1, 28, 28)
    rin.eval()
    torch.manual_seed(5)
    first = rin(x)
    assert first.shape == (2, 1, 96) and not torch.equal(rin(x), first)
    torch.manual_seed(5)
    assert torch.equal(rin(x), first)
    rout.eval()
    assert rout(torch.randn(2, 50, 96)).shape == (2, 10)
    # stitches: a single Linear with bias; read-in has only the post-stitch, read-out only the pre-stitch
    assert rin.stitch_out.in_dim == 64 and rin.stitch_out.out_dim == 96 and not hasattr(rin, "stitch_in")
    assert rout.stitch_in.in_dim == 96 and not hasattr(rout, "stitch_out")
    assert isinstance(med.stitch_in.norm, torch.nn.Identity)
    # the mediator is dense self-attention over the meta tokens: token count in = token count out
    h = torch.randn(2, 50, 96)
    assert med(h).shape == (2, 50, 96)
    assert not med.propagator.attn.bandwidth.requires_grad
    # its receivers = senders: permuting the tokens permutes the output
    perm = torch.randperm(50)
    med.eval()
    assert torch.allclose(med(h)[:, perm], med(h[:, perm]), atol=1e-5)
    # the same seed gives the same fixed code, another seed another
    again = pair_student("nac", build_model("nac_micro", {"prior_steps": 5}, DATA), 0, 96, seed=0)
    other = pair_student("nac", build_model("nac_micro", {"prior_steps": 5}, DATA), 0, 96, seed=1)
    assert torch.equal(again.code, rin.code) and not torch.equal(other.code, rin.code)


def test_no_kd_pair_is_the_same_pair_without_a_teacher(frozen):
    meta, teacher = frozen
    x = torch.randn(3, 1, 28, 28)
    for i in (1, 3):
        torch.manual_seed(0)
        student = pair_student("vmoe", build_model("vmoe_micro_all", {"num_stages": 4}, DATA), i, 96, seed=0)
        kd, nokd = PairTask(meta, teacher, student, i).eval(), PairTask(meta, None, student, i).eval()
        s_kd, t_kd, _ = kd(x)
        s, t, _ = nokd(x)
        assert t is None and t_kd is not None and nokd.teacher is None
        assert torch.equal(s, s_kd)  # the student path is the same with and without a teacher
        assert set(dict(nokd.named_parameters())) == set(dict(kd.named_parameters()))


def test_assembly_errors():
    nac = build_model("nac_micro", {"prior_steps": 5}, DATA)
    with pytest.raises(CheckpointError, match="modules"):
        assemble("nac", nac, [{}])
    with pytest.raises(CheckpointError, match="does not have"):
        assemble("nac", nac, [{"nonsense.weight": torch.zeros(1)}, {}, {}, {}])
    vm = build_model("vmoe_micro", {"num_stages": 4}, DATA)
    bad = [dict(vm.stages[i].state_dict()) for i in range(4)]
    bad[2]["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shape"):
        assemble("vmoe", vm, bad)
    with pytest.raises(ValueError, match="student kind"):
        pair_student("resnet", vm, 0, 96)


def test_pair_rejects_mismatched_stage_counts(frozen):
    meta, _ = frozen
    teacher3 = build_model("staged_vit_micro", {"num_stages": 3}, DATA)
    with pytest.raises(ValueError, match="stages"):
        PairTask(meta, teacher3, torch.nn.Linear(2, 2), 0)


def test_end_to_end_aux_losses():
    vm = build_model("vmoe_micro", {"num_stages": 4}, DATA)
    _, _, aux = EndToEnd(vm).train()(torch.randn(8, 1, 28, 28))
    assert aux is not None and aux.item() > 0  # V-MoE load balancing
    nac = build_model("nac_micro", {"prior_steps": 5}, DATA)
    nac(torch.randn(2, 1, 28, 28))
    assert torch.allclose(model_aux_loss(nac), nac.signature_regulariser())  # NAC signature regulariser
    vit = build_model("staged_vit_micro", {}, DATA)
    vit(torch.randn(2, 1, 28, 28))
    assert model_aux_loss(vit).item() == 0.0


def test_incubation_trains_one_teacher_module_inside_the_meta(frozen):
    meta, _ = frozen
    teacher = build_model("staged_vit_micro", {"num_stages": 4}, DATA)
    x = torch.randn(3, 1, 28, 28)
    for i in (0, 2, 3):
        task = IncubationTask(meta, teacher.stages[i], i).train()
        logits, t, aux = task(x)
        assert t is None and aux is None and logits.shape == (3, 10)
        with torch.no_grad():
            h = meta(x, 0, i) if i else x
            want = meta(teacher(h, i, i + 1), i + 1, 4) if i < 3 else teacher(h, i, 4)
        assert torch.allclose(logits, want, atol=1e-6)
        logits.sum().backward()
        names = {n for n, p in task.named_parameters() if p.requires_grad}
        assert names == {f"module.{n}" for n, _ in teacher.stages[i].named_parameters()}
        assert all(task.get_parameter(n).grad is not None for n in names)
        assert all(p.grad is None for p in meta.parameters())
        teacher.zero_grad(set_to_none=True)
