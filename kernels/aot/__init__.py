"""Ahead-of-time compilation of the Triton kernels for GPU targets, on any machine.

``compile`` compiles a :class:`~m2mkd_fast.kernels.aot.compile.KernelSpec` for sm_80 / sm_90a
and reads its resources; one module per op family (``routing``, ``moe``, ``readin``, ``graph``)
lists its kernels' specs (``aot_specs()``); ``report`` compiles them all:

    python -m m2mkd_fast.kernels.aot.report [--quick] [--check]
"""

FAMILIES = ("routing", "moe", "readin", "graph")
