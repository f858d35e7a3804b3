"""Triton's counter-based RNG (``tl.rand``) reproduced bit for bit in plain PyTorch.

Every backend of ``graph_attention`` draws its relaxed-Bernoulli noise from this stream, so a
sampled forward is the same whichever backend runs it. ``tl.rand(seed, offset)`` is
Philox4x32-10 (triton/language/random.py):

* key   = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF), the seed taken as an unsigned 64-bit int;
* counter = (offset low 32 bits, offset high 32 bits, 0, 0) — for an int32 offset tensor the
  high word is 0, so for 0 <= offset < 2**31 both readings agree;
* ten rounds of ``c0, c1, c2, c3 = hi(B*c2)^c1^k0, lo(B*c2), hi(A*c0)^c3^k1, lo(A*c0)`` with the
  key raised by (0x9E3779B9, 0xBB67AE85) after each round;
* the first output word, bitcast to int32, x -> (x < 0 ? ~x : x), times the float32 constant
  4.6566127342e-10 (a float32 multiply), giving a float32 in [0, 1).

This module is the oracle: written for clarity, uint32 arithmetic emulated on int64 tensors with
16-bit limbs so that no intermediate ever exceeds 2**34 (no signed overflow anywhere).
"""

import torch

__all__ = ["philox_uniform", "philox_uint32", "philox4x32"]

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's scale, used as a float32 constant


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high 32 bits, low 32 bits) of the 64-bit product of uint32 values ``a`` (int64 tensor) and ``b``."""
    a_hi, a_lo = a >> 16, a & _MASK16
    b_hi, b_lo = b >> 16, b & _MASK16
    # a*b = hh * 2**32 + mid * 2**16 + ll, every partial product below 2**32, mid below 2**33
    ll = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi
    hh = a_hi * b_hi
    low = ll + ((mid & _MASK16) << 16)  # below 2**33
    hi = hh + (mid >> 16) + (low >> 32)
    return hi & _MASK32, low & _MASK32


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = _N_ROUNDS) -> tuple:
    """Philox4x32 (Salmon et al. 2011) on uint32 words held in int64 tensors.

    counter: four int64 tensors (or ints) of uint32 values; key: two uint32 ints. Returns the four
    output words. Matches Random123 and Triton's ``philox_impl``.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, offsets)``: the first Philox4x32-10 word, as uint32 values in int64."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"philox_uint32: seed must be a Python int, got {type(seed).__name__}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"philox_uint32: offsets must be an integer tensor, got {offsets.dtype}")
    seed &= (1 << 64) - 1  # tl.philox casts the seed to uint64
    offsets = offsets.to(torch.int64)
    zero = torch.zeros_like(offsets)
    counter = (offsets & _MASK32, (offsets >> 32) & _MASK32, zero, zero)
    return philox4x32(counter, (seed & _MASK32, seed >> 32))[0]


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, offsets)`` in plain PyTorch: float32 uniforms in [0, 1), same shape as ``offsets``.

    ``seed`` is a Python int (taken modulo 2**64, as Triton casts it to uint64); ``offsets`` an
    integer tensor read as Triton reads an int64 offset tensor (identical to an int32 one for
    offsets in [0, 2**31)).
    """
    word = philox_uint32(seed, offsets)
    # bitcast to int32 and fold the negative half: x < 0 -> ~x == -x - 1, i.e. 2**32 - 1 - word
    folded = torch.where(word >= 2**31, _MASK32 - word, word)  # in [0, 2**31)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
