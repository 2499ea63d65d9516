#!/usr/bin/env bash
# The GPU run in one command, sized for one call of a lent GPU machine (under 8 minutes on an
# H200, so a rerun after a fix still fits in a session's 15 minutes of device time):
#
#     bash benchmarks/gpu_run.sh [bench_triton_gpu.py options, e.g. --sections training]
#
# It runs benchmarks/bench_triton_gpu.py with every section (first calls, correctness in bf16
# and fp32, speed beside fla 0.6.0 and SDPA, decode, per-kernel profile) and, beside its checks,
# the compiled kernel tests (tests/ops/triton, bfloat16 added) in $WORKERS pytest-xdist
# processes. Results go to $DEST (default benchmarks/results/<date>-<gpu>): triton_gpu.md and
# .json, tests.log, run.log, env.txt (GPU, driver, versions, the exact command); copied flat to
# $OUT when the device tool sets it (DEST=$OUT writes there directly, so a call that runs out of
# time still returns every finished row). A short summary is printed last. Exit status: 0, or 1 when
# a check or a kernel test failed (everything is still timed and written).
#
#     LIMIT=seconds     no new measurement after this long (default 420); background processes
#                       (fla's first calls, the fp32 checks, the tests) end at BG_LIMIT (270);
#                       HARD (LIMIT + 120) ends the whole run, whatever it is doing
#     WORKERS=n         pytest-xdist processes for the kernel tests (default 6; 0: no tests)
#     WHEELS=dir        wheels installed first when the folder exists (default .whl)
#     SMOKE=1           the same run on this CPU under Triton's interpreter at tiny shapes, in
#                       this environment (no wheels, no fla, no kernel tests): what CI runs
#                       (tests/benchmarks/test_gpu_run.py)
#
# The GPU machine has no network: the packages its image lacks travel as wheels. Where pip works,
# from the repo root (3.9 MB; benchmarks/gpu_wheels.txt says why each is there):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl -r benchmarks/gpu_wheels.txt
# then, with this workplace's device tool, one call carrying .whl:
#     run(command="DEST=$OUT bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
# benchmarks/check_gpu_image.sh runs the test suite under the image's Python, torch and numpy on
# a CPU first. If a check fails for one kernel, Triton may have miscompiled it at that warp count
# (fla found such cases on Hopper); SEQLAB_TRITON_WARPS=wy_bwd=4 (any kernels, comma-separated)
# reruns it at another without editing code, e.g. the delta rule's checks alone:
#     SEQLAB_TRITON_WARPS=wy_bwd=4 python3 benchmarks/bench_triton_gpu.py --sections check \
#         --ops gated_delta --no-fla --out /tmp/r
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
LIMIT=${LIMIT:-420}
BG_LIMIT=${BG_LIMIT:-270}
HARD=${HARD:-$((LIMIT + 120))}
WORKERS=${WORKERS:-6}
SMOKE=${SMOKE:-0}
for name in LIMIT BG_LIMIT HARD WORKERS; do
    case ${!name} in
        '' | *[!0-9]*) echo "$name must be a whole number, got '${!name}'" >&2; exit 2 ;;
    esac
done
case $SMOKE in 0 | 1) ;; *) echo "SMOKE must be 0 or 1, got '$SMOKE'" >&2; exit 2 ;; esac
[ "$BG_LIMIT" -le "$LIMIT" ] || { echo "BG_LIMIT ($BG_LIMIT) must not exceed LIMIT ($LIMIT)" >&2; exit 2; }

if [ "$SMOKE" = 0 ] && [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/seqlab-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/seqlab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    GPU=cpu-smoke
    ARGS=(--device cpu --dtype fp32 --check-dtypes fp32,fp16 --heads 2 --head-dim 16
          --shapes 1x64,2x32 --check-shape 1x40 --contexts 16,64 --decode-batches 1
          --profile-shape 1x32 --profile-calls 1 --repeats 2 --no-fla)
    WORKERS=0
else
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" ||
        exit 1
    # "NVIDIA H200" → h200
    GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
    ARGS=(--fla-past-guard --profile-fla)
    "$PYTHON" -c "import fla" 2>/dev/null || echo "fla-core not found: the peers are SDPA only" >&2
fi
"$PYTHON" -c "import einops, pydantic, rich, typer" ||
    { echo "missing packages: install them or put their wheels in $WHEELS" >&2; exit 1; }
# the kernel tests run under pytest-xdist (-n WORKERS); without it they are left out
[ "$WORKERS" = 0 ] || "$PYTHON" -c "import xdist" 2>/dev/null ||
    { echo "pytest-xdist missing: the kernel tests are not run" >&2; WORKERS=0; }

DEST=${DEST:-benchmarks/results/$(date +%F)-$GPU}
mkdir -p "$DEST"
CMD=("$PYTHON" benchmarks/bench_triton_gpu.py "${ARGS[@]}" --keep-going --time-limit "$LIMIT"
     --background-limit "$BG_LIMIT" --tests-workers "$WORKERS" --out "$DEST" "$@")
{
    echo "date: $(date -u +%FT%TZ)"
    echo "command: SMOKE=$SMOKE LIMIT=$LIMIT BG_LIMIT=$BG_LIMIT HARD=$HARD WORKERS=$WORKERS bash benchmarks/gpu_run.sh $*"
    echo "runs: ${CMD[*]}"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1
        nvidia-smi 2>&1 | grep -m1 "CUDA Version" || true
    fi
    "$PYTHON" - <<'EOF'
import importlib, platform
print("python:", platform.python_version())
for name in ("torch", "triton", "fla", "numpy", "pydantic", "pytest", "xdist"):
    try:
        print(f"{name}: {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda: {torch.version.cuda}; {p.name}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
} >"$DEST/env.txt" 2>&1

start=$SECONDS
# a row already started runs to its end after LIMIT; HARD ends the run whatever it is doing (its
# files hold every finished row)
timeout -k 10 "$HARD" "${CMD[@]}" 2>&1 | tee "$DEST/run.log"
rc=${PIPESTATUS[0]}
echo "wall: $((SECONDS - start)) s, exit $rc" >>"$DEST/env.txt"  # the summary stays last
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && ! [ "$OUT" -ef "$DEST" ]; then
    cp "$DEST"/* "$OUT"/
fi
exit "$rc"
