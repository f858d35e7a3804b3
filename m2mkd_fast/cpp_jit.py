"""Just-in-time build of the C++ extension for development: ``M2MKD_CPP_JIT=1``.

With ``M2MKD_CPP_JIT=1`` in the environment, ``import m2mkd_fast`` compiles ``csrc/`` of the
source checkout with ninja (torch.utils.cpp_extension.load) into a cached build directory and
installs the result as ``m2mkd_fast._C``, in place of the extension setup.py built. ninja
recompiles only the sources that changed since the last build, so an edit to one ``.cpp`` file
costs one compile and an unchanged tree none (tests never rebuild it). The build directory is
``$M2MKD_CPP_CACHE`` or ``~/.cache/m2mkd_fast/cpp-torch<version>``.
"""

import os
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"


def build_directory() -> Path:
    import torch

    default = Path.home() / ".cache" / "m2mkd_fast" / f"cpp-torch{torch.__version__.replace('+', '-')}"
    return Path(os.environ.get("M2MKD_CPP_CACHE") or default)


def load(verbose: bool = False):
    """Build (or reuse) csrc/ and install it as m2mkd_fast._C; returns the module."""
    from torch.utils.cpp_extension import load as load_extension

    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"M2MKD_CPP_JIT=1 needs a source checkout of m2mkd_fast: no C++ sources in {SOURCE_DIR}")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    linux = sys.platform == "linux"
    module = load_extension(
        name="m2mkd_fast_C",
        sources=sources,
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3", "-fopenmp", "-march=x86-64-v2"] if linux else ["-O3"],  # as setup.py
        extra_ldflags=["-fopenmp"] if linux else [],
        build_directory=str(directory),
        verbose=verbose,
    )
    sys.modules["m2mkd_fast._C"] = module
    setattr(sys.modules["m2mkd_fast"], "_C", module)
    return module
