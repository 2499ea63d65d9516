"""Time the forms of each recurrence op against each other on the CPU, in one run.

    .venv/bin/python benchmarks/bench_ops_cpu.py                  # T in 512, 2048, 8192
    .venv/bin/python benchmarks/bench_ops_cpu.py --seq-lens 512 --repeats 5 --out results.md

    .venv/bin/python benchmarks/bench_ops_cpu.py --gates logsigmoid,strong --gate-sweep

Forward (no grad) and forward+backward, float32, B = 1, H = 4, K = V = 64, chunk 64. Each entry is
the median of `--repeats` timed calls after one warm-up call; the ratios compare forms measured in
this one process. A form is skipped (and says so) when its estimated working set exceeds
`--max-gb`: the parallel form materialises [T, T] (per-channel gates: [T, T, K]) tensors.

Gates (`--gates`, one table row per setting; log-space, per step): `mild` logsigmoid(z + 3)
(median −0.05; per-channel gates / 16), the only setting before 2026-12-04; `logsigmoid`
logsigmoid(z) (median −0.69, what an untrained sigmoid gate gives); `strong` logsigmoid(z − 3)
(median −3.05: Mamba-2 heads with large A·dt, fast-forgetting channels); z standard normal.
`--gate-sweep` then times the chunk forms alone at constant log-decays 0, −1, −3, −5, −10, −20
per step, all in turns, and prints each time over the time at log-decay 0 (a chunk form's speed
must not depend on the gate values).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F

from seqlab.ops.registry import OpFamily, family
from seqlab.profile.measure import interleaved_times

B, H, K, V, CHUNK = 1, 4, 64, 64, 64
FORMS = ("chunk", "recurrent", "parallel")
# --cases name → (op family, variant) in seqlab.ops.registry; the inputs stay this script's own
# (its gate settings), so the committed tables stay reproducible
CASES = {
    "gla_scalar": ("gated_linear", "head"),
    "gla_channel": ("gated_linear", "channel"),
    "gated_delta": ("delta_rule", "gated"),
}


GATES = ("mild", "logsigmoid", "strong")
SWEEP = (0.0, -1.0, -3.0, -5.0, -10.0, -20.0)


def make_gate(gates: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Log-space gates as named (module docstring), or a constant log-decay given as a number."""
    z = torch.randn(*shape, generator=gen)
    if gates == "mild":
        return F.logsigmoid(z + 3) / (16 if len(shape) == 4 else 1)
    if gates == "logsigmoid":
        return F.logsigmoid(z)
    if gates == "strong":
        return F.logsigmoid(z - 3)
    return torch.full(shape, float(gates))


