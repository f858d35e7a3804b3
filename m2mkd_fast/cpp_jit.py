"""Just-in-time build of the C++ extension: the fallback when ``m2mkd_fast._C`` is not installed.

When the cpp backend is first asked for (``backend.unavailable_reason``) and ``m2mkd_fast._C``
cannot be imported (e.g. ``pip install .`` built the wheel in an isolated environment without
torch), the extension is compiled from its C++ sources (``csrc/`` of a source checkout, or
``m2mkd_fast/csrc`` of an installed package) with ninja (torch.utils.cpp_extension.load) into a
cache directory, saying so in one line while it builds, and installed as ``m2mkd_fast._C``.
Later processes reuse the build. Where no compiler or ninja is present, one warning names the
fix and CPU ops use the torch backend. ``M2MKD_CPP_JIT=0`` turns the fallback off.

``M2MKD_CPP_JIT=1`` builds at ``import m2mkd_fast`` in place of the extension setup.py built (for
editing ``csrc/``): ninja recompiles only the sources that changed since the last build, so an
edit to one ``.cpp`` file costs one compile and an unchanged tree none. The build directory is
``$M2MKD_CPP_CACHE`` or ``~/.cache/m2mkd_fast/cpp-torch<version>-cp<python>``.
"""

import importlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent
_NOT_TRIED = object()
_reason: object = _NOT_TRIED  # why the extension is unavailable (None: it is available), once known


def source_directory() -> Path:
    """csrc/ of the source checkout, else the copy installed inside the package."""
    for directory in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc"):
        if (directory / "m2mkd.h").is_file():
            return directory
    return _PACKAGE.parent / "csrc"


def build_directory() -> Path:
    import torch

    tag = f"cpp-torch{torch.__version__.replace('+', '-')}-cp{sys.version_info.major}{sys.version_info.minor}"
    return Path(os.environ.get("M2MKD_CPP_CACHE") or Path.home() / ".cache" / "m2mkd_fast" / tag)


def load(verbose: bool = False):
    """Build (or reuse) the C++ sources and install them as m2mkd_fast._C; returns the module."""
    from torch.utils.cpp_extension import load as load_extension

    sources = sorted(str(p) for p in source_directory().glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sources of m2mkd_fast in {source_directory()}")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    linux = sys.platform == "linux"
    module = load_extension(
        name="m2mkd_fast_C",
        sources=sources,
        extra_include_paths=[str(source_directory())],
        extra_cflags=["-O3", "-fopenmp", "-march=x86-64-v2"] if linux else ["-O3"],  # as setup.py
        extra_ldflags=["-fopenmp"] if linux else [],
        build_directory=str(directory),
        verbose=verbose,
    )
    sys.modules["m2mkd_fast._C"] = module
    setattr(sys.modules["m2mkd_fast"], "_C", module)
    return module


def _missing_tool() -> Optional[str]:
    """What the just-in-time build lacks (sources, compiler, ninja), or None."""
    from torch.utils.cpp_extension import is_ninja_available

    here = os.path.dirname(sys.executable)  # pip's ninja lands here, on PATH only in an activated venv
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    if not any(source_directory().glob("*.cpp")):
        return f"its C++ sources are not installed (looked in {source_directory()})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; install g++ or set CXX)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _stale(directory: Path) -> bool:
    built = directory / "m2mkd_fast_C.so"
    return not built.exists() or built.stat().st_mtime < max(p.stat().st_mtime for p in source_directory().glob("*"))


def _import_or_build() -> Optional[str]:
    try:
        importlib.import_module("m2mkd_fast._C")
        return None
    except ImportError as err:
        not_installed = str(err)
    if os.environ.get("M2MKD_CPP_JIT") == "0":
        return f"the C++ extension m2mkd_fast._C is not installed ({not_installed}) and M2MKD_CPP_JIT=0"
    missing = _missing_tool()
    if missing is None:
        directory = build_directory()
        if _stale(directory):
            print(f"m2mkd_fast: building the C++ extension just in time into {directory} "
                  "(once; a few minutes)...", file=sys.stderr, flush=True)
        try:
            load()
            return None
        except Exception as err:  # noqa: BLE001 - any compiler or loader failure means "no extension"
            missing = f"its just-in-time build failed: {' '.join(str(err).split())[-500:]}"
    reason = (f"the C++ extension m2mkd_fast._C is not installed and cannot be built just in time: {missing}. "
              "Fix: install a C++ compiler and ninja, or reinstall with "
              "`pip install --no-build-isolation .` in an environment that has torch")
    warnings.warn(f"{reason}; CPU ops use the torch backend", RuntimeWarning, stacklevel=4)
    return reason


def unavailable_reason() -> Optional[str]:
    """None once m2mkd_fast._C is importable (built just in time if need be), else why not."""
    global _reason
    if _reason is _NOT_TRIED:
        _reason = _import_or_build()
    return _reason
