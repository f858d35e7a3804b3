"""Models: timm registration, stage split and composition, timm API, gradients (docs/design.md §2.5, §5).

Covers the staged ViT/DeiT teachers, the meta models, V-MoE and NAC at their CPU presets, and
the big presets on the meta device (built, parameter-counted, never run).
"""

import pytest
import timm
import torch
from torch import nn

import m2mkd_fast.models as M
from m2mkd_fast.layers import Stitch
from m2mkd_fast.models import NACState, NeuralAttentiveCircuit, StagedVisionTransformer, VisionMoE
from m2mkd_fast.models.stages import split_depth

OUR_PREFIXES = ("staged_", "meta_", "vmoe_", "nac_")


pytestmark = pytest.mark.usefixtures("one_thread")


def our_models():
    return sorted(n for n in timm.list_models() if n.startswith(OUR_PREFIXES))


def fmnist(batch=4):
    return torch.randn(batch, 1, 28, 28)


def all_grads_present(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:8]}"


def compose(model, x):
    for stage in model.stages:
        x = stage(x)
    return x


# ----------------------------------------------------------------------------------- stitch
def test_stitch_forms():
    x = torch.randn(2, 5, 8)
    s = Stitch(8, 12, norm=True)
    ref = nn.functional.linear(nn.functional.layer_norm(x, (8,), s.norm.weight, s.norm.bias, 1e-5),
                               s.proj.weight, s.proj.bias)
    torch.testing.assert_close(s(x), ref, rtol=0, atol=0)
    lin = Stitch(8, 12, norm=False)
    assert isinstance(lin.norm, nn.Identity) and lin.proj.bias is not None
    torch.testing.assert_close(lin(x), lin.proj(x), rtol=0, atol=0)
    ident = Stitch(8, 8, norm=False, identity_if_equal=True)
    assert ident(x) is x and sum(p.numel() for p in ident.parameters()) == 0
    assert sum(p.numel() for p in Stitch(8, 8, norm=False).parameters()) == 8 * 8 + 8
    with pytest.raises(ValueError, match="in_dim=8"):
        s(torch.randn(2, 5, 9))


# ----------------------------------------------------------------------------------- split
def test_split_depth():
    assert split_depth(24, 4) == (6, 6, 6, 6)
    assert split_depth(32, 10) == (4, 4, 3, 3, 3, 3, 3, 3, 3, 3)
    assert split_depth(6, 4) == (2, 2, 1, 1)
    assert split_depth(6, stage_depths=[0, 3, 3]) == (0, 3, 3)
    with pytest.raises(ValueError, match="sum to 5"):
        split_depth(6, stage_depths=[2, 3])
    with pytest.raises(ValueError, match="num_stages must be in"):
        split_depth(3, 4)
    with pytest.raises(ValueError, match="entries but num_stages"):
        split_depth(6, 3, [3, 3])


# ----------------------------------------------------------------------------------- registry
EXPECTED_NAMES = {
    "staged_vit_micro", "meta_vit_micro", "staged_deit3_large_patch16_224", "meta_deit3_large_patch16_224",
    "staged_vit_large_patch16_224", "staged_vit_huge_patch14_224", "meta_vit_huge_patch14_224",
    "staged_deit_small_patch16_224", "vmoe_micro", "vmoe_micro_all", "vmoe_small_patch16_224",
    "vmoe_base_patch16_224", "vmoe_large_patch16_224", "vmoe_base_all_patch16_224", "nac_micro",
    "nac_tinyimagenet", "nac_imagenet", "nac_tinyimagenet_erdos_renyi", "nac_imagenet_ring_of_cliques",
    "nac_tinyimagenet_planted_partition",
}


def test_registered_names():
    names = set(our_models())
    assert EXPECTED_NAMES <= names, sorted(EXPECTED_NAMES - names)


