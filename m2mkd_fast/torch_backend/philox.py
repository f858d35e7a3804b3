"""Triton's ``tl.rand`` stream (Philox4x32-10) in plain PyTorch, written for speed.

Same numbers, bit for bit, as ``tl.rand(seed, offsets)`` and as the oracle
``m2mkd_fast.reference.random.philox_uniform`` (a test checks all three agree); see there for
the algorithm. Here uint32 words live in int64 tensors and each 32x32-bit product is one int64
multiply: the two's-complement wrap-around keeps all 64 product bits, so ``p >> 32`` and
``p & 0xFFFFFFFF`` are its high and low words. The low words are left unmasked ("dirty" high
bits) until they are xor-ed into the next multiplicands, which are masked once. Buffers are
reused in place: ~10 elementwise passes per round.
"""

import torch

__all__ = ["philox_uniform"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10


def _philox_word(seed, offsets: torch.Tensor) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):  # 0-dim int64 in [0, 2**63): the key words stay tensors
        seed = seed.to(device=offsets.device, dtype=torch.int64)
    else:
        seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    prod_a = torch.empty_like(c0)
    prod_b = torch.empty_like(c0)
    for _ in range(_N_ROUNDS):
        torch.mul(c2, _ROUND_B, out=prod_b)
        torch.mul(c0, _ROUND_A, out=prod_a)
        torch.bitwise_right_shift(prod_b, 32, out=c0)
        c0.bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(prod_a, 32, out=c2)
        c2.bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, prod_b = prod_b, c1  # new c1 = lo(B*c2), left dirty; old c1's buffer is reused
        c3, prod_a = prod_a, c3
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seed, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to Triton's ``tl.rand(seed, offsets)`` (offsets: integer
    tensor; seed: an int, or a 0-dim int64 tensor, as torch.compile traces it without a graph break)."""
    word = _philox_word(seed, offsets)
    folded = torch.where(word >= 2**31, _MASK32 - word, word)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)
