"""Time seqlab's chunk forms beside the pure-PyTorch peers on the CPU, in one run.

    .venv/bin/pip install -e '.[cpu-peers]'     # fla-core 0.6.0 and transformers (optional)
    .venv/bin/python benchmarks/bench_cpu_peers.py                 # T in 2048, 8192
    .venv/bin/python benchmarks/bench_cpu_peers.py --seq-lens 2048 --repeats 5 --out peers.md
    .venv/bin/python benchmarks/bench_cpu_peers.py --gates strong --cases gla_scalar

Forward (no grad) and forward+backward, float32, B = 1, H = 4, K = V = 64, chunk 64; each entry
is the median of `--repeats` timed calls after one warm-up call, the implementations taking turns
call by call in an order shuffled each round (load from other processes falls on all alike, and
none always runs after the same one: a call's time depends on the heap state its predecessor
left), and each ratio is to the fastest peer of that case measured in this run. Peers, all on
the same inputs and conventions ([B, T, H, K] layout, scale K^-0.5, log-space gates, β per head):

- fla 0.6.0 `naive_chunk_gated_delta_rule`, `naive_chunk_simple_gla`, `naive_recurrent_gla`;
- transformers `torch_chunk_gated_delta_rule` (Qwen3-Next). With fla importable, transformers
  routes that function to fla's GPU kernel at import, so its module is imported with `fla` blocked.

Gates (`--gates`, rows for each; log-space, per step, z standard normal): `mild` logsigmoid(z + 3)
(median −0.05; per-channel / 16), the only setting before 2026-12-04; `logsigmoid` logsigmoid(z)
(median −0.69); `strong` logsigmoid(z − 3) (median −3.05). The ungated `delta` case runs once.

Before timing, each peer's output and final state are checked against seqlab's on a small input
with the same gates. A missing peer is reported as such; seqlab's own rows are always timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F

from seqlab.ops.registry import family
from seqlab.profile.measure import interleaved_times, package_versions

B, H, K, V, CHUNK = 1, 4, 64, 64, 64
# --cases name → (op family, variant) in seqlab.ops.registry; the inputs stay this script's own
# (its gate settings and seeds), so the committed tables stay reproducible
FAMILY_CASES = {
    "gated_delta": ("delta_rule", "gated"),
    "delta": ("delta_rule", "delta"),
    "gla_scalar": ("gated_linear", "head"),
    "gla_channel": ("gated_linear", "channel"),
}
CASES = tuple(FAMILY_CASES)
PEER_PACKAGES = ("fla-core", "transformers")
GATES = ("mild", "logsigmoid", "strong")


def make_gate(gates: str, z: torch.Tensor) -> torch.Tensor:
    """Log-space gates from standard normal logits z, as named (module docstring)."""
    if gates == "mild":
        return F.logsigmoid(z + 3) / (16 if z.dim() == 4 else 1)
    if gates == "logsigmoid":
        return F.logsigmoid(z)
    if gates == "strong":
        return F.logsigmoid(z - 3)
    raise ValueError(f"unknown gates {gates!r}: one of {', '.join(GATES)}")


def make_inputs(case: str, T: int, seed: int = 0, gates: str = "mild") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fam_name, variant = FAMILY_CASES[case]

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if fam_name == "delta_rule":
        x = dict(q=q, k=F.normalize(k, dim=-1), v=v, beta=torch.sigmoid(rand(B, T, H)))
        x["g"] = make_gate(gates, rand(B, T, H))
        if variant == "delta":
            x["g"] = torch.zeros(B, T, H)  # peers need a gate; seqlab gets g=None
        return x
    if variant == "head":
        return dict(q=q, k=k, v=v, g=make_gate(gates, rand(B, T, H)))
    return dict(q=q, k=k, v=v, g=make_gate(gates, rand(B, T, H, K)))


def seqlab_fn(case: str) -> Callable:
    """The case's family's chunk form (registry), on this script's inputs."""
    fam_name, variant = FAMILY_CASES[case]
    chunk = family(fam_name).forms["chunk"]

    def fn(q, k, v, g, beta=None):
        x = dict(q=q, k=k, v=v, g=None if variant == "delta" else g)
        if beta is not None:
            x["beta"] = beta
        return chunk(**x, output_final_state=True, chunk_size=CHUNK)

    return fn


