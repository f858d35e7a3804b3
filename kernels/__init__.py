"""Triton kernels and their launchers, one module per op family (installed as m2mkd_fast.kernels).

No autograd here; the ahead-of-time compilation specs and report live in the ``aot`` subpackage.
"""

import os


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
