"""torch.compile(fullgraph=True) traces every layer in training and in evaluation, on every CPU
backend, and matches eager: outputs and the gradients of the inputs and parameters."""

import pytest
import torch

from m2mkd_fast.backend import available_backends
from m2mkd_fast.layers import KernelModulatedAttention, ModFFN, MoEMLP, ReadInAttention, Stitch


def _randn(*shape):
    return torch.randn(*shape, requires_grad=True)


def _layers(backend: str) -> dict:
    """name -> (layer, its inputs); small shapes."""
    return {
        "kernel_modulated_attention": (
            KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, backend=backend),
            (_randn(2, 5, 12), _randn(5, 6), _randn(5, 8), _randn(2, 7, 12), _randn(7, 6), _randn(7, 8)),
        ),
        "readin_attention": (
            ReadInAttention(16, 24, 8, num_heads=2, head_dim=8, backend=backend),
            (_randn(2, 5, 16), _randn(5, 8), _randn(2, 7, 24)),
        ),
        "moe_mlp": (
            MoEMLP(16, 32, 4, k=2, capacity_factor=1.0, group_size=8, noise_std=1.0, backend=backend),
            (_randn(24, 16),),
        ),
        "mod_ffn": (ModFFN(12, 16, 6), (_randn(2, 5, 12), _randn(5, 6))),
        "stitch": (Stitch(12, 16), (_randn(2, 5, 12),)),
    }


def _loss_and_grads(fn, layer, inputs, seed: int = 3):
    torch.manual_seed(seed)  # the same noise and sampling seeds in eager and compiled runs
    out = fn(*inputs)
    loss = out.square().sum() + getattr(layer, "aux_loss", 0.0)
    leaves = [t for t in inputs if t.requires_grad] + [p for p in layer.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in available_backends()])
@pytest.mark.parametrize("name", ["kernel_modulated_attention", "readin_attention", "moe_mlp", "mod_ffn", "stitch"])
def test_layer_compiles_fullgraph_and_matches_eager(name, backend, training):
    if name in ("mod_ffn", "stitch") and backend != "torch":
        pytest.skip("the layer calls no op: one backend is enough")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer, inputs = _layers(backend)[name]
    layer.train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want, want_grads = _loss_and_grads(layer, layer, inputs)
    got, got_grads = _loss_and_grads(compiled, layer, inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w)
