"""LASP-2 sequence parallelism on CPU with gloo: bytes each rank sends against T, and the time
of a forward + backward split into compute and communication.

    PYTHONPATH=. python benchmarks/bench_lasp2.py [--world-sizes 1 2 4]
        [--lengths 2048 4096 8192 16384 32768] [--ops gla_head gla_channel gdn]
        [--batch 1] [--heads 4] [--dim 64] [--chunk-size 64] [--repeats 3]
        [--out benchmarks/results/cpu-<date>/lasp2]

T is the whole sequence; each of the N ranks (one process of one thread each) holds T / N
tokens and runs the LASP-2 op on them (seqlab.parallel.lasp2); N = 1 runs the plain chunk op on
all T tokens. Per step, forward and o.sum().backward(): the wall time of the slowest rank, the
seconds that rank spent inside its collectives (the all-gather forward, the all-to-all
backward, each waiting for the slowest rank included), the rest as compute, and the bytes each
rank put on the wire, counted from the tensors sent (they depend on B, H, K, V and N, not on T).
Medians over --repeats steps after one warm-up; ranks start each step together (a barrier).
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist

from seqlab.files import write_text_atomic
from seqlab.ops.delta_rule import delta_rule
from seqlab.ops.gated_linear import gated_linear
from seqlab.parallel import CommLog, lasp2_delta_rule, lasp2_gated_linear, run_group
from seqlab.profile.bench import describe_machine

# name: (plain op, LASP-2 op, gate shape: "head" or "channel", delta rule)
OPS = {
    "gla_head": (gated_linear, lasp2_gated_linear, "head", False),
    "gla_channel": (gated_linear, lasp2_gated_linear, "channel", False),
    "gdn": (delta_rule, lasp2_delta_rule, "head", True),
}


def make_inputs(op: str, B: int, T: int, H: int, D: int, seed: int) -> list[torch.Tensor]:
    """q, unit k, v, (β,) and log-decays logsigmoid(z) [B, T, H] or [B, T, H, D], float32."""
    _, _, gate, delta = OPS[op]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g_shape = (B, T, H) if gate == "head" else (B, T, H, D)
    g = torch.nn.functional.logsigmoid(torch.randn(*g_shape, generator=gen))
    if delta:
        return [q, k, v, torch.rand(B, T, H, generator=gen), g]
    return [q, k, v, g]


def _worker(rank: int, N: int, args: dict) -> list[dict]:
    """This rank's median step time, communication time and bytes, per (op, T)."""
    rows = []
    for op in args["ops"]:
        plain, lasp2, _, _ = OPS[op]
        for T in args["lengths"]:
            if T % N:
                continue
            x = make_inputs(op, args["batch"], T // N, args["heads"], args["dim"], seed=rank)
            log = CommLog()

            def step(x=x, log=log, plain=plain, lasp2=lasp2):
                leaves = [t.clone().requires_grad_() for t in x]
                if N == 1:
                    o, _ = plain(*leaves, chunk_size=args["chunk_size"])
                else:
                    o, _ = lasp2(*leaves, chunk_size=args["chunk_size"], log=log)
                o.sum().backward()

            times, comm, nbytes = [], [], []
            for i in range(args["repeats"] + 1):
                if N > 1:
                    dist.barrier()
                log.clear()
                t0 = time.perf_counter()
                step()
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
                    comm.append(log.seconds)
                    nbytes.append(log.bytes)
            rows.append(
                {
                    "op": op,
                    "N": N,
                    "T": T,
                    "T_rank": T // N,
                    "step_s": statistics.median(times),
                    "comm_s": statistics.median(comm),
                    "bytes_per_rank": nbytes[0],
                    "collectives": [r[0] for r in log.rows],
                }
            )
    return rows


def _single(args: dict) -> list[dict]:
    """N = 1: the plain op in this process, on one thread like each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _worker(0, 1, args)
    finally:
        torch.set_num_threads(threads)


def table(rows: list[dict]) -> str:
    lines = [
        "| op | N | T | T / rank | step (ms) | comm (ms) | compute (ms) | comm share "
        "| bytes sent / rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compute = r["step_s"] - r["comm_s"]
        share = r["comm_s"] / r["step_s"] if r["step_s"] else 0.0
        lines.append(
            f"| {r['op']} | {r['N']} | {r['T']} | {r['T_rank']} | {1e3 * r['step_s']:.1f} "
            f"| {1e3 * r['comm_s']:.1f} | {1e3 * compute:.1f} | {share:.0%} "
            f"| {r['bytes_per_rank']:,} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="K = V per head")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per world size")
    p.add_argument("--out", type=Path, default=None, help="writes <out>.md and <out>.json")
    a = p.parse_args(argv)
    args = {k: getattr(a, k) for k in ("ops", "lengths", "batch", "heads", "dim", "chunk_size")} | {
        "repeats": a.repeats
    }
    rows = []
    for N in a.world_sizes:
        ranks = [_single(args)] if N == 1 else run_group(_worker, N, args, timeout=a.timeout)
        for per_rank in zip(*ranks, strict=True):  # the slowest rank's step, its comm time
            slowest = max(per_rank, key=lambda r: r["step_s"])
            assert len({r["bytes_per_rank"] for r in per_rank}) == 1
            rows.append(slowest)
            print(table([slowest]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (r["op"], r["N"], r["T"]))
    header = (
        f"LASP-2 on CPU with gloo: B = {a.batch}, H = {a.heads}, K = V = {a.dim}, chunk "
        f"{a.chunk_size}, float32, one thread per rank, forward + backward; medians of "
        f"{a.repeats} steps (ms). torch {torch.__version__}, "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}."
    )
    text = f"{header}\n\n{table(rows)}\n"
    print("\n" + text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.out.with_suffix(".md"), text)
        result = {"config": args, "machine": describe_machine(torch.device("cpu")), "rows": rows}
        write_text_atomic(a.out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