@pytest.mark.parametrize("name", our_models())
def test_every_model_builds_on_meta_with_a_real_cfg(name):
    from timm.models import get_pretrained_cfg

    # ViT-H/14's default weights are in21k features (num_classes 0): give it a head to check
    kwargs = {} if get_pretrained_cfg(name).num_classes else dict(num_classes=10)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    for key in ("first_conv", "classifier"):
        module = model.get_submodule(cfg[key])
        assert isinstance(module.weight, nn.Parameter), f"{name}: {key}={cfg[key]!r} has no weight"
    assert kwargs.get("num_classes", cfg["num_classes"]) == model.num_classes
    assert model.num_features == model.head_hidden_size
    stages = model.stages
    assert len(stages) == model.num_stages >= 2
    # the stages hold disjoint parameters
    seen = set()
    for stage in stages:
        ids = {id(p) for p in stage.parameters()}
        assert not ids & seen
        seen |= ids
    if not isinstance(model, NeuralAttentiveCircuit):
        assert seen == {id(p) for p in model.parameters()}  # a ViT's stages hold all of it


def test_big_parameter_counts():
    with torch.device("meta"):
        vit_b = sum(p.numel() for p in timm.create_model("vit_base_patch16_224").parameters())
        deit_l = timm.create_model("deit3_large_patch16_224")
        staged_l = timm.create_model("staged_deit3_large_patch16_224")
        vmoe_b = timm.create_model("vmoe_base_patch16_224")
        vmoe_b_all = timm.create_model("vmoe_base_all_patch16_224")
        meta_l = timm.create_model("meta_deit3_large_patch16_224")
        huge = timm.create_model("staged_vit_huge_patch14_224", num_classes=1000)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(staged_l) == count(deit_l)
    assert staged_l.stage_depths == (6, 6, 6, 6) and huge.num_stages == 10
    mlp = 2 * 768 * 3072 + 3072 + 768
    assert vmoe_b.moe_layers == (1, 3, 5, 7, 9, 11) and vmoe_b.stage_depths == (3, 3, 3, 3)
    assert count(vmoe_b) == vit_b + 6 * (7 * mlp + 768 * 8)
    assert count(vmoe_b_all) == vit_b + 12 * (7 * mlp + 768 * 8 + 8)  # naive gate has a bias
    assert len(meta_l.blocks) == meta_l.num_stages == 4 and meta_l.embed_dim == 1024


# ----------------------------------------------------------------------------------- ViT
def test_staged_vit_composes_to_timm_forward():
    model = timm.create_model("staged_vit_micro").eval()
    assert model.stage_depths == (2, 2, 2)
    plain = timm.models.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                                          depth=6, num_heads=3).eval()
    plain.load_state_dict(model.state_dict())
    x = fmnist(3)
    ref = plain(x)
    assert torch.equal(model(x), ref)
    assert torch.equal(compose(model, x), ref)
    h = model(x, 0, 1)
    assert h.shape == (3, 50, 96)
    assert torch.equal(model(model(h, 1, 2), 2), ref)
    assert torch.equal(model.stages[1](h), model(h, 1, 2))
    assert torch.equal(model.forward_head(model.forward_features(x)), ref)
    assert model(x, 1, 1) is x  # empty range
    with pytest.raises(ValueError, match="start <= end"):
        model(x, 2, 1)
    with pytest.raises(ValueError, match="num_stages=3"):
        model(x, 0, 4)


def test_stage_views_cut_out_and_put_back():
    model = timm.create_model("staged_vit_micro", num_stages=2)
    stages = model.stages
    assert [s.is_first for s in stages] == [True, False] and stages[1].is_last
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= set(stages[0].state_dict())
    assert {"head.weight", "norm.weight", "blocks.2.mlp.fc1.weight"} <= set(stages[1].state_dict())
    donor = timm.create_model("staged_vit_micro", num_stages=2)
    stages[1].load_state_dict(donor.stages[1].state_dict())
    assert torch.equal(model.blocks[5].mlp.fc2.weight, donor.blocks[5].mlp.fc2.weight)
    assert torch.equal(model.head.weight, donor.head.weight)
    assert not torch.equal(model.blocks[0].mlp.fc2.weight, donor.blocks[0].mlp.fc2.weight)
    assert set(model.state_dict()) == set(timm.models.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3).state_dict())


