"""A/B the CPU chunk ops of two git revisions: alternating fresh processes, same inputs.

    .venv/bin/python benchmarks/ab_cpu_ops.py cac7fb2 HEAD --seq-len 2048 --rounds 3
    .venv/bin/python benchmarks/ab_cpu_ops.py 6b3d6c4 HEAD --gates mild,logsigmoid,strong,-20

Each revision's `seqlab/` is exported with `git archive` into a temporary directory; every
(case, mode, round) runs once per revision in its own process, the revisions alternating, so
slow drifts in machine load and allocator state fall on both. A process times `--calls` calls
after two warm-up calls and reports the median; the table shows the median over rounds and B / A.
Shapes as benchmarks/bench_cpu_peers.py: float32, B = 1, H = 4, K = V = 64, chunk 64. Gates
(`--gates`, one row each, log-space per step, z standard normal): `mild` logsigmoid(z + 3)
(per-channel / 16; the only setting before 2026-12-04), `logsigmoid` logsigmoid(z), `strong`
logsigmoid(z − 3), or a number: that constant log-decay. The ungated `delta` case runs once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = ("gated_delta", "delta", "gla_scalar", "gla_channel")

CHILD = """
import statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from seqlab.ops.delta_rule import chunk_delta_rule
from seqlab.ops.gated_linear import chunk_gated_linear

case, mode, T, calls = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
gates = sys.argv[6] if len(sys.argv) > 6 else "mild"
gen = torch.Generator().manual_seed(0)
B, H, K = 1, 4, 64
q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
k = F.normalize(k, dim=-1)
beta = torch.rand(B, T, H, generator=gen)
z = torch.randn(B, T, H, generator=gen)
if case == "gla_channel":
    z = torch.randn(B, T, H, K, generator=gen)
if gates == "mild":
    g = F.logsigmoid(z + 3) / (16 if case == "gla_channel" else 1)
elif gates == "logsigmoid":
    g = F.logsigmoid(z)
elif gates == "strong":
    g = F.logsigmoid(z - 3)
else:
    g = torch.full_like(z, float(gates))
grad = mode == "fwd+bwd"
q, k, v = (x.requires_grad_(grad) for x in (q, k, v))


def op():
    if case in ("gated_delta", "delta"):
        gate = g if case == "gated_delta" else None
        return chunk_delta_rule(q, k, v, beta, gate, output_final_state=True, chunk_size=64)
    return chunk_gated_linear(q, k, v, g, output_final_state=True, chunk_size=64)


def step():
    if grad:
        o, s = op()
        (o.sum() + s.sum()).backward()
        for x in (q, k, v):
            x.grad = None
    else:
        with torch.no_grad():
            op()


for _ in range(2):
    step()
times = []
for _ in range(calls):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(1e3 * statistics.median(times))
"""


def export(rev: str, root: Path) -> Path:
    """`seqlab/` of `rev` under root/rev (git archive, so uncommitted changes are not included)."""
    out = root / rev.replace("/", "_")
    out.mkdir()
    archive = subprocess.run(
        ["git", "archive", rev, "seqlab"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev_a")
    p.add_argument("rev_b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--gates", default="mild", help="mild, logsigmoid, strong or a log-decay")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {rev: export(rev, Path(tmp)) for rev in (args.rev_a, args.rev_b)}
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"T = {args.seq_len}, median ms over {args.rounds} rounds of {args.calls} calls")
        print(f"load avg at the start {load}")
        print(f"| case | gates | mode | {args.rev_a} | {args.rev_b} | B / A |")
        print("|---|---|---|---|---|---|")
        gates = args.gates.split(",")
        for case, gate in ((c, gt) for c in args.cases.split(",") for gt in gates):
            if case == "delta" and gate != gates[0]:
                continue
            for mode in ("fwd", "fwd+bwd"):
                ms: dict[str, list[float]] = {rev: [] for rev in dirs}
                for _ in range(args.rounds):
                    for rev, d in dirs.items():
                        cmd = [sys.executable, "-c", CHILD, str(d), case, mode]
                        cmd += [str(args.seq_len), str(args.calls), gate]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                        ms[rev].append(float(out.stdout.split()[-1]))
                a, b = (statistics.median(ms[rev]) for rev in dirs)
                gate_cell = "none" if case == "delta" else gate
                row = f"| {case} | {gate_cell} | {mode} | {a:.1f} | {b:.1f} | {b / a:.2f} |"
                print(row, flush=True)
        print(f"load avg at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
