#!/usr/bin/env bash
# Create .venv in the repository root and install m2mkd_fast with everything its tests and
# pipeline need. Safe to run again: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements-cpu.txt -r requirements-test.txt
fi
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import m2mkd_fast as mk; print('m2mkd_fast', mk.__version__, 'backends:', mk.available_backends())"
