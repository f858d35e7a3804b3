"""The shared Philox stream: oracle == Triton's tl.rand (bit for bit) == the torch backend's copy."""

import pytest
import torch

from m2mkd_fast.reference.random import philox4x32, philox_uint32, philox_uniform
from m2mkd_fast.torch_backend.philox import philox_uniform as fast_philox_uniform

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

SEEDS = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11, 2**63 - 1]


@triton.jit
def _rand_kernel(out_ptr, offset_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offsets = tl.load(offset_ptr + idx, mask=mask, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, offsets), mask=mask)


def _triton_rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = offsets.to(device)
    out = torch.full(offsets.shape, float("nan"), device=device)
    block = 1024
    _rand_kernel[(triton.cdiv(offsets.numel(), block),)](out, offsets, seed, offsets.numel(), BLOCK=block)
    return out.cpu()


def _offsets(dtype: torch.dtype, n: int = 2500) -> torch.Tensor:
    off = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64)
    off[:6] = torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**31 - 2])
    if dtype == torch.int64:
        off[6:11] = torch.tensor([2**31, 2**32, 2**32 + 5, 2**40 + 9, 2**62 + 1])
    return off.to(dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_oracle_matches_triton_tl_rand_bit_for_bit(dtype):
    offsets = _offsets(dtype)
    for seed in SEEDS + [2**63 + 5, 2**64 - 1]:
        expected = _triton_rand(seed, offsets)
        actual = philox_uniform(seed, offsets)
        assert actual.dtype == torch.float32
        assert torch.equal(actual, expected), f"seed {seed}: {(actual != expected).sum()} mismatches"


def test_random123_known_answers():
    # Philox4x32-10 known-answer vectors of Random123 (kat_vectors)
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in philox4x32(counter, key)) == expected
    assert int(philox_uint32(0, torch.tensor([0]))[0]) == 0x6627E8D5


def test_torch_backend_philox_matches_oracle():
    gen = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 2**31 - 1, (3, 1000), generator=gen)
    offsets[0, :3] = torch.tensor([0, 2**31 - 1, 7])
    for seed in SEEDS + [2**64 - 1]:
        assert torch.equal(fast_philox_uniform(seed, offsets), philox_uniform(seed, offsets)), f"seed {seed}"
    big = torch.tensor([2**32, 2**40 + 3, 2**62 + 1])
    assert torch.equal(fast_philox_uniform(99, big), philox_uniform(99, big))


def test_uniforms_look_uniform():
    u = philox_uniform(2024, torch.arange(200_000))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    assert not torch.equal(philox_uniform(1, torch.arange(64)), philox_uniform(2, torch.arange(64)))


def test_bad_arguments():
    with pytest.raises(TypeError, match="seed must be a Python int"):
        philox_uniform(1.5, torch.arange(3))
    with pytest.raises(TypeError, match="offsets must be an integer tensor"):
        philox_uniform(1, torch.arange(3.0))