def test_as_staged_on_a_timm_model():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = vit(x)
    staged = M.as_staged(vit, num_stages=3)
    assert staged is vit and isinstance(staged, StagedVisionTransformer) and staged.stage_depths == (2, 1, 1)
    assert torch.equal(compose(staged, x), ref)
    with pytest.raises(TypeError, match="VisionTransformer"):
        M.as_staged(nn.Linear(2, 2))


def test_meta_model():
    meta = timm.create_model("meta_vit_micro", num_stages=4, num_classes=7)
    assert len(meta.blocks) == meta.num_stages == 4 and meta.stage_depths == (1, 1, 1, 1)
    assert meta(fmnist(2)).shape == (2, 7)
    with pytest.raises(ValueError, match="one block per stage"):
        timm.create_model("meta_vit_micro", num_stages=3, depth=6)


def test_vit_timm_api_and_grads():
    model = timm.create_model("staged_vit_micro", num_classes=4, drop_path_rate=0.1)
    x = fmnist(3)
    assert model(x).shape == (3, 4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 96)
    model.reset_classifier(6)
    assert model(x).shape == (3, 6) and model.stages[-1].head is model.head
    model(x).square().mean().backward()
    all_grads_present(model)
    model.reset_classifier(0)
    assert model(x).shape == (3, 96)


@pytest.mark.parametrize("name", ["staged_vit_micro", "meta_vit_micro", "vmoe_micro", "vmoe_micro_all", "nac_micro"])
def test_create_model_state_dict_round_trip(name):
    a = timm.create_model(name, num_classes=5).eval()
    b = timm.create_model(name, num_classes=5).eval()
    b.load_state_dict(a.state_dict())
    x = fmnist(3)
    torch.manual_seed(2)
    ya = a(x)
    torch.manual_seed(2)
    assert ya.shape == (3, 5) and torch.equal(b(x), ya)
    assert a.pretrained_cfg["architecture"] == name and a.default_cfg["input_size"] == (1, 28, 28)


@pytest.mark.parametrize("name", ["staged_vit_micro", "vmoe_micro", "nac_micro"])
def test_grad_checkpointing_leaves_outputs_and_grads_unchanged(name):
    kwargs = dict(drop_path_rate=0.1) if name != "nac_micro" else {}
    model = timm.create_model(name, **kwargs).train()
    x = fmnist(8)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        y = model(x)
        (y.square().mean() + getattr(model, "aux_loss", 0)).backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------- V-MoE
def test_moe_block_indices():
    assert M.moe_block_indices("every2", 12) == [1, 3, 5, 7, 9, 11]
    assert M.moe_block_indices("all", 3) == [0, 1, 2]
    assert M.moe_block_indices("last2", 6) == [4, 5]
    assert M.moe_block_indices("every3", 7) == [2, 5]
    assert M.moe_block_indices([3, 0, 3], 6) == [0, 3]
    assert M.moe_block_indices("none", 6) == []
    with pytest.raises(ValueError, match="unknown spec"):
        M.moe_block_indices("some", 6)
    with pytest.raises(ValueError, match="in \\[0, 6\\)"):
        M.moe_block_indices([6], 6)


