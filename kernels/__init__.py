"""Triton kernels and their launchers (installed as m2mkd_fast.kernels). No autograd here."""
