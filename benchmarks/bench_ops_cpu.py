"""Time the forms of each recurrence op against each other on the CPU, in one run.

    .venv/bin/python benchmarks/bench_ops_cpu.py                  # T in 512, 2048, 8192
    .venv/bin/python benchmarks/bench_ops_cpu.py --seq-lens 512 --repeats 5 --out results.md

Forward (no grad) and forward+backward, float32, B = 1, H = 4, K = V = 64, chunk 64. Each entry is
the median of `--repeats` timed calls after one warm-up call; the ratios compare forms measured in
this one process. A form is skipped (and says so) when its estimated working set exceeds
`--max-gb`: the parallel form materialises [T, T] (per-channel gates: [T, T, K]) tensors.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F

from seqlab.ops import delta_rule, gated_linear

B, H, K, V, CHUNK = 1, 4, 64, 64, 64
FORMS = ("chunk", "recurrent", "parallel")


def make_case(name: str, T: int, gen: torch.Generator) -> tuple[Callable, dict[str, torch.Tensor]]:
    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if name == "gla_scalar":
        inputs = dict(q=q, k=k, v=v, g=F.logsigmoid(rand(B, T, H) + 3))
        return gated_linear, inputs
    if name == "gla_channel":
        inputs = dict(q=q, k=k, v=v, g=F.logsigmoid(rand(B, T, H, K) + 3) / 16)
        return gated_linear, inputs
    if name == "gated_delta":
        inputs = dict(
            q=q,
            k=F.normalize(k, dim=-1),
            v=v,
            beta=torch.sigmoid(rand(B, T, H)),
            g=F.logsigmoid(rand(B, T, H) + 3),
        )
        return delta_rule, inputs
    raise ValueError(name)


def working_set_gb(name: str, form: str, T: int) -> float:
    """A rough upper estimate of the largest live tensors, for skipping what cannot fit."""
    if form != "parallel":
        return 0.0
    per_tt = B * H * T * T * 4 / 2**30
    return per_tt * (4 * K if name == "gla_channel" else 12)


def timed(fn: Callable[[], None], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_one(op, inputs, form: str, backward: bool, repeats: int) -> list[float]:
    leaves = {n: x.clone().requires_grad_(backward) for n, x in inputs.items()}
    kwargs = dict(form=form, output_final_state=True)
    if form == "chunk":
        kwargs["chunk_size"] = CHUNK

    def step():
        if backward:
            o, s = op(**leaves, **kwargs)
            (o.sum() + s.sum()).backward()
            for x in leaves.values():
                x.grad = None
        else:
            with torch.no_grad():
                op(**leaves, **kwargs)

    return timed(step, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="512,2048,8192")
    p.add_argument("--cases", default="gla_scalar,gla_channel,gated_delta")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gb", type=float, default=6.0)
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    gen = torch.Generator().manual_seed(0)

    header = (
        f"seqlab ops, CPU, float32, B={B} H={H} K={K} V={V} chunk={CHUNK}, "
        f"median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}"
    )
    lines = [
        header,
        "",
        "| op | T | pass | chunk ms | recurrent ms | parallel ms | recurrent/chunk "
        "| parallel/chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.cases.split(","):
        for T in seq_lens:
            op, inputs = make_case(name, T, gen)
            for backward in (False, True):
                ms = {}
                for form in FORMS:
                    gb = working_set_gb(name, form, T) * (3 if backward else 1)
                    if gb > args.max_gb:
                        ms[form] = None
                        continue
                    ms[form] = 1e3 * statistics.median(
                        run_one(op, inputs, form, backward, args.repeats)
                    )

                cells = ["skipped (memory)" if t is None else f"{t:.1f}" for t in ms.values()]
                ratios = [
                    "–" if ms[f] is None else f"{ms[f] / ms['chunk']:.1f}×"
                    for f in ("recurrent", "parallel")
                ]
                kind = "fwd+bwd" if backward else "fwd"
                row = f"| {name} | {T} | {kind} | " + " | ".join(cells + ratios) + " |"
                lines.append(row)
                print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