def test_vmoe_micro_train_step_and_aux_loss():
    model = timm.create_model("vmoe_micro").train()
    assert isinstance(model, VisionMoE) and model.moe_layers == (1, 3, 5) and model.stage_depths == (2, 2, 2)
    moe = model.blocks[1].mlp
    assert moe.gate == "vmoe" and moe.capacity_factor == 1.05 and moe.num_experts == 8 and moe.k == 2
    assert model.blocks[5].drop_path1.drop_prob == pytest.approx(0.1) and model.blocks[0].norm1.eps == 1e-6
    x = fmnist(12)
    h = model(x, 0, 1)
    y = model(x)
    aux = model.aux_loss
    expected = sum(m.aux_loss for m in model.moe_modules().values())
    torch.testing.assert_close(aux, expected, rtol=0, atol=0)
    assert aux.item() > 0
    (y.logsumexp(-1).mean() + aux).backward()
    all_grads_present(model)
    stats = model.moe_stats()
    assert set(stats) == {1, 3, 5}
    tokens = 12 * 50
    assert int(stats[1]["load"].sum() + stats[1]["dropped"].sum()) == 2 * tokens
    assert moe.group_size == 6 * 50  # the largest divisor of 12 not above 8 images
    model(fmnist(16))
    assert moe.group_size == 8 * 50
    model(fmnist(7))
    assert moe.group_size == 7 * 50
    assert h.shape == (12, 50, 96)


def test_vmoe_expert_without_tokens_gets_zero_grad():
    model = timm.create_model("vmoe_micro_all", num_stages=2)
    with torch.no_grad():
        for m in model.moe_modules().values():
            m.gate_weight[:, 2] = 0
            m.gate_bias[2] = -1e4  # naive gate: top-k of the logits never picks expert 2
    model(fmnist(2)).sum().backward()
    for m in model.moe_modules().values():
        assert int(m.stats["load"][2]) == 0
        assert m.w1.grad is not None and m.w1.grad[2].abs().max() == 0
    all_grads_present(model)


def test_vmoe_stages_compose_and_stage_aux_losses():
    model = timm.create_model("vmoe_micro").eval()
    x = fmnist(8)
    ref = model(x)
    full_aux = model.aux_loss.clone()
    assert torch.equal(compose(model, x), ref)
    torch.testing.assert_close(model.aux_loss, full_aux, rtol=0, atol=0)
    h = model(x, 0, 1)
    h2 = model.stages[1](h)
    assert torch.equal(model.stages[1].aux_loss, model.blocks[3].mlp.aux_loss)
    # a partial forward refreshes only its own stages' layers
    torch.testing.assert_close(model.aux_loss, full_aux, rtol=0, atol=0)
    assert torch.equal(model(h2, 2), ref)
    assert model.stages[0].aux_loss.item() == model.blocks[1].mlp.aux_loss.item()
    model.train()  # training: noisy routing, capacity drops; the same random stream either way
    torch.manual_seed(9)
    ref = model(x)
    torch.manual_seed(9)
    assert torch.equal(compose(model, x), ref)
    naive = timm.create_model("vmoe_micro_all")
    naive(x)
    assert naive.aux_loss.item() == 0.0 and naive.blocks[0].mlp.gate == "naive"
    assert naive.blocks[0].mlp.capacity_factor is None


def test_vmoe_create_model_round_trip():
    model = timm.create_model("vmoe_micro", num_classes=3, num_experts=4, top_k=1, moe_layers="all",
                              capacity_factor=2.0, num_stages=2)
    assert model.moe_layers == tuple(range(6)) and model.num_stages == 2
    assert model.blocks[0].mlp.num_experts == 4 and model.blocks[0].mlp.k == 1
    assert model(fmnist(2)).shape == (2, 3)
    model.reset_classifier(5)
    assert model(fmnist(2)).shape == (2, 5)


# ----------------------------------------------------------------------------------- NAC
def test_nac_micro_train_step_all_grads():
    model = timm.create_model("nac_micro").train()
    assert model.num_stages == 4 and len(model.propagators) == 2
    assert model.tokenizer.output_dim == 48 and model.tokenizer.num_tokens == 49
    assert torch.all(model.read_in.attn.layer_scale.gamma == 1.0)
    assert torch.all(model.propagators[0].attn.layer_scale.gamma == 0.1)
    assert torch.all(model.read_out.ffn.layer_scale.gamma == 0.1)
    assert torch.all(model.tokenizer.conv_stages[0][0].gamma == 1e-6)
    y = model(fmnist(6))
    assert y.shape == (6, 10) and torch.isfinite(y).all()
    (y.logsumexp(-1).mean() + model.signature_regulariser()).backward()
    all_grads_present(model)


