"""Compile every Triton kernel the seqlab ops launch for an H100 (sm_90), on any machine, and
report what each needs on the SM: registers, spills, shared memory, wgmma, resident blocks per
SM, and how long it took to compile. No GPU is needed: Triton's own ptxas and cuobjdump do it.

    PYTHONPATH=. python benchmarks/compile_triton.py --out benchmarks/results/compile-sm90

For each op family (linear, simple_gla, gla, delta, gated_delta) and each --head-dims KxV, the
calls a model makes (training: chunk form forward and backward; packed: cu_seqlens with states,
forward and backward; prefill: no grad, final state; decode: one recurrent step) run inside
seqlab.ops.triton.aot.compile_only on CPU tensors in --dtype, with a fresh Triton cache per
(family, head dims), so every compile time is cold. A call's compile time is what its kernels
took that the block had not compiled for an earlier call: "training" is a cold first call of
forward and backward, the others what they add after it. Compilation runs on this machine's CPU
(one kernel at a time, as on a GPU machine's first call); loading the binary onto a GPU adds
little. B x T (--shape) only needs to be divisible as real shapes are (T a multiple of 16, as
every benchmark shape is): the kernels specialise on that, not on the sizes.

With --fla (fla-core 0.6.0 installed), fla's chunk ops get the same training call, imported as
on an H100 (it picks its autotune configs from the GPU it sees at import): its first call on a
GPU compiles every config its autotuner lists, then times them; the compiling is what this
measures. Where fla refuses a call (its gated backward on Hopper with Triton 3.4-3.7.0) the
error is recorded beside the kernels compiled before it.

Output: compile.json and compile.md in --out (written atomically at the end), the markdown
printed too. Exit status 1 if a seqlab kernel cannot launch on the target (its shared memory is
over the per-block limit), transposes a tl.dot result in registers (seqlab.ops.triton.aot's
MMA_TRANSPOSE: Triton 3.4-3.7.0 miscompiles a tl.dot on it on Hopper) or, with --fail-on-spill,
spills registers to local memory.

    PYTHONPATH=. python benchmarks/compile_triton.py --fla --out benchmarks/results/compile-sm90
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHOWN = ("BT", "BK", "BV", "GATE", "IS_VARLEN")  # constexprs that tell specialisations apart


def parse_args(argv=None) -> argparse.Namespace:
    from seqlab.ops.triton.aot import FAMILIES, SM_LIMITS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--heads", type=int, default=16)
    p.add_argument(
        "--head-dims",
        default="128x128,256x512",
        help="comma-separated KxV (128x128: the kernel benchmark; 256x512: gdn at d_model 1024)",
    )
    p.add_argument("--shape", default="2x256", help="B x T of the calls (default 2x256)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--fail-on-spill", action="store_true")
    p.add_argument(
        "--fla",
        action="store_true",
        help="also compile fla 0.6.0's chunk ops (simple_gla, gla, gated_delta among --families)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        args.head_dims = [tuple(int(n) for n in s.split("x")) for s in args.head_dims.split(",")]
        args.shape = tuple(int(n) for n in args.shape.split("x"))
        assert all(len(d) == 2 for d in args.head_dims) and len(args.shape) == 2
    except (ValueError, AssertionError):
        p.error(f"--head-dims takes KxV[,KxV...] and --shape BxT, got {args.head_dims!r}")
    args.families = args.families.split(",")
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown --families {unknown}; choose from {', '.join(FAMILIES)}")
    if args.fla and importlib.util.find_spec("fla") is None:
        p.error("--fla needs fla-core 0.6.0 (pip install fla-core==0.6.0 --no-deps)")
    return args


def compile_all(args) -> list[dict]:
    from seqlab.ops.triton.aot import CALLS, compile_call, compile_only

    B, T = args.shape
    rows = []
    for K, V in args.head_dims:
        for family in args.families:
            with tempfile.TemporaryDirectory() as cache, compile_only(args.arch, cache) as log:
                for call in CALLS:
                    log.call = call
                    compile_call(
                        family, call, DTYPES[args.dtype], B, T, args.heads, K, V, args.chunk_size
                    )
            for k in log.kernels:
                rows.append({"impl": "seqlab", "family": family, "K": K, "V": V} | k.as_dict())
            print(f"K={K} V={V} {family}: {len(log.kernels)} kernels", file=sys.stderr)
    return rows


FLA_OPS = {
    "simple_gla": "chunk_simple_gla",
    "gla": "chunk_gla",
    "gated_delta": "chunk_gated_delta_rule",
}


def import_fla_as_on(arch: int):
    """fla.ops, imported as on that GPU: fla chooses its autotune configs at import from the
    device it sees (Hopper or not, shared memory), so torch.cuda answers as an H100 and Triton's
    driver is compile_only's, for good in this process."""
    import types

    from seqlab.ops.triton.aot import SM_LIMITS, SMS, compile_only

    if "fla" in sys.modules:
        raise RuntimeError("fla was imported before import_fla_as_on could set up the GPU")
    name = {90: "NVIDIA H100 80GB HBM3"}[arch]
    capability = (arch // 10, arch % 10)
    props = types.SimpleNamespace(
        name=name, major=capability[0], minor=capability[1], multi_processor_count=SMS[arch],
        shared_memory_per_block_optin=SM_LIMITS[arch]["smem_block"],
        shared_memory_per_block=48 * 1024, total_memory=80 * 2**30,
    )  # fmt: skip
    torch.cuda.get_device_name = lambda *a, **k: name
    torch.cuda.get_device_capability = lambda *a, **k: capability
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.device_count = lambda: 1
    with compile_only(arch):
        import fla.ops
    return fla.ops


def compile_fla(args) -> tuple[list[dict], list[dict]]:
    """fla's training call (forward and backward) per family it has: every autotune config
    compiles, as its first call on a GPU does before it can time them. An exception fla raises
    (it refuses some calls on some GPUs) is recorded with the kernels compiled before it."""
    from seqlab.ops.triton.aot import compile_only, inputs

    ops = import_fla_as_on(args.arch)
    B, T = args.shape
    rows, errors = [], []
    for K, V in args.head_dims:
        for family in [f for f in args.families if f in FLA_OPS]:
            with tempfile.TemporaryDirectory() as cache, compile_only(args.arch, cache) as log:
                log.call = "training"
                # as benchmarks/bench_triton_gpu.py gives them: gates and β float32
                x = inputs(family, B, T, args.heads, K, V, DTYPES[args.dtype], grad=True,
                           beta_dtype=torch.float32)  # fmt: skip
                where = "forward"
                try:
                    o = getattr(ops, FLA_OPS[family])(**x)[0]
                    where = "backward"
                    o.float().sum().backward()
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    errors.append({"family": family, "K": K, "V": V, "pass": where, "error": error})
            for k in log.kernels:
                rows.append({"impl": "fla", "family": family, "K": K, "V": V} | k.as_dict())
            print(f"K={K} V={V} fla {family}: {len(log.kernels)} kernels", file=sys.stderr)
    return rows, errors


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["K"], r["V"], r["family"], r["impl"]) for r in rows):
        rs = [r for r in rows if (r["K"], r["V"], r["family"], r["impl"]) == key]
        slowest = max(rs, key=lambda r: r["compile_s"])
        out.append(
            {
                "K": key[0],
                "V": key[1],
                "family": key[2],
                "impl": key[3],
                "kernels": len(rs),
                "training_compile_s": sum(r["compile_s"] for r in rs if r["call"] == "training"),
                "all_compile_s": sum(r["compile_s"] for r in rs),
                "slowest": slowest["name"],
                "slowest_s": slowest["compile_s"],
                "max_registers": max(r["registers"] for r in rs),
                "spill": max(r["spill"] for r in rs),
                "max_shared": max(r["shared"] for r in rs),
                "min_blocks_per_sm": min(r["blocks_per_sm"] for r in rs),
            }
        )
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# Triton kernels compiled for sm_{data['arch']} ({data['dtype']}, H = {data['heads']}, "
        f"chunk {data['chunk_size']})",
        "",
        f"{data['date']}, compiled on {m['cpu']} ({m['cores']} cores) with triton "
        f"{m['triton']}, torch {m['torch']}, Python {m['python']}; nothing ran on a GPU. "
        f"Command: `{data['command']}`",
        "",
        "Compile times are cold (a fresh Triton cache per family and head dims). Blocks/SM is "
        "the CUDA occupancy rule applied to registers (allocated per warp in 256s), shared "
        "memory (+1 KiB per block) and warps; `limited by` names the binding one.",
        "",
        "## Per family",
        "",
        "| K×V | family | impl | kernels | training first call, compile s | all calls, s | "
        "slowest kernel (s) | max regs | spill B | max shared KiB | min blocks/SM |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        lines.append(
            f"| {s['K']}×{s['V']} | {s['family']} | {s['impl']} | {s['kernels']} | "
            f"{s['training_compile_s']:.1f} | {s['all_compile_s']:.1f} | {s['slowest']} "
            f"({s['slowest_s']:.2f}) | {s['max_registers']} | {s['spill']} | "
            f"{s['max_shared'] / 1024:.1f} | {s['min_blocks_per_sm']} |"
        )
    lines += [
        "",
        "## Every kernel",
        "",
        "| K×V | family | call | kernel | constants | pointers | warps | stages | shared KiB | "
        "regs | spill B | mma | blocks/SM | limited by | compile s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in (r for r in data["kernels"] if r["impl"] == "seqlab"):
        shown = " ".join(f"{k}={r['constants'][k]}" for k in SHOWN if k in r["constants"])
        lines.append(
            f"| {r['K']}×{r['V']} | {r['family']} | {r['call']} | {r['name']} | {shown} | "
            f"{r['dtypes']} | {r['num_warps']} | {r['num_stages']} | {r['shared'] / 1024:.1f} | "
            f"{r['registers']} | {r['spill']} | {r['mma']} | {r['blocks_per_sm']} | "
            f"{r['limited_by']} | {r['compile_s']:.2f} |"
        )
    if fla := [r for r in data["kernels"] if r["impl"] == "fla"]:
        lines += [
            "",
            "## fla's kernels",
            "",
            "Its training call (forward and backward) compiles every config its autotuner lists "
            "for the GPU (fla imported as on an H100); on a GPU it then times them all, which "
            "this leaves out. Per kernel: the configs (variants), their compile time in all, "
            "and the range of registers, shared memory and resident blocks per SM.",
            "",
            "| K×V | family | kernel | variants | compile s | regs | shared KiB | blocks/SM | "
            "spills |",
            "|---|---|---|---:|---:|---|---|---|---:|",
        ]
        for key in dict.fromkeys((r["K"], r["V"], r["family"], r["name"]) for r in fla):
            rs = [r for r in fla if (r["K"], r["V"], r["family"], r["name"]) == key]

            def span(field, scale=1, rs=rs):
                lo, hi = min(r[field] for r in rs) / scale, max(r[field] for r in rs) / scale
                return f"{lo:.0f}" if lo == hi else f"{lo:.0f}–{hi:.0f}"

            lines.append(
                f"| {key[0]}×{key[1]} | {key[2]} | {key[3]} | {len(rs)} | "
                f"{sum(r['compile_s'] for r in rs):.1f} | {span('registers')} | "
                f"{span('shared', 1024)} | {span('blocks_per_sm')} | "
                f"{sum(r['spill'] > 0 for r in rs)} |"
            )
    if data.get("fla_errors"):
        lines += ["", "fla raised (its kernels compiled up to there are listed above):", ""]
        lines += [
            f"- {e['family']} K×V {e['K']}×{e['V']}, {e['pass']}: {e['error']}"
            for e in data["fla_errors"]
        ]
    if data["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in data["problems"]]
    return "\n".join(lines) + "\n"


def problems(rows: list[dict], fail_on_spill: bool) -> tuple[list[str], bool]:
    found, fatal = [], False
    for r in rows:
        where = f"{r['name']} ({r['family']}, {r['call']}, K={r['K']} V={r['V']})"
        if r["blocks_per_sm"] == 0:
            found.append(f"{where} needs {r['shared']} B of shared memory: it cannot launch")
            fatal = True
        if r["mma_transposes"]:
            found.append(
                f"{where} transposes a tl.dot result in its accumulator layout "
                f"({r['mma_transposes']}x): Triton 3.4-3.7.0 miscompiles that on Hopper"
            )
            fatal = True
        if r["spill"]:
            found.append(f"{where} spills {r['spill']} B per thread to local memory")
            fatal = fatal or fail_on_spill
    return found, fatal


def main(argv=None) -> int:
    import os

    import triton

    from seqlab.files import write_text_atomic

    args = parse_args(argv)
    start = time.perf_counter()
    rows = compile_all(args)
    found, fatal = problems(rows, args.fail_on_spill)
    fla_errors = []
    if args.fla:
        fla_rows, fla_errors = compile_fla(args)
        rows += fla_rows
    data = {
        "arch": args.arch,
        "dtype": args.dtype,
        "heads": args.heads,
        "chunk_size": args.chunk_size,
        "shape": list(args.shape),
        "date": date.today().isoformat(),
        "command": "python benchmarks/compile_triton.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "seconds": time.perf_counter() - start,
        "summary": summary(rows),
        "kernels": rows,
        "problems": found,
        "fla_errors": fla_errors,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "compile.json", json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    write_text_atomic(args.out / "compile.md", text)
    print(text)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