def peer_fns(case: str) -> dict[str, Callable]:
    """fla's pure-PyTorch forms of `case`, where fla is importable."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla
    except ImportError:
        return {}
    if case in ("gated_delta", "delta"):
        return {
            "fla naive_chunk_gated_delta_rule": lambda q, k, v, g, beta: (
                naive_chunk_gated_delta_rule(q, k, v, g, beta, CHUNK, output_final_state=True)
            )
        }
    if case == "gla_scalar":
        return {
            "fla naive_chunk_simple_gla": lambda q, k, v, g: naive_chunk_simple_gla(
                q, k, v, g, output_final_state=True, chunk_size=CHUNK
            )
        }
    return {
        "fla naive_recurrent_gla (no chunk form)": lambda q, k, v, g: naive_recurrent_gla(
            q, k, v, g, output_final_state=True
        )
    }


def check_same(case: str, fn: Callable, ref: Callable, gates: str = "mild") -> float:
    """Max abs difference of output and final state on a small input (T = 200, not a multiple)."""
    x = make_inputs(case, 200, seed=1, gates=gates)
    with torch.no_grad():
        o1, s1 = fn(**x)
        o2, s2 = ref(**x)
    return max((o1 - o2).abs().max().item(), (s1 - s2).abs().max().item())


def transformers_peer() -> Callable | None:
    """Qwen3-Next's `torch_chunk_gated_delta_rule`, imported while `fla` is blocked.

    transformers picks fla's kernel over its own PyTorch function when it imports the module and
    finds fla, so the module is imported with `fla` hidden from sys.modules; fla is restored after.
    """
    saved = {n: m for n, m in sys.modules.items() if n == "fla" or n.startswith("fla.")}
    for n in saved:
        del sys.modules[n]
    sys.modules["fla"] = None  # type: ignore[assignment]
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next as m
    except ImportError:
        return None
    finally:
        del sys.modules["fla"]
        sys.modules.update(saved)
    return m.torch_chunk_gated_delta_rule


def stepper(fn: Callable, inputs: dict, backward: bool) -> Callable[[], None]:
    leaves = {n: x.clone().requires_grad_(backward) for n, x in inputs.items()}

    def step():
        if backward:
            o, s = fn(**leaves)
            (o.sum() + s.sum()).backward()
            for x in leaves.values():
                x.grad = None
        else:
            with torch.no_grad():
                fn(**leaves)

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """ms of each timed call per implementation; one warm-up each, then the timed calls take
    turns in an order shuffled each round (`interleaved_times`), so load from other processes
    falls on all of them alike and none always follows the same one."""
    for step in steps.values():
        step()
    times = interleaved_times(steps, repeats)
    return {n: [1e3 * t for t in ts] for n, ts in times.items()}


def paired_ratio(ours: list[float], peers: list[list[float]]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ours / fastest peer of the same round.

    Pairing by round cancels slow drifts in machine load that medians taken apart would not.
    """
    ratios = sorted(o / min(p[i] for p in peers) for i, o in enumerate(ours))
    return statistics.median(ratios), ratios[0], ratios[-1]


def measure(
    seq_lens: list[int],
    cases: list[str],
    repeats: int,
    peers: bool,
    max_loop_t: int = 2048,
    gates: tuple[str, ...] = ("mild",),
) -> dict:
    """{(case, gates): {name: {"check": err, "T/pass": ms}}}.

    A per-time-step peer (a Python loop over T) is skipped above `max_loop_t`: it takes minutes.
    The ungated `delta` case runs once, under the first gate setting's name.
    """
    hf = transformers_peer() if peers else None
    res: dict = {}
    for case, gate in ((c, gt) for c in cases for gt in gates):
        if case == "delta" and gate != gates[0]:
            continue
        ours = seqlab_fn(case)
        fns = {"seqlab chunk": ours}
        if peers:
            fns.update(peer_fns(case))
            if hf is not None and case in ("gated_delta", "delta"):
                fns["transformers torch_chunk_gated_delta_rule"] = lambda q, k, v, g, beta: hf(
                    q, k, v, g, beta, CHUNK, output_final_state=True
                )
        res[case, gate] = {
            n: {} if fn is ours else {"check": check_same(case, fn, ours, gate)}
            for n, fn in fns.items()
        }
        for T in seq_lens:
            x = make_inputs(case, T, gates=gate)
            for bwd in (False, True):
                steps = {
                    n: stepper(fn, x, bwd)
                    for n, fn in fns.items()
                    if not ("recurrent" in n and T > max_loop_t)
                }
                for n, ms in time_round_robin(steps, repeats).items():
                    res[case, gate][n][f"{T}/{'fwd+bwd' if bwd else 'fwd'}"] = ms  # all rounds
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peers", action="store_true", help="time only seqlab's rows")
    p.add_argument("--max-loop-t", type=int, default=2048, help="longest T for a per-step peer")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--gates",
        default=",".join(GATES),
        help=f"comma-separated gate settings of {', '.join(GATES)} (default: all)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        p.error(f"--cases: any of {', '.join(CASES)}")
    gates = tuple(args.gates.split(","))
    if not set(gates) <= set(GATES):
        p.error(f"--gates: any of {', '.join(GATES)}")

    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = measure(seq_lens, cases, args.repeats, not args.no_peers, args.max_loop_t, gates)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"seqlab chunk forms vs pure-PyTorch peers, CPU, float32, B={B} H={H} K={K} V={V} "
        f"chunk={CHUNK}, median of {args.repeats} rounds; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}, "
        f"load avg {load0} at the start, {load} at the end; peers: "
        f"{package_versions(PEER_PACKAGES)}",
        "",
        "Each cell: median ms, then for seqlab the median over rounds of its time / the fastest "
        "peer's time in the same round [lowest–highest round], for a peer its median / the "
        "fastest peer median.",
        "",
        "| case | gates | impl | check (max abs diff) | "
        + " | ".join(f"{T} {k}" for T in seq_lens for k in ("fwd", "fwd+bwd"))
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(seq_lens)),
    ]
    keys = [f"{T}/{k}" for T in seq_lens for k in ("fwd", "fwd+bwd")]
    for (case, gate), entries in results.items():
        peers = {n: e for n, e in entries.items() if n != "seqlab chunk"}
        for name, e in entries.items():
            cells = []
            for key in keys:
                if key not in e:
                    cells.append("skipped (slow loop)")
                    continue
                rounds = [p[key] for p in peers.values() if key in p]
                ms = statistics.median(e[key])
                if not rounds:
                    cells.append(f"{ms:.1f}")
                elif name == "seqlab chunk":
                    mid, lo, hi = paired_ratio(e[key], rounds)
                    cells.append(f"{ms:.1f} (**{mid:.2f}×** best peer [{lo:.2f}–{hi:.2f}])")
                else:
                    best = min(statistics.median(r) for r in rounds)
                    cells.append(f"{ms:.1f} ({ms / best:.2f}×)")
            check = "–" if "check" not in e else f"{e['check']:.1e}"
            gate_cell = "none" if case == "delta" else gate
            lines.append(f"| {case} | {gate_cell} | {name} | {check} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
