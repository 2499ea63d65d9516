#!/usr/bin/env bash
# The GPU benchmark in one command: seqlab's core ops against torch SDPA and fla's chunk kernels,
# and whole models (preset large: 12 layers, d_model 1024), bf16, T from 512 to 32K. Writes
# JSON, markdown and PNGs to benchmarks/results/<date>-<gpu>/{ops,models}/. The op and profile
# tests run first, on the GPU: a benchmark reports only after they pass.
#
#     bash benchmarks/gpu_bench.sh            # all; `tests`, `ops` or `models` runs one step
#     OUT=dir PYTHON=python3 bash benchmarks/gpu_bench.sh
#
# Needs a CUDA build of torch. Packages it lacks are installed from the wheels in $WHEELS
# (default .whl/) when that folder exists; fla is optional (without it the peers are SDPA only).
# For a GPU machine with no network, fetch the wheels where pip works, from the repo root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         fla-core==0.6.0 pydantic pydantic-core annotated-types typing-inspection
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
WHAT=${1:-all}

if [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/seqlab-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/seqlab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
"$PYTHON" -c "import einops, matplotlib, pydantic, rich, typer" ||
    { echo "missing packages: install them or put their wheels in $WHEELS" >&2; exit 1; }
"$PYTHON" -c "import fla" 2>/dev/null || echo "fla-core not found: the peers are SDPA only" >&2

# "NVIDIA H100 80GB HBM3" → h100
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
OUT=${OUT:-benchmarks/results/$(date +%F)-$GPU}
# Every mixer at its defaults (gdn: 3 heads of 256 at d_model 1024); retnet runs the per-head
# gate op, which fla calls chunk_simple_gla.
BENCH=("$PYTHON" -m seqlab.cli bench --device cuda --dtype bf16 --preset large
       --seq-lens 512,1k,2k,4k,8k,16k,32k)

if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
    "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/ops tests/profile
fi
if [ "$WHAT" = all ] || [ "$WHAT" = ops ]; then
    "${BENCH[@]}" --level op --arch attn --arch gla --arch retnet --arch gdn \
        --repeats 20 --warmup 3 --out "$OUT/ops"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = models ]; then
    "${BENCH[@]}" --level model --arch attn --arch gla --arch gdn --arch "gdn*3,attn" \
        --repeats 10 --warmup 2 --decode-repeats 50 --out "$OUT/models"
fi