def make_case(
    name: str, T: int, gen: torch.Generator, gates: str = "mild"
) -> tuple[OpFamily, dict[str, torch.Tensor]]:
    """The case's op family and inputs: q, k, v standard normal, gates as named; the delta rule
    gets unit keys and β = sigmoid(z)."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; valid: {', '.join(CASES)}")
    fam_name, variant = CASES[name]

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if fam_name == "gated_linear":
        shape = (B, T, H, K) if variant == "channel" else (B, T, H)
        return family(fam_name), dict(q=q, k=k, v=v, g=make_gate(gates, shape, gen))
    inputs = dict(q=q, k=F.normalize(k, dim=-1), v=v, beta=torch.sigmoid(rand(B, T, H)))
    inputs["g"] = make_gate(gates, (B, T, H), gen)
    return family(fam_name), inputs


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


def stepper(fam: OpFamily, inputs, form: str, backward: bool) -> Callable[[], None]:
    leaves = {n: x.clone().requires_grad_(backward) for n, x in inputs.items()}
    op = fam.forms[form]
    kwargs = dict(output_final_state=True)
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

    return step


def run_one(fam: OpFamily, inputs, form: str, backward: bool, repeats: int) -> list[float]:
    return timed(stepper(fam, inputs, form, backward), repeats)


def gate_sweep(cases: list[str], seq_lens: list[int], repeats: int) -> list[str]:
    """Chunk-form time at each constant log-decay of SWEEP over the time at the first (0): one
    warm-up call each, then the settings take turns call by call in an order shuffled each round,
    so load falls on all alike."""
    head = " | ".join(f"g={d:g}" for d in SWEEP)
    lines = [
        "",
        f"Chunk form at constant per-step log-decay g, median of {repeats} calls taken in turns; "
        "ms, then the time over the time at g=0.",
        "",
        f"| op | T | pass | {head} | max ratio |",
        "|---|---|---|" + "---|" * (len(SWEEP) + 1),
    ]
    for name in cases:
        for T in seq_lens:
            for backward in (False, True):
                steps = {}
                for d in SWEEP:
                    op, inputs = make_case(name, T, torch.Generator().manual_seed(0), str(d))
                    steps[d] = stepper(op, inputs, "chunk", backward)
                for step in steps.values():
                    step()
                times = interleaved_times(steps, repeats)
                ms = [1e3 * statistics.median(times[d]) for d in SWEEP]
                cells = [f"{m:.1f} ({m / ms[0]:.2f}×)" for m in ms]
                kind = "fwd+bwd" if backward else "fwd"
                top = max(m / ms[0] for m in ms)
                row = f"| {name} | {T} | {kind} | " + " | ".join(cells) + f" | {top:.2f}× |"
                lines.append(row)
                print(row, flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="512,2048,8192")
    p.add_argument("--cases", default="gla_scalar,gla_channel,gated_delta")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gb", type=float, default=6.0)
    p.add_argument(
        "--gates",
        default="logsigmoid,strong",
        help=f"comma-separated gate settings of {', '.join(GATES)} (default: logsigmoid,strong)",
    )
    p.add_argument(
        "--gate-sweep",
        action="store_true",
        help="also time the chunk forms at constant log-decays 0 to −20",
    )
    p.add_argument("--forms", default=",".join(FORMS), help="forms to time (chunk first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    cases = args.cases.split(",")
    forms = args.forms.split(",")
    if forms[0] != "chunk" or not set(forms) <= set(FORMS):
        p.error(f"--forms: chunk first, then any of {', '.join(FORMS[1:])}")
    gen = torch.Generator().manual_seed(0)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"seqlab ops, CPU, float32, B={B} H={H} K={K} V={V} chunk={CHUNK}, "
        f"median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}, "
        f"load avg {load}"
    )
    others = [f for f in forms if f != "chunk"]
    lines = [
        header,
        "",
        "| op | gates | T | pass | "
        + " | ".join(f"{f} ms" for f in forms)
        + "".join(f" | {f}/chunk" for f in others)
        + " |",
        "|---|---|---|---|" + "---|" * (len(forms) + len(others)),
    ]
    print("\n".join(lines), flush=True)
    for name in cases:
        for gates, T in ((gates, T) for gates in args.gates.split(",") for T in seq_lens):
            op, inputs = make_case(name, T, gen, gates)
            for backward in (False, True):
                ms = {}
                for form in forms:
                    gb = working_set_gb(name, form, T) * (3 if backward else 1)
                    if gb > args.max_gb:
                        ms[form] = None
                        continue
                    ms[form] = 1e3 * statistics.median(
                        run_one(op, inputs, form, backward, args.repeats)
                    )

                cells = ["skipped (memory)" if t is None else f"{t:.1f}" for t in ms.values()]
                ratios = ["–" if ms[f] is None else f"{ms[f] / ms['chunk']:.1f}×" for f in others]
                kind = "fwd+bwd" if backward else "fwd"
                row = f"| {name} | {gates} | {T} | {kind} | " + " | ".join(cells + ratios) + " |"
                lines.append(row)
                print(row, flush=True)
    if args.gate_sweep:
        lines += gate_sweep(cases, seq_lens, args.repeats)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += ["", f"load avg at the end: {load}"]
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
