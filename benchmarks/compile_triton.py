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

Output: compile.json and compile.md in --out (written atomically at the end), the markdown
printed too. Exit status 1 if a kernel cannot launch on the target (its shared memory is over
the per-block limit) or, with --fail-on-spill, spills registers to local memory.
"""

from __future__ import annotations

import argparse
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
                rows.append({"family": family, "K": K, "V": V} | k.as_dict())
            print(f"K={K} V={V} {family}: {len(log.kernels)} kernels", file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["K"], r["V"], r["family"]) for r in rows):
        rs = [r for r in rows if (r["K"], r["V"], r["family"]) == key]
        out.append(
            {
                "K": key[0],
                "V": key[1],
                "family": key[2],
                "kernels": len(rs),
                "training_compile_s": sum(r["compile_s"] for r in rs if r["call"] == "training"),
                "all_compile_s": sum(r["compile_s"] for r in rs),
                "slowest": max(rs, key=lambda r: r["compile_s"])["name"],
                "slowest_s": max(r["compile_s"] for r in rs),
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
        "| K×V | family | kernels | training first call, compile s | all calls, s | slowest "
        "kernel (s) | max regs | spill B | max shared KiB | min blocks/SM |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        lines.append(
            f"| {s['K']}×{s['V']} | {s['family']} | {s['kernels']} | "
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
    for r in data["kernels"]:
        shown = " ".join(f"{k}={r['constants'][k]}" for k in SHOWN if k in r["constants"])
        lines.append(
            f"| {r['K']}×{r['V']} | {r['family']} | {r['call']} | {r['name']} | {shown} | "
            f"{r['dtypes']} | {r['num_warps']} | {r['num_stages']} | {r['shared'] / 1024:.1f} | "
            f"{r['registers']} | {r['spill']} | {r['mma']} | {r['blocks_per_sm']} | "
            f"{r['limited_by']} | {r['compile_s']:.2f} |"
        )
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
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "compile.json", json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    write_text_atomic(args.out / "compile.md", text)
    print(text)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
