"""Build and install m2mkd_fast.

The C++ CPU backend (csrc/ -> m2mkd_fast._C) is compiled with ninja when torch and a C++
compiler are present. Under pip's default build isolation torch is absent at build time (it is
not a build requirement: that would download a CUDA torch of several GB), so the wheel has no
extension; m2mkd_fast.cpp_jit then builds it just in time on first use from the C++ sources
installed with the package. `pip install --no-build-isolation .` builds it at install time
against the torch already in the environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"


def _extension_setup():
    """Return (ext_modules, cmdclass) for the C++ extension, or empty ones when impossible."""
    if os.environ.get("M2MKD_NO_CPP") == "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("m2mkd_fast: torch not importable at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but let the install succeed without it."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure means "no extension"
                print(f"m2mkd_fast: C++ extension not built ({err}); the torch backend is used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                print(f"m2mkd_fast: C++ extension not built ({err}); the torch backend is used", file=sys.stderr)

    ext = CppExtension(
        "m2mkd_fast._C",
        sources,
        extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2"] if sys.platform == "linux" else ["-O3"],
        extra_link_args=["-fopenmp"] if sys.platform == "linux" else [],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
# folders of data files, installed as packages without Python modules; the C++ sources go along
# so that m2mkd_fast.cpp_jit can build the extension on first use where the wheel has none
DATA_PACKAGES = {"m2mkd_fast.configs": ["*.yaml"], "m2mkd_fast.data.assets": ["*.npz"],
                 "m2mkd_fast.csrc": ["*.cpp", "*.h"]}

setup(
    name="m2mkd_fast",
    version=VERSION,
    description="Fast module-to-module knowledge distillation: Triton/C++ kernels for V-MoE routing and NAC attention, layers, models and the m2mKD trainer",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["m2mkd_fast", "m2mkd_fast.*"], exclude=["m2mkd_fast.kernels", "m2mkd_fast.kernels.*"])
    + ["m2mkd_fast.kernels"] + [f"m2mkd_fast.kernels.{name}" for name in find_packages("kernels")] + list(DATA_PACKAGES),
    package_dir={"m2mkd_fast.kernels": "kernels", "m2mkd_fast.csrc": "csrc"},
    package_data=DATA_PACKAGES,
    install_requires=[
        "torch>=2.11",
        "timm>=1.0",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton>=3.6"]},
    entry_points={"console_scripts": ["m2mkd-fast=m2mkd_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
