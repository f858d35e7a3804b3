"""An installed package without the C++ extension (what `pip install .` gives under build
isolation): the cpp backend builds it just in time on first use into a cache, saying so once,
and reuses the build; without a compiler it warns once, naming the fix, and CPU ops use torch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = (
    "import sys, warnings\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]  # not the checkout's\n"
    "import torch, m2mkd_fast as mk\n"
    "warnings.simplefilter('default')\n"
    "print(mk.__file__)\n"
    "print(mk.available_backends())\n"
    "print(mk.available_backends())\n"
    "if 'cpp' in mk.available_backends():\n"
    "    r = mk.ops.route(torch.randn(10, 4), k=2, gate='naive', backend='cpp')\n"
    "    assert r.counts.sum().item() == 20\n"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package laid out as setup.py installs it (C++ sources in m2mkd_fast/csrc, no _C)."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "m2mkd_fast", site / "m2mkd_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "kernels"))
    shutil.copytree(REPO / "kernels", site / "m2mkd_fast" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "csrc", site / "m2mkd_fast" / "csrc")
    return site


def _run(site: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(site), "M2MKD_CPP_CACHE": str(cache), "OMP_NUM_THREADS": "1",
         "TRITON_INTERPRET": "0", **env}
    e.pop("M2MKD_CPP_JIT", None)
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=site, env=e, capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.slow
def test_missing_extension_is_built_just_in_time_once(installed, tmp_path):
    first = _run(installed, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.splitlines()[0].startswith(str(installed))
    assert first.stdout.splitlines()[1:] == ["['torch', 'cpp']"] * 2
    assert first.stderr.count("building the C++ extension just in time") == 1, first.stderr[-3000:]
    built = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.o")}
    assert len(built) == 5
    second = _run(installed, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building" not in second.stderr and second.stdout.splitlines()[1] == "['torch', 'cpp']"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.o")} == built


def test_without_a_compiler_one_warning_names_the_fix(installed, tmp_path):
    r = _run(installed, tmp_path, CXX="no-such-compiler-m2mkd")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1:] == ["['torch']"] * 2
    assert r.stderr.count("RuntimeWarning") == 1, r.stderr
    assert "no-such-compiler-m2mkd" in r.stderr and "pip install --no-build-isolation" in r.stderr
    assert not list(tmp_path.glob("*.o"))
