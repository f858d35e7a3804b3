"""The one torch.library namespace of every backend's custom ops, and their shared autograd rules.

Every backend registers its ops as ``m2mkd_fast::<family>_<backend>_<stage>`` (family: routing,
moe, readin, graph; backend: triton, cpp, torch), each with a fake (meta) implementation and an
autograd registration:

* ``fwd`` — the differentiable op; its autograd formula calls
* ``bwd`` — its gradient, which has no derivative itself: differentiating it raises
  (:func:`forbid_double_backward`);
* any other stage names a helper of the family (``routing_cpp_topk``, ``graph_cpp_sample``, ...):
  integer or sampled outputs without a derivative to the inputs are registered with
  :func:`register_no_derivative`.
"""

import torch

NAMESPACE = "m2mkd_fast"


def op_name(family: str, backend: str, stage: str) -> str:
    """The qualified name ``m2mkd_fast::<family>_<backend>_<stage>``."""
    return f"{NAMESPACE}::{family}_{backend}_{stage}"


def forbid_double_backward(name: str) -> None:
    """Register autograd on the backward op ``name``: differentiating its outputs raises."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} computes a gradient and has no derivative itself: double backward "
            "(create_graph=True, higher-order gradients) through this op is not supported"
        )

    torch.library.register_autograd(name, backward, setup_context=_no_context)


def register_no_derivative(name: str) -> None:
    """Register autograd on ``name`` whose outputs do not depend differentiably on its inputs
    (indices, counts, random numbers): every input gets no gradient."""

    def backward(ctx, *grads):
        return (None,) * ctx.num_inputs

    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def _no_context(ctx, inputs, output):
    return None
