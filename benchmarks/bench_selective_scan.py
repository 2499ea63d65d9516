"""The selective scan (Mamba-1's S6) on CPU: the scan form against the recurrent form, the chunk
form and mamba-ssm's pure-PyTorch selective_scan_ref (where installed), in one process.

    PYTHONPATH=. python benchmarks/bench_selective_scan.py [--batch 2] [--channels 256 512]
        [--repeats 3] [--out benchmarks/results/cpu-2026-12-05/selective-scan.md]

Times forward (no grad) and forward + backward (y.sum()) at T = 2048, N = 16, float32, for two
gate regimes: the paper's init (A = −(1..N), Δ = softplus with dt in [1e-3, 1e-1]) and strong
decays (dt log-uniform in [0.1, 1.25], so Δ·|A| per step up to 20). Repeats alternate between
the forms; the table holds medians and writes to --out as markdown.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from seqlab.ops.registry import family

FORMS = ("recurrent", "chunk", "scan")


def inputs(fam, B, T, D, N, strong):
    gen = torch.Generator().manual_seed(0)
    x = fam.make_inputs("default", B, T, 1, generator=gen, D=D, N=N)
    if strong:  # softplus⁻¹ of dt log-uniform in [0.1, 1.25]
        lo, hi = math.log(0.1), math.log(1.25)
        dt = (torch.rand(D, generator=gen, dtype=torch.float64) * (hi - lo) + lo).exp()
        x["delta_bias"] = (dt + torch.log(-torch.expm1(-dt))).float()
    return x


def call(fn, x, backward):
    def run():
        if not backward:
            with torch.no_grad():
                fn(**x)
            return
        leaves = {k: v.detach().requires_grad_() if torch.is_tensor(v) else v for k, v in x.items()}
        y = fn(**leaves)
        (y[0] if isinstance(y, tuple) else y).sum().backward()

    return run


def measure(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternating within every repeat."""
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, nargs="+", default=[256, 512])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    fam = family("selective_scan")
    peer = fam.peers["mamba-ssm"]()
    B, T, N = args.batch, args.length, args.states
    lines = [
        f"B = {B}, T = {T}, N = {N}, float32, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; medians of {args.repeats} alternating repeats (ms).",
        "mamba-ssm: " + ("selective_scan_ref" if peer else "not installed"),
        "",
        "| D | gates | pass | recurrent | chunk | mamba-ssm ref | scan "
        "| recurrent / scan | scan / mamba-ssm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for D in args.channels:
        for strong in (False, True):
            x = inputs(fam, B, T, D, N, strong)
            with torch.no_grad():
                y = fam.forms["scan"](**x)[0]
            assert torch.isfinite(y).all()
            for backward in (False, True):
                runs = {form: call(fam.forms[form], x, backward) for form in FORMS}
                if peer:
                    runs["mamba-ssm"] = call(peer, x, backward)
                ms = {k: 1e3 * v for k, v in measure(runs, args.repeats).items()}
                ref = ms.get("mamba-ssm")
                vs_ref = "—" if ref is None else f"{ms['scan'] / ref:.2f}"
                row = (
                    f"| {D} | {'strong' if strong else 'paper init'} "
                    f"| {'fwd+bwd' if backward else 'fwd'} | {ms['recurrent']:.0f} "
                    f"| {ms['chunk']:.0f} | {'—' if ref is None else f'{ref:.0f}'} "
                    f"| {ms['scan']:.0f} | {ms['recurrent'] / ms['scan']:.1f}× "
                    f"| {vs_ref} |"
                )
                lines.append(row)
                print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
