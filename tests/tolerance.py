"""Tolerances that are tight and honest (DESIGN §6, the FlashAttention rule).

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