def test_nac_stages_compose_bit_identically():
    model = timm.create_model("nac_micro")
    x = fmnist(5)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(3)
        ref = model(x)
        torch.manual_seed(3)
        out = compose(model, x)
        assert torch.equal(out, ref)
        torch.manual_seed(3)
        state = model(x, 0, 2)
        assert isinstance(state, NACState)
        assert state.inputs.shape == (5, 16, 64) and state.mediators.shape == (5, 32, 64)
        assert torch.equal(model(state, 2), ref)
    model.eval()
    torch.manual_seed(3)
    ref = model(x)
    torch.manual_seed(3)
    feats = model.forward_features(x)
    assert feats.shape == (5, 8, 64)
    assert torch.equal(model.forward_head(feats), ref)


def test_nac_stage_views_and_errors():
    model = timm.create_model("nac_micro")
    stages = model.stages
    assert [s.stage_name for s in stages] == ["read_in", "propagator0", "propagator1", "read_out"]
    assert stages[0].tokenizer is model.tokenizer and stages[2].propagator is model.propagators[1]
    outside = {n for n, p in model.named_parameters()} - {
        n for i, s in enumerate(stages) for n, _ in _owner_names(model, s)}
    assert outside and all(n.split(".")[0] in ("input_latents", "mediator_latents", "output_latents", "seeder")
                           for n in outside)
    donor = timm.create_model("nac_micro")
    stages[1].load_state_dict(donor.stages[1].state_dict())
    assert torch.equal(model.propagators[0].attn.q.weight, donor.propagators[0].attn.q.weight)
    x = fmnist(2)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 16, 64), 0, 1)
    with pytest.raises(TypeError, match="NACState"):
        model(torch.randn(2, 16, 64), 1)
    with pytest.raises(ValueError, match="mediators must be"):
        model(NACState(torch.randn(2, 16, 64), torch.randn(2, 31, 64)), 1)
    assert model(x, 0, 0) is x


