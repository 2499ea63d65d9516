"""Before/after in one process: the chunk ops of revision 6b3d6c4 (before issue 14 item 7) and of
the working tree, on the same inputs, called in turns (median of REPS calls each).

    PYTHONPATH=. .venv/bin/python benchmarks/results/cpu-2026-12-04/ab_same_process.py 2048 \\
        gla_scalar,gated_delta,gla_channel

The old `_common.py`, `gated_linear.py` and `delta_rule.py` are read with `git show` into a
temporary directory and imported as modules of their own (old_common, ...). One torch thread
(THREADS to change), REPS calls (default 7). Prints, per case and pass, each revision's time at
each gate setting, its ratio to that revision's time at log-decay −0.05, and new / old.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BASE = "6b3d6c4"
tmp = Path(tempfile.mkdtemp())
for name in ("_common", "gated_linear", "delta_rule"):
    src = subprocess.run(
        ["git", "show", f"{BASE}:seqlab/ops/{name}.py"], check=True, capture_output=True, text=True
    ).stdout
    (tmp / f"old{name if name.startswith('_') else '_' + name}.py").write_text(
        src.replace("from seqlab.ops._common import", "from old_common import")
    )
sys.path.insert(0, str(tmp))
OG, OD = importlib.import_module("old_gated_linear"), importlib.import_module("old_delta_rule")
NG = importlib.import_module("seqlab.ops.gated_linear")
ND = importlib.import_module("seqlab.ops.delta_rule")

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
T = int(sys.argv[1])
cases = sys.argv[2].split(",")
reps = int(os.environ.get("REPS", "7"))
B, H, K = 1, 4, 64
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
kn = F.normalize(k, dim=-1)
beta = torch.rand(B, T, H, generator=gen)


def gates(shape):
    out = {f"{d:g}": torch.full(shape, float(d)) for d in (-0.05, -1, -3, -5, -10, -20)}
    out["logsigmoid"] = F.logsigmoid(torch.randn(*shape, generator=gen))
    out["strong"] = F.logsigmoid(torch.randn(*shape, generator=gen) - 3)
    return out


def step_fn(mod, case, g, bwd):
    leaves = [x.clone().requires_grad_(bwd) for x in (q, kn if case == "gated_delta" else k, v, g)]

    def op():
        qq, kk, vv, gg = leaves
        if case == "gated_delta":
            return mod.chunk_delta_rule(qq, kk, vv, beta, gg, output_final_state=True)
        return mod.chunk_gated_linear(qq, kk, vv, gg, output_final_state=True)

    def step():
        if bwd:
            o, s = op()
            (o.sum() + s.sum()).backward()
            for x in leaves:
                x.grad = None
        else:
            with torch.no_grad():
                op()

    return step


load = open("/proc/loadavg").read().strip()
print(f"load {load}, T {T}, threads {torch.get_num_threads()}, reps {reps}, before = {BASE}")
for case in cases:
    shape = (B, T, H, K) if case == "gla_channel" else (B, T, H)
    mods = {"old": OD if case == "gated_delta" else OG, "new": ND if case == "gated_delta" else NG}
    gs = gates(shape)
    for bwd in (False, True):
        pairs = [(n, g, m, mod) for n, g in gs.items() for m, mod in mods.items()]
        steps = {(m, n): step_fn(mod, case, g, bwd) for n, g, m, mod in pairs}
        for s in steps.values():
            s()
        times = {key: [] for key in steps}
        for _ in range(reps):
            for key, s in steps.items():
                t0 = time.perf_counter()
                s()
                times[key].append(time.perf_counter() - t0)
        med = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        mode = "fwd+bwd" if bwd else "fwd"
        for m in mods:
            base = med[(m, "-0.05")]
            cells = " ".join(f"{n}={med[(m, n)]:.1f}({med[(m, n)] / base:.2f})" for n in gs)
            print(f"{case:12s} {mode:7s} {m}: {cells}", flush=True)
        ratios = " ".join(f"{n}={med[('new', n)] / med[('old', n)]:.2f}" for n in gs)
        print(f"{case:12s} {mode:7s} new/old: {ratios}", flush=True)
print("load", open("/proc/loadavg").read().strip())
