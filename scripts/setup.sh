#!/usr/bin/env bash
# Create .venv in the repository root and install m2mkd_fast with everything its tests and
# pipeline need. Safe to run again: an existing .venv is reused.
# A machine whose python3 has a CUDA torch (a GPU machine) keeps it: the venv sees the system's
# packages and a pip constraint stops any requirement from installing another torch over it.
# Elsewhere the pinned CPU-machine torch (requirements-cpu.txt) goes into the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements-cpu.txt
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  torch_version=$(python3 -c "from importlib.metadata import version; print(version('torch'))")  # as pip sees it
  echo "setup.sh: keeping this machine's CUDA torch $torch_version (a venv with --system-site-packages)"
  python3 -m venv --system-site-packages .venv
  echo "torch==$torch_version" > .venv/keep-torch.txt
  export PIP_CONSTRAINT="$PWD/.venv/keep-torch.txt"
  requirements=requirements.txt
else
  python3 -m venv .venv
  if .venv/bin/python -c "import torch" 2>/dev/null; then
    requirements=requirements.txt
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r "$requirements" -r requirements-test.txt
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import m2mkd_fast as mk; print('m2mkd_fast', mk.__version__, 'backends:', mk.available_backends())"
