#!/usr/bin/env bash
# The GPU runs of seqlab in three steps, each sized for one 10-minute call of a lent GPU machine:
#
#   kernels       the Triton tests compiled on the GPU (bfloat16 added), then
#                 bench_triton_gpu.py's correctness check (Triton vs the PyTorch chunk form, bf16),
#                 its per-kernel profile (2x8192) and its decode section (fused recurrent step vs
#                 SDPA over a KV cache, 1K / 32K)
#   kernel-speed  bench_triton_gpu.py's training section: the Triton chunk kernels vs fla 0.6.0 and
#                 SDPA, forward and forward+backward, bf16, H = 16, K = V = 128, T = 2K … 32K
#   bench         `seqlab bench` (its ops against SDPA and fla, then whole --preset large models:
#                 12 layers, d_model 1024), bf16, T = 512 … 32K
#
#     bash benchmarks/gpu_bench.sh STEP [STEP ...]     # default: all three, in that order
#     DEST=dir LIMIT=seconds PYTHON=python3 bash benchmarks/gpu_bench.sh bench
#
# Results go to $DEST/<step>/ (default benchmarks/results/<date>-<gpu>). Each timed step stops
# starting measurements after $LIMIT seconds (default 480) and still writes its files, so a step
# ends inside a 10-minute call; the files are also rewritten after every measurement, so a killed
# step keeps what it measured.
#
# Needs a CUDA build of torch. Packages it lacks are installed from the wheels in $WHEELS
# (default .whl/) when that folder exists; fla is optional (without it the peers are SDPA only).
# For a GPU machine with no network, fetch the wheels where pip works, from the repo root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl -r benchmarks/gpu_wheels.txt
# (3.9 MB; the list says why each is there. The GPU image has torch, triton, einops, matplotlib,
# rich, typer, pytest and hypothesis.) benchmarks/check_gpu_image.sh runs the test suite with
# these wheels under the image's Python, torch and numpy on a CPU machine, before any device
# time is spent.
# With the device tool of this workplace: one call per step, carrying .whl (ignored through
# .git/info/exclude) and packing the results into its $OUT, which returns at most 8 files:
#     DEST=/tmp/r LIMIT=480 bash benchmarks/gpu_bench.sh kernels; tar czf $OUT/kernels.tgz -C /tmp r
# The 30 minutes of device time a session gets fit the three steps (about 9 minutes each with
# the machine's start) and little else: run `kernels` first, since the others need its check.
# If a compiled test fails for one kernel, Triton may have miscompiled it at that warp count
# (fla found such cases on Hopper: fla #984, #988); SEQLAB_TRITON_WARPS=wy_bwd=4 (any of the
# kernels, comma-separated) reruns it at another without editing code, e.g. in the same call:
#     SEQLAB_TRITON_WARPS=wy_bwd=4 python3 -m pytest -q -x tests/ops/triton -k delta
# and benchmarks/compile_triton.py, on any machine, shows its registers and spills there first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
LIMIT=${LIMIT:-480}
case $LIMIT in
    '' | *[!0-9]*) echo "LIMIT must be whole seconds, got '$LIMIT'" >&2; exit 2 ;;
esac
[ "$LIMIT" -ge 60 ] || { echo "LIMIT must be at least 60 s, got $LIMIT" >&2; exit 2; }
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(kernels kernel-speed bench)
for step in "${STEPS[@]}"; do
    case $step in
        kernels | kernel-speed | bench) ;;
        *) echo "unknown step '$step': expected kernels, kernel-speed or bench" >&2; exit 2 ;;
    esac
done

if [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/seqlab-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/seqlab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
"$PYTHON" -c "import einops, matplotlib, pydantic, rich, typer" ||
    { echo "missing packages: install them or put their wheels in $WHEELS" >&2; exit 1; }
"$PYTHON" -c "import fla" 2>/dev/null || echo "fla-core not found: the peers are SDPA only" >&2

# "NVIDIA H100 80GB HBM3" → h100
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
DEST=${DEST:-benchmarks/results/$(date +%F)-$GPU}
KERNELS=("$PYTHON" benchmarks/bench_triton_gpu.py)
# Every mixer at its defaults (gdn: 3 heads of 256 at d_model 1024); retnet runs the per-head
# gate op, which fla calls chunk_simple_gla.
BENCH=("$PYTHON" -m seqlab.cli bench --device cuda --dtype bf16 --preset large
       --seq-lens 512,1k,2k,4k,8k,16k,32k)

for step in "${STEPS[@]}"; do
    mkdir -p "$DEST/$step"
    start=$SECONDS
    case $step in
        kernels)
            # at most half the time for the tests; a failing test ends the step, a cut one leaves
            # the check below to guard the decode timings. They compile about 600 kernel variants
            # (counted in the interpreter, float32/float16; bf16 adds more) at 0.5-2 s each on one
            # core, so with pytest-xdist they run in $WORKERS processes (default 8).
            rc=0
            PARALLEL=()
            if "$PYTHON" -c "import xdist" 2>/dev/null; then PARALLEL=(-n "${WORKERS:-8}"); fi
            timeout $((LIMIT / 2)) "$PYTHON" -m pytest -q -x -p no:cacheprovider --durations 10 \
                "${PARALLEL[@]}" tests/ops/triton 2>&1 | tee "$DEST/$step/tests.log" ||
                rc=${PIPESTATUS[0]}
            if [ "$rc" = 124 ]; then
                echo "tests cut after $((LIMIT / 2)) s" | tee -a "$DEST/$step/tests.log"
            elif [ "$rc" != 0 ]; then
                exit "$rc"
            fi
            "${KERNELS[@]}" --sections check,decode,profile \
                --time-limit $((LIMIT - (SECONDS - start))) --out "$DEST/$step"
            ;;
        kernel-speed)
            # fla 0.6.0 refuses its gated backward on Hopper with Triton 3.6 (fla #640); past its
            # guard the same kernels run and are timed, marked so in the results
            "${KERNELS[@]}" --sections check,training,profile --profile-fla --fla-past-guard \
                --time-limit "$LIMIT" --out "$DEST/$step"
            ;;
        bench)
            # the ops get a third of the time; the models, the slower part, the rest
            "${BENCH[@]}" --level op --arch attn --arch gla --arch retnet --arch gdn \
                --repeats 20 --warmup 3 --time-limit $((LIMIT / 3)) --out "$DEST/$step/ops"
            "${BENCH[@]}" --level model --arch attn --arch gla --arch gdn --arch "gdn*3,attn" \
                --repeats 10 --warmup 2 --decode-repeats 50 --time-limit $((LIMIT * 2 / 3)) \
                --out "$DEST/$step/models"
            ;;
    esac
done
