"""Tolerances that are tight and honest (docs/design.md §6, the FlashAttention rule).

A fast implementation in dtype D is accepted when its error against a float64 reference is at
most ``factor`` times the error of the plain-PyTorch reference computed in D, plus a tiny atol.
"""

import torch

TINY_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(
    actual: torch.Tensor,
    reference_fp64: torch.Tensor,
    reference_same_dtype: torch.Tensor,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Fail unless |actual - ref64| <= factor * |ref_dtype - ref64| + atol (max norms)."""
    assert actual.shape == reference_fp64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference_fp64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = TINY_ATOL[actual.dtype] if atol is None else atol
    err = max_abs_error(actual, reference_fp64)
    base = max_abs_error(reference_same_dtype, reference_fp64)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x reference error {base:.3e} + {atol:.1e}"


def grad_atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The atol on top of the 2x rule for attention gradients: what no implementation can avoid.

    bf16: rounding the result itself, one ulp of the largest |value| (at least 1e-3; a scalar
    like dβ, or a tiny tensor, can otherwise hit a reference that rounded the lucky way). fp32:
    long reductions (dσ, dβ over B·H·U·V terms), SDPA's backward (dS = P ⊙ (dP − rowsum(dO ⊙ O))
    cancels terms of the size of dP that the reference never forms) and plain-PyTorch
    formulations other than the oracle's cost a few ulps of the gradient's scale, which can
    exceed 2x a reference error that is by luck far below an ulp: allow 32 ulps of
    (1 + max |gradient|).
    """
    scale = 1 + ref64.abs().max().item()
    if dtype == torch.float32:
        return 32 * torch.finfo(torch.float32).eps * scale
    return max(1e-3, torch.finfo(dtype).eps * scale)
