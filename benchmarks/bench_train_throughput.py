"""Training throughput of `seqlab train` (issue 19, item 5): tokens/s of a hybrid model, fp32
against bf16 autocast, eager against torch.compile, one process against two data-parallel processes.

    .venv/bin/python benchmarks/bench_train_throughput.py \
        --out benchmarks/results/cpu-2026-12-06/train-throughput.md
    # on a GPU machine: the same script, --device cuda (and --procs 1,N for N GPUs)

Every case is a fresh `seqlab train` process (the command a user runs; two processes through
`torchrun --nproc-per-node 2 ... --distributed ddp`) on the real-text task (Shakespeare, bytes)
with the same model, global batch and seed, writing its run folder into a temporary directory.
Throughput comes from the run's `curves.json`: tokens trained between the evaluation at
`--warmup` steps and the last one, over the training-step time between them (`train_time_s`:
steps only, no evaluation, no checkpoint writing), so compilation and the first steps' warm-up
are left out. On a CPU the processes share its cores: one process takes all threads, each of N
processes takes threads / N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import torch

from seqlab.files import write_atomic
from seqlab.profile.bench import cpu_name


class Case(NamedTuple):
    precision: str  # fp32 | bf16
    compile: bool
    procs: int

    @property
    def name(self) -> str:
        mode = "compile" if self.compile else "eager"
        return f"{self.precision} · {mode} · {self.procs} proc"


def cases(precisions: list[str], modes: list[str], procs: list[int]) -> list[Case]:
    """Every precision × mode in one process; the other process counts in fp32 eager."""
    out = [Case(p, m == "compile", 1) for p in precisions for m in modes]
    out += [Case("fp32", False, n) for n in procs if n > 1]
    return out


def command(case: Case, args: argparse.Namespace, out: Path) -> list[str]:
    threads = max(1, args.threads // case.procs)
    train = [
        "train",
        "--task",
        "text",
        "--task-option",
        f"seq_len={args.seq_len}",
        "--arch",
        args.arch,
        "--d-model",
        str(args.d_model),
        "--n-layers",
        str(args.n_layers),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--eval-every",
        str(args.warmup),
        "--seed",
        "0",
        "--device",
        args.device,
        "--threads",
        str(threads),
        "--precision",
        case.precision,
        "--out",
        str(out),
        "--results",
        str(out.parent / f"{out.name}.db"),
        "--no-progress",
        # evaluations are left out of the timing, but the text task's default (50 batches of
        # 256 rows) would take a minute each on a CPU: a small one keeps the run short
        "--set",
        "train.eval_batches=2",
        "--set",
        f"train.eval_batch_size={args.batch_size}",
    ]
    if case.compile:
        train.append("--compile")
    if case.procs == 1:
        return [sys.executable, "-m", "seqlab.cli", *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={case.procs}", "-m", "seqlab.cli", *train] + [
        "--distributed",
        "ddp",
    ]


def throughput(run: Path, warmup: int) -> dict:
    """tokens/s between the evaluation at `warmup` steps and the last one, from curves.json."""
    points = json.loads((run / "curves.json").read_text())["evaluations"]
    first = next(p for p in points if p["step"] >= warmup)
    last = points[-1]
    if last["step"] <= first["step"]:
        raise ValueError(f"{run}: no evaluation after step {first['step']}; raise --steps")
    tokens = last["tokens"] - first["tokens"]
    seconds = last["train_time_s"] - first["train_time_s"]
    return {
        "steps": last["step"] - first["step"],
        "tokens": tokens,
        "train_s": seconds,
        "tokens_per_s": tokens / seconds,
        "first_steps_s": first["train_time_s"],
        "final_loss": last["train_loss"],
    }


def run_case(case: Case, args: argparse.Namespace, root: Path) -> dict:
    out = root / case.name.replace(" · ", "-").replace(" ", "")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // case.procs)))
    t0 = time.monotonic()
    done = subprocess.run(command(case, args, out), env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"case": case.name, "failed": " / ".join(tail), "process_s": wall}
    return {"case": case.name, "process_s": wall, **throughput(out, args.warmup)}


def machine(device: str) -> str:
    cpu = cpu_name()
    if device.startswith("cuda") and torch.cuda.is_available():
        cpu += f"; {torch.cuda.get_device_name()}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average before {load}"
    )


def markdown(rows: list[dict], args: argparse.Namespace, header: str) -> str:
    base = next((r for r in rows if "tokens_per_s" in r), None)
    lines = [
        header,
        "",
        "| case | tokens/s | vs first | steps timed | step ms | first steps s | process s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['case']} | failed: {r['failed']} | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        step_ms = 1e3 * r["train_s"] / r["steps"]
        lines.append(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['steps']} | "
            f"{step_ms:.0f} | {r['first_steps_s']:.1f} | {r['process_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gdn*3,attn", help="the hybrid pattern")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="the global batch")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--procs", default="1,2", help="process counts (>1: torchrun, DDP)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in all processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.steps < 2 * args.warmup or args.steps % args.warmup:
        p.error(f"--steps ({args.steps}) must be a multiple of --warmup ({args.warmup}), ≥ 2×")
    todo = cases(
        args.precisions.split(","),
        args.modes.split(","),
        [int(n) for n in args.procs.split(",")],
    )
    header_machine = machine(args.device)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="seqlab-throughput-"))
    try:
        for case in todo:
            rows.append(run_case(case, args, root))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = (
        f"# `seqlab train` throughput\n\n{header_machine}\n\n"
        f"`{args.arch}`, d_model {args.d_model}, {args.n_layers} layers, real text (bytes) at "
        f"T = {args.seq_len}, global batch {args.batch_size}, {args.steps} steps of which the "
        f"first {args.warmup} are warm-up; {args.threads} threads in all; device {args.device}. "
        "tokens/s over the timed steps' own time (curves.json `train_time_s`). Command: "
        f"`python benchmarks/bench_train_throughput.py {' '.join(argv or sys.argv[1:])}`"
    )
    text = markdown(rows, args, header)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, lambda tmp: Path(tmp).write_text(text))
        data = json.dumps({"header": header, "rows": rows}, indent=1)
        json_out = args.out.with_suffix(".json")
        write_atomic(json_out, lambda tmp: Path(tmp).write_text(data))
    print(text)


if __name__ == "__main__":
    main()
