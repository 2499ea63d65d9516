"""Every registered op family on the CPU: each fast form against the family's recurrent form, and
against every installed peer, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_families.py --out DIR/families.md
    PYTHONPATH=. .venv/bin/python benchmarks/bench_families.py --families s4d,hyena --skip-slow

For each family (seqlab.ops.registry) and variant, on the family's make_inputs (realistic gates)
with B = 1, H = 4 and the family's dims (float32): forward+backward at T = 2048 and forward at
T = 8192 (`--seq-lens` changes both), the forms and peers taking turns call by call in an order
shuffled each round (load from other processes falls on all alike, and none always runs after
the same one), each entry the median of the repeats. The slow form is the
family's "recurrent" form (else its reference; a family whose only form is its fast form, such
as attention, has no ratio there); a measurement whose first call takes longer than
`--cap` seconds has that call as its one sample, and `--skip-slow` leaves the slow form out at
the longest length, except against FFT forms (their target is at that length).
The targets are each family's `targets` (seqlab.ops.registry.OpFamily): by default the fast form
≥ 10x its recurrent form forward+backward at T = 2048; a peer target holds the fast form to a
fraction of that peer's time in every pass; FFT forms are also held to ≥ 20x at T = 8192.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from seqlab.ops.registry import OpFamily, families
from seqlab.profile.bench import cpu_name
from seqlab.profile.measure import interleaved_times, package_versions

B, H = 1, 4
PASSES = (("fwd+bwd", 2048), ("fwd", 8192))
FFT_TARGET = 20.0  # FFT forms against their recurrent form, forward at the longer length


def slow_form(fam: OpFamily) -> str:
    return "recurrent" if "recurrent" in fam.forms else fam.reference


def call(fn: Callable, x: dict, backward: bool) -> Callable[[], None]:
    """One timed call: fn(**x) → o (a form returns (o, state)), summed and differentiated."""

    def run():
        leaves = {
            n: t.detach().requires_grad_(backward and t.is_floating_point())
            if torch.is_tensor(t)
            else t
            for n, t in x.items()
        }
        with torch.set_grad_enabled(backward):
            o = fn(**leaves)
            o = o[0] if isinstance(o, tuple) else o
            if backward:
                o.float().sum().backward()

    return run


def impls(fam: OpFamily) -> dict[str, Callable]:
    """form name or peer name → fn(**inputs); the fast and slow forms, then installed peers."""
    out = {}
    for form in dict.fromkeys((fam.fast, slow_form(fam))):
        out[form] = fam.forms[form]
    for name, loader in fam.peers.items():
        fn = loader()
        if fn is not None:
            out[f"peer:{name}"] = fn
    return out


def measure(
    fam: OpFamily, variant: str, T: int, backward: bool, repeats: int, cap: float, skip: set[str]
) -> dict[str, float | str]:
    """Median seconds per implementation, interleaved; a string says why one was not timed."""
    gen = torch.Generator().manual_seed(0)
    x = fam.make_inputs(variant, B, T, H, dtype=torch.float32, generator=gen, **fam.dims)
    runs, result = {}, {}
    for name, fn in impls(fam).items():
        if name in skip:
            result[name] = "skipped"
            continue
        run = call(fn, x, backward)
        try:
            t0 = time.perf_counter()
            run()  # first call: warm-up, and the cap's measure
            first = time.perf_counter() - t0
        except Exception as e:  # a peer may reject a shape
            result[name] = f"failed: {type(e).__name__}"
            continue
        if first > cap:  # too slow to repeat: the first call is the one sample
            result[name] = [first]
            continue
        runs[name] = run
    if runs:  # in turns, the order shuffled each round (`interleaved_times`)
        result.update(interleaved_times(runs, repeats))
    return {n: statistics.median(v) if isinstance(v, list) else v for n, v in result.items()}


def rows(
    names: list[str] | None = None,
    passes=PASSES,
    repeats: int = 5,
    cap: float = 20.0,
    skip_slow: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """A row per (family, variant, pass, implementation)."""
    out = []
    longest = max(T for _, T in passes)
    for fam in families().values():
        if names and fam.name not in names:
            continue
        slow = slow_form(fam)
        for variant in fam.variants:
            for what, T in passes:
                skip = set()
                if skip_slow and T == longest and fam.fast != "fft" and slow != fam.fast:
                    skip = {slow}  # the T = 8192 target is the FFT forms
                m = measure(fam, variant, T, what == "fwd+bwd", repeats, cap, skip)
                fast = m.get(fam.fast)
                peers = {n: v for n, v in m.items() if n.startswith("peer:")}
                for name, s in m.items():
                    row = {
                        "family": fam.name,
                        "variant": variant,
                        "form": name,
                        "pass": what,
                        "T": T,
                        "shape": _shape(fam),
                        "s": s,
                        "fast": name == fam.fast,
                    }
                    if slow != fam.fast and isinstance(s, float) and isinstance(m.get(slow), float):
                        row["vs_recurrent"] = m[slow] / s
                    if name == fam.fast and isinstance(fast, float):
                        row["vs_peers"] = {
                            p: v / fast for p, v in peers.items() if isinstance(v, float)
                        }
                    out.append(row)
                    log(_line(row))
    return out


def _shape(fam: OpFamily) -> str:
    return f"B={B} H={H} " + " ".join(f"{k}={v}" for k, v in fam.dims.items())


def _line(row: dict) -> str:
    s = row["s"]
    ms = f"{1e3 * s:.1f} ms" if isinstance(s, float) else s
    return f"{row['family']}/{row['variant']} {row['form']} {row['pass']} T={row['T']}: {ms}"


# The outside packages the families' peers come from (their speed changes between releases)
PEER_PACKAGES = ("fla-core", "mlstm-kernels", "xlstm", "mamba-ssm")


def machine() -> str:
    cpu = cpu_name()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}; {torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs; torch "
        f"{torch.__version__}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average {load}; "
        f"peers: {package_versions(PEER_PACKAGES)}"
    )


def markdown(table: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| family | variant | form | pass | T | shape | ms | recurrent / this | peer / this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        s = r["s"]
        ms = f"{1e3 * s:.2f}" if isinstance(s, float) else s
        ratio = f"{r['vs_recurrent']:.1f}x" if "vs_recurrent" in r else "–"
        peers = ", ".join(f"{p[5:]} {v:.2f}x" for p, v in r.get("vs_peers", {}).items()) or "–"
        form = f"**{r['form']}**" if r["fast"] else r["form"]
        row = [r["family"], r["variant"], form, r["pass"], str(r["T"]), r["shape"], ms]
        lines.append("| " + " | ".join([*row, ratio, peers]) + " |")
    lines += ["", "Targets: " + "; ".join(_verdicts(table))]
    return "\n".join(lines) + "\n"


def _verdicts(table: list[dict]) -> list[str]:
    """One line per target a measured row is held to (the family's `targets`)."""
    fams = families()
    out = []
    for r in table:
        if not r["fast"]:
            continue
        targets = fams[r["family"]].targets
        where = f"{r['family']}/{r['variant']} {r['form']} {r['pass']} T={r['T']}"
        checks = []
        if "vs_recurrent" in r and r["form"] != "recurrent":
            if r["pass"] == "fwd+bwd" and "recurrent" in targets:
                checks.append(("recurrent", r["vs_recurrent"], targets["recurrent"]))
            elif r["pass"] == "fwd" and r["form"] == "fft":
                checks.append(("recurrent", r["vs_recurrent"], FFT_TARGET))
        for peer, ratio in r.get("vs_peers", {}).items():
            if peer in targets:
                checks.append((peer, ratio, targets[peer]))
        for against, ratio, need in checks:
            ok = "met" if ratio >= need else "MISSED"
            out.append(f"{where} vs {against}: {ratio:.2f}x (≥ {need:.2f}x {ok})")
    return out or ["none measured"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", help="comma-separated family names (default: all)")
    p.add_argument("--seq-lens", default="2048,8192", help="T of fwd+bwd, then of fwd")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cap", type=float, default=20.0, help="seconds: a slower first call → 1 run")
    p.add_argument("--skip-slow", action="store_true", help="no recurrent form at the longest T")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    T1, T2 = (int(t) for t in args.seq_lens.split(","))
    names = args.families.split(",") if args.families else None
    start = time.monotonic()
    passes = (("fwd+bwd", T1), ("fwd", T2))
    table = rows(names, passes, args.repeats, args.cap, args.skip_slow, print)
    header = (
        f"# Op families on CPU\n\n{machine()}\n\n"
        f"float32, median of {args.repeats} interleaved calls (the order shuffled each round) "
        f"after a warm-up (the first call alone where it took over {args.cap:g} s); "
        f"{time.monotonic() - start:.0f} s in all. "
        "Bold: the family's fast form. Command: `PYTHONPATH=. python benchmarks/bench_families.py "
        f"--seq-lens {args.seq_lens} --repeats {args.repeats} --cap {args.cap:g}"
        + (" --skip-slow" if args.skip_slow else "")
        + "`"
    )
    text = markdown(table, header)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
