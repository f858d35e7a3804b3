"""Uninitialised memory made loud, for tests of kernels that must write every output element."""

import contextlib

import torch


@contextlib.contextmanager
def poisoned():
    """torch.empty returns NaN (floats) / the largest integer (ints) inside the block."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
