"""Device functions shared by the kernels of several op families."""

import triton
import triton.language as tl

from . import interpreting


def device_function(fn):
    """``triton.jit`` for a GPU build. Under the interpreter a plain function instead: called
    from an interpreted kernel it runs on the same patched ``triton.language``, while a nested
    jit function call re-patches the language first (~5 ms per call in Triton 3.8)."""
    return fn if interpreting() else triton.jit(fn)


@device_function
def round_to(x, DTYPE: tl.constexpr, BF16_RTNE: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even. The Triton interpreter (3.8) truncates fp32 →
    bf16 casts; launchers set BF16_RTNE under it so the bits match a GPU's cvt.rn (subnormals
    still flush to zero there). On a GPU BF16_RTNE is False and this is a plain cast."""
    if BF16_RTNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(DTYPE)


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation at input_precision PRECISION; DOT_FP32 casts the
    operands to fp32 first (the interpreter's bf16 dot is broken; the fp32 products of bf16
    values are exact, as on the tensor core)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
