"""Triton kernels and their launchers, one module per op family (installed as m2mkd_fast.kernels).

No autograd here; the ahead-of-time compilation specs and report live in the ``aot`` subpackage.
"""
