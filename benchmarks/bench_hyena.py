"""Hyena op on CPU: the direct form (term by term, O(T²)) against the FFT form (O(T log T)).

    PYTHONPATH=. python benchmarks/bench_hyena.py [--channels 256] [--batch 1] [--repeats 3]

Times forward + backward at T = 2048 and forward at T = 8192 (float32) and prints a markdown
table with the median time of each form and the ratio direct / fft.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqlab.ops.registry import family


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def case(fam, form, T, B, C, backward):
    x = fam.make_inputs("default", B, T, 1, generator=torch.Generator().manual_seed(0), D=C)
    if backward:
        x = {k: t.requires_grad_() for k, t in x.items()}

    def run():
        y, _ = fam.forms[form](**x)
        if backward:
            y.sum().backward()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    fam = family("hyena")
    rows = []
    for T, backward in ((2048, True), (8192, False)):
        ms = {
            form: 1e3 * timed(case(fam, form, T, args.batch, args.channels, backward), args.repeats)
            for form in ("direct", "fft")
        }
        what = "fwd+bwd" if backward else "fwd"
        rows.append((T, what, ms["direct"], ms["fft"], ms["direct"] / ms["fft"]))
    print(f"B = {args.batch}, D = {args.channels}, float32, {torch.get_num_threads()} threads\n")
    print("| T | pass | direct (ms) | fft (ms) | direct / fft |")
    print("|---|---|---|---|---|")
    for T, what, d, f, r in rows:
        print(f"| {T} | {what} | {d:.1f} | {f:.1f} | {r:.1f}x |")


if __name__ == "__main__":
    main()