def _owner_names(model, stage):
    ids = {id(p) for p in stage.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def test_nac_num_stages_and_presets():
    model = timm.create_model("nac_micro", num_stages=3, num_classes=4)
    assert model.num_iterations == 1 and len(model.stages) == 3
    assert model(fmnist(2)).shape == (2, 4)
    with pytest.raises(ValueError, match="num_iterations"):
        NeuralAttentiveCircuit(img_size=28, in_chans=1, num_stages=4, num_iterations=3)
    with torch.device("meta"):
        tiny = timm.create_model("nac_tinyimagenet")
        big = timm.create_model("nac_imagenet")
        ring = timm.create_model("nac_tinyimagenet_ring_of_cliques")
    assert tiny.tokenizer.output_dim == 256 and tiny.tokenizer.num_tokens == 64 and tiny.num_stages == 10
    assert tiny.read_in.ffn.fc2.in_features == 2 * 384 and tiny.mediator_latents.signatures.shape == (256, 64)
    assert big.tokenizer.output_dim == 320 and big.tokenizer.num_tokens == 784
    assert big.mediator_latents.num_latents == 768 and big.input_latents.num_latents == 192
    assert big.read_in.ffn.fc2.in_features == 512 and big.propagators[0].attn.num_heads == 8
    assert ring.graph_prior == "ring-of-cliques"
    prop, out = tiny.propagators[3].attn, tiny.read_out.attn
    assert (prop.truncation, prop.temperature, prop.residual, prop.norm_sender) == (0.9, 0.5, True, None)
    assert (out.truncation, out.temperature, out.residual) == (None, None, False)
    assert out.norm_sender is not None and isinstance(out.drop_path, nn.Identity)
    assert tiny.propagators[0].attn.drop_path.drop_prob == pytest.approx(0.1)


def test_nac_mediator_signatures_follow_the_prior():
    from m2mkd_fast.models import graph_priors as gp

    model = timm.create_model("nac_micro", prior_seed=4, prior_steps=300, prior_lr=1e-2)
    adj = gp.make_graph("barabasi-albert", 32, seed=4, m=2)
    assert gp.graph_agreement(model.mediator_latents.signatures, adj) > 0.99
    rand = timm.create_model("nac_micro", graph_prior=None)
    assert gp.graph_agreement(rand.mediator_latents.signatures, adj) < 0.95


def test_nac_seeder_and_code_noise(monkeypatch):
    import m2mkd_fast.models.nac as nac

    model = timm.create_model("nac_micro")
    assert torch.all(model.seeder.logvar.bias == -5.0)
    model.eval()
    z = model.seeder(model.input_latents.codes, 3)
    assert z.shape == (3, 16, 64) and not torch.equal(z[0], z[1])  # noise per batch element in eval
    calls = []
    real = nac.code_noise
    monkeypatch.setattr(nac, "code_noise", lambda c, a: calls.append((c.shape[0], a)) or real(c, a))
    model(fmnist(2))
    assert calls == []  # no code noise in eval
    model.train()
    model(fmnist(2))
    # seeder (inputs, mediators), read-in receivers, 2 × propagator (receivers, senders),
    # seeder (outputs), read-out (receivers, senders)
    assert [n for n, _ in calls] == [16, 32, 16, 32, 48, 32, 48, 8, 8, 48]
    assert {a for _, a in calls} == {0.05}


def test_nac_signature_regulariser_by_hand():
    model = timm.create_model("nac_micro", graph_prior=None)
    sig = model.all_signatures().detach()
    d = 1 - torch.nn.functional.cosine_similarity(sig[:, None], sig[None], dim=-1)
    total = sum(d[i, j] for i in range(len(sig)) for j in range(i) if d[i, j] < 0.4)
    torch.testing.assert_close(model.signature_regulariser(), -0.1 * total, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # two nearly equal signatures: the regulariser pushes them apart
        model.output_latents.signatures[1] = model.output_latents.signatures[0] + 0.01
    reg = model.signature_regulariser(weight=1.0, hinge=1e-2)
    assert reg.item() < 0
    reg.backward()
    grad = model.output_latents.signatures.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    with torch.no_grad():
        before = 1 - torch.cosine_similarity(*model.output_latents.signatures[:2], dim=0)
        model.output_latents.signatures.sub_(0.1 * grad)
        after = 1 - torch.cosine_similarity(*model.output_latents.signatures[:2], dim=0)
    assert after > before


def test_nac_timm_api():
    model = timm.create_model("nac_micro", num_classes=3, pool="softmax").eval()
    x = fmnist(2)
    assert model(x).shape == (2, 3)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features) == (2, 64)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(model(x), a)  # eval is deterministic given the seed (the seeder still draws)
    assert not torch.equal(model(x), a)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier() is model.head
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_pretrained_without_local_weights_fails_at_once(monkeypatch, tmp_path):
    import time

    from m2mkd_fast.models import weights

    monkeypatch.setattr(weights, "_reachable", lambda host, timeout=3.0: False)  # offline
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    names = our_models()
    assert "staged_deit_tiny_patch16_224" in names and "nac_micro" in names and "vmoe_micro" in names
    t = time.time()
    for name in names:
        with pytest.raises(RuntimeError, match=f"{name}: pretrained=True, but its weights .* cannot be reached"
                           f"|{name} has no published pretrained weights"):
            timm.create_model(name, pretrained=True)
    assert time.time() - t < 10
    # weights given as a local file load without any network
    src = timm.create_model("meta_vit_micro", num_stages=2)
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    got = timm.create_model("meta_vit_micro", num_stages=2, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
