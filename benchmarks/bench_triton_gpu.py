"""The Triton kernels on a GPU beside flash-linear-attention 0.6.0 and SDPA, in one run.

From the repository root on a machine with an NVIDIA GPU (torch with CUDA, triton 3.6.0); fla is
an optional peer, pure Python, installed beside the tree (the GPU machine may have no network):

    pip install --no-deps --target .bench_deps fla-core==0.6.0
    PYTHONPATH=.:.bench_deps python benchmarks/bench_triton_gpu.py --out benchmarks/results/gpu

The kernels' own tests run there too, compiled and with bfloat16 added (pytest and hypothesis
installed the same way if the machine lacks them):

    PYTHONPATH=.:.bench_deps python -m pytest tests/ops/triton -q

Before timing anything it checks each Triton op in bfloat16 against the PyTorch chunk form, forward
and backward (and reports its gap to fla), and stops if one is off (--keep-going times anyway).
Then, with bfloat16 q, k, v, float32 gates and β, H = 16, K = V = 128, (B, T) in SHAPES:
  * simple_gla (g [B, T, H]), gla (g [B, T, H, K]), gated_delta (β, g [B, T, H]): seqlab's
    backend="triton" op vs fla's chunk_simple_gla / chunk_gla / chunk_gated_delta_rule, and causal
    SDPA on the same q, k, v; forward (no grad) and forward+backward;
  * the first call of each (shape, op, pass) in seconds, and each Triton kernel's compile time as
    Triton reports it (a fresh TRITON_CACHE_DIR unless --warm-cache; fla's includes its autotuning);
  * the median of --repeats timed calls (CUDA events) after one warm-up call, seqlab / fla;
  * achieved bandwidth: the bytes an op must at least move (read q, k, v, gates; write o; for
    the backward also read dO and write every gradient) over the time, as a fraction of --bw
    (3.35 TB/s, H100 SXM);
  * decode: one fused recurrent step (T = 1 with a state) at 1K and 32K context vs SDPA over a
    KV cache of that length (append one token, attend to all); the recurrent state is [K, V] per
    head whatever the context, so its step costs the same at both.
Writes triton_gpu.json and triton_gpu.md to --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.ops import delta_rule, gated_linear

H, K, V = 16, 128, 128
SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 32768)]
OPS = ("simple_gla", "gla", "gated_delta")
PASSES = ("fwd", "fwd+bwd")
CONTEXTS = (1024, 32768)
DECODE_BATCHES = (1, 8)
BF16 = torch.bfloat16


class CompileLog:
    """Per-kernel Triton compile seconds, from the hooks around each compilation."""

    def __init__(self):
        self.started: dict[tuple, float] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.variants: dict[str, int] = defaultdict(int)

    def install(self):
        import triton

        triton.knobs.runtime.jit_cache_hook = self._before
        triton.knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, fn, **_):
        self.started[(fn.module, fn.name, str(key))] = time.perf_counter()
        return None  # a truthy value would skip the compilation

    def _after(self, *, key, fn, **_):
        t0 = self.started.pop((fn.module, fn.name, str(key)), None)
        if t0 is not None:
            name = f"{fn.module.split('.')[0]}:{fn.name}"
            self.seconds[name] += time.perf_counter() - t0
            self.variants[name] += 1

    def table(self) -> list[dict]:
        return [
            {"kernel": n, "variants": self.variants[n], "compile_s": round(self.seconds[n], 2)}
            for n in sorted(self.seconds, key=self.seconds.get, reverse=True)
        ]


def load_fla():
    """fla's three chunk ops and its decode steps, or None when fla is not importable."""
    try:
        import fla
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as e:
        print(f"fla not importable ({e}); timing seqlab and SDPA only", file=sys.stderr)
        return None
    return {
        "version": fla.__version__,
        "simple_gla": lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"])[0],
        "gla": lambda x: chunk_gla(x["q"], x["k"], x["v"], g=x["g"])[0],
        "gated_delta": lambda x: chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"]
        )[0],
        "step_simple_gla": lambda x: fused_recurrent_simple_gla(
            x["q"],
            x["k"],
            x["v"],
            g=x["g"],
            initial_state=x["initial_state"],
            output_final_state=True,
        ),
        "step_gated_delta": lambda x: fused_recurrent_gated_delta_rule(
            x["q"],
            x["k"],
            x["v"],
            g=x["g"],
            beta=x["beta"],
            initial_state=x["initial_state"],
            output_final_state=True,
        ),
    }


def seqlab_op(op: str, x: dict):
    """The chunk op through the public dispatcher, as a model calls it; returns o."""
    fn = delta_rule if op == "gated_delta" else gated_linear
    return fn(**x, backend="triton")[0]


def seqlab_step(op: str, x: dict):
    fn = delta_rule if op == "gated_delta" else gated_linear
    return fn(**x, backend="triton", form="recurrent", output_final_state=True)


def make_inputs(op: str, B: int, T: int, grad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v bf16 [B, T, H, D]; log-gates (median ≈ −0.05; /16 per channel) and β float32."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    x = {"q": randn(B, T, H, K).to(BF16), "k": randn(B, T, H, K), "v": randn(B, T, H, V).to(BF16)}
    x["k"] = (F.normalize(x["k"], dim=-1) if op == "gated_delta" else x["k"]).to(BF16)
    if op == "gla":
        x["g"] = F.logsigmoid(randn(B, T, H, K) + 3) / 16
    else:
        x["g"] = F.logsigmoid(randn(B, T, H) + 3)
    if op == "gated_delta":
        x["beta"] = torch.sigmoid(randn(B, T, H))
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def sdpa_inputs(B: int, T: int, grad: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {
        n: torch.randn(B, H, T, K, generator=gen, device="cuda", dtype=BF16).requires_grad_(grad)
        for n in ("q", "k", "v")
    }


def sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def min_bytes(op: str, B: int, T: int, pass_: str) -> int:
    """What the op must at least read and write: inputs, o; backward adds dO and the grads."""
    n = B * T * H
    qkv = n * (2 * K + V) * 2
    o = n * V * 2
    gates = {"simple_gla": n * 4, "gla": n * K * 4, "gated_delta": 2 * n * 4, "sdpa": 0}[op]
    fwd = qkv + gates + o
    return fwd if pass_ == "fwd" else 2 * fwd


def time_call(fn, repeats: int) -> dict:
    """The first call (compilation, autotuning) in seconds, then the median of `repeats` calls
    after one warm-up, in ms, and the peak memory of one call."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    fn()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"first_s": round(first, 3), "ms": statistics.median(times), "peak_gib": round(peak, 3)}


def runner(impl, x: dict, pass_: str):
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                impl(x)

        return fwd
    do = torch.randn_like(impl(x).detach())
    leaves = list(x.values())

    def fwd_bwd():
        impl(x).backward(do)
        for t in leaves:
            t.grad = None

    return fwd_bwd


def ready(fn):
    """A `make` for measure() when the callable needs no set-up."""
    return fn


def measure(label: str, make, repeats: int) -> dict:
    """time_call(make()); an error is recorded, not raised: one failing peer must not end the
    whole run."""
    try:
        return time_call(make(), repeats)
    except Exception as e:
        traceback.print_exc()
        print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_correctness(fla, tol: float = 2e-2) -> list[dict]:
    """Triton vs the PyTorch chunk form on the same bf16 inputs (B = 2, T = 1000, H = 16): o, the
    final state and every gradient within `tol` × max |reference|; fla's o gap is reported."""
    rows = []
    for op in OPS:
        x = make_inputs(op, 2, 1000, grad=True, seed=1)
        outs = {}
        for backend in ("triton", "torch"):
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
            fn = delta_rule if op == "gated_delta" else gated_linear
            o, s = fn(**leaves, backend=backend, output_final_state=True)
            gen = torch.Generator(device="cuda").manual_seed(2)
            wo = torch.randn(o.shape, generator=gen, device="cuda")
            ws = torch.randn(s.shape, generator=gen, device="cuda")
            ((o.float() * wo).sum() + (s * ws).sum()).backward()
            outs[backend] = {"o": o, "state": s, **{f"d{n}": t.grad for n, t in leaves.items()}}
        errs = {n: rel_err(outs["triton"][n], outs["torch"][n]) for n in outs["torch"]}
        row = {"op": op, **{n: f"{e:.1e}" for n, e in errs.items()}}
        if fla is not None:
            with torch.no_grad():
                row["o vs fla"] = f"{rel_err(fla[op](x), outs['torch']['o']):.1e}"
        bad = [n for n, e in errs.items() if not e <= tol]
        row["ok"] = "yes" if not bad else f"NO: {', '.join(bad)} > {tol}"
        rows.append(row)
    return rows


def bench_training(fla, shapes, repeats: int, bw: float) -> list[dict]:
    rows = []
    for B, T in shapes:
        for pass_ in PASSES:
            grad = pass_ != "fwd"
            attn = partial(runner, sdpa, sdpa_inputs(B, T, grad), pass_)
            s = measure(f"sdpa {B}x{T} {pass_}", attn, repeats)
            for op in OPS:
                x = make_inputs(op, B, T, grad)
                ours = measure(
                    f"seqlab {op}", partial(runner, partial(seqlab_op, op), x, pass_), repeats
                )
                peer = {}
                if fla is not None:
                    peer = measure(f"fla {op}", partial(runner, fla[op], x, pass_), repeats)
                row = {
                    "op": op,
                    "B": B,
                    "T": T,
                    "pass": pass_,
                    "min_bytes": min_bytes(op, B, T, pass_),
                }
                for impl, r in (("seqlab", ours), ("fla", peer), ("sdpa", s)):
                    row.update({f"{impl}_{k}": v for k, v in r.items()})
                    if "ms" in r:
                        moved = min_bytes("sdpa" if impl == "sdpa" else op, B, T, pass_)
                        row[f"{impl}_bw_frac"] = moved / (r["ms"] * 1e-3) / bw
                if "ms" in ours and "ms" in peer:
                    row["seqlab_over_fla"] = ours["ms"] / peer["ms"]
                rows.append(row)
                times = "  ".join(
                    f"{i} {r.get('ms', float('nan')):8.3f} ms"
                    for i, r in (("seqlab", ours), ("fla", peer), ("sdpa", s))
                )
                print(f"{op:11s} B={B} T={T:5d} {pass_:7s} {times}", flush=True)
                del x
                torch.cuda.empty_cache()
    return rows


def sdpa_step(q, k, v, cache_k, cache_v, pos: int):
    """Append one token to the KV cache and attend to all pos + 1 positions."""
    cache_k[:, :, pos : pos + 1] = k
    cache_v[:, :, pos : pos + 1] = v
    return F.scaled_dot_product_attention(q, cache_k, cache_v)


def bench_decode(fla, repeats: int, bw: float) -> list[dict]:
    from seqlab.ops.triton.recurrent import fused_recurrent

    rows = []
    for B in DECODE_BATCHES:
        for ctx in CONTEXTS:
            for op in ("simple_gla", "gated_delta"):
                x = {n: t.detach() for n, t in make_inputs(op, B, 1, grad=False).items()}
                x["initial_state"] = torch.randn(B, H, K, V, device="cuda") * 0.1
                args = (x["q"], x["k"], x["v"], x["g"], x.get("beta"), K**-0.5)
                impls = {
                    "seqlab op": partial(seqlab_step, op, x),
                    "seqlab kernel": partial(
                        fused_recurrent, *args, x["initial_state"], True, None, B
                    ),
                }
                if fla is not None:
                    impls["fla"] = partial(fla[f"step_{op}"], x)
                for impl, fn in impls.items():
                    r = measure(f"{impl} step {op}", partial(ready, fn), repeats)
                    if "ms" in r:
                        r["bw_frac"] = 8 * B * H * K * V / (r["ms"] * 1e-3) / bw
                    rows.append({"op": op, "B": B, "context": ctx, "impl": impl, **r})
            gen = torch.Generator(device="cuda").manual_seed(0)
            cache_k = torch.randn(B, H, ctx + 1, K, generator=gen, device="cuda", dtype=BF16)
            cache_v = torch.randn(B, H, ctx + 1, V, generator=gen, device="cuda", dtype=BF16)
            q, k, v = (torch.randn(B, H, 1, d, device="cuda", dtype=BF16) for d in (K, K, V))
            step = partial(sdpa_step, q, k, v, cache_k, cache_v, ctx)
            r = measure(f"sdpa step {ctx}", partial(ready, step), repeats)
            if "ms" in r:
                r["bw_frac"] = 2 * B * H * (ctx + 1) * K * 2 / (r["ms"] * 1e-3) / bw
            rows.append({"op": "attention", "B": B, "context": ctx, "impl": "sdpa kv-cache", **r})
            del cache_k, cache_v
    return rows


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(meta: dict, checks, training, compiles, decode) -> str:
    lines = [
        f"seqlab Triton kernels vs fla {meta['fla']} vs SDPA; {meta['gpu']}; torch "
        f"{meta['torch']}, triton {meta['triton']}; bf16, H={H}, K=V={K}; median of "
        f"{meta['repeats']}; bandwidth as a fraction of {meta['bw'] / 1e12:.2f} TB/s; "
        f"{meta['date']}",
        "",
        "Correctness (Triton vs the PyTorch chunk form, max error / max |reference|):",
        "",
    ]
    cols = list(checks[0])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in checks]
    lines += [
        "",
        "| op | B | T | pass | seqlab ms | fla ms | seqlab / fla | SDPA ms | seqlab BW | fla BW "
        "| seqlab first s | fla first s | seqlab GiB | fla GiB |",
        "|" + "---|" * 14,
    ]
    for r in training:
        lines.append(
            f"| {r['op']} | {r['B']} | {r['T']} | {r['pass']} | {fmt(r.get('seqlab_ms'), '.3f')} "
            f"| {fmt(r.get('fla_ms'), '.3f')} | {fmt(r.get('seqlab_over_fla'), '.2f')} "
            f"| {fmt(r.get('sdpa_ms'), '.3f')} | {fmt(r.get('seqlab_bw_frac'), '.0%')} "
            f"| {fmt(r.get('fla_bw_frac'), '.0%')} | {fmt(r.get('seqlab_first_s'), '.2f')} "
            f"| {fmt(r.get('fla_first_s'), '.2f')} | {fmt(r.get('seqlab_peak_gib'), '.2f')} "
            f"| {fmt(r.get('fla_peak_gib'), '.2f')} |"
        )
    errors = [(r, k) for r in training for k in r if k.endswith("_error")]
    lines += [f"- {r['op']} B={r['B']} T={r['T']} {r['pass']} {k}: {r[k]}" for r, k in errors]
    lines += ["", "Triton compile time per kernel (all variants; fla's includes autotuning):", ""]
    lines += ["| kernel | variants | compile s |", "|---|---|---|"]
    lines += [f"| {c['kernel']} | {c['variants']} | {c['compile_s']:.2f} |" for c in compiles]
    lines += ["", "Decode (one token, state or KV cache of `context` tokens):", ""]
    lines += ["| op | B | context | impl | µs | BW |", "|---|---|---|---|---|---|"]
    for r in decode:
        us = r["error"] if "error" in r else fmt(r["ms"] * 1e3, ".1f")
        lines.append(
            f"| {r['op']} | {r['B']} | {r['context']} | {r['impl']} | {us} "
            f"| {fmt(r.get('bw_frac'), '.0%')} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for triton_gpu.json / .md")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--bw", type=float, default=3.35e12, help="peak memory bandwidth, bytes/s")
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="BxT,...")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--warm-cache", action="store_true", help="keep Triton's on-disk cache")
    ap.add_argument("--keep-going", action="store_true", help="time even if a check fails")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if not args.warm_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    import triton

    log = CompileLog()
    log.install()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    fla = load_fla()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla["version"] if fla else None,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "bw": args.bw,
        "date": date.today().isoformat(),
    }
    checks = check_correctness(fla)
    failed = [c for c in checks if c["ok"] != "yes"]
    if failed and not args.keep_going:
        print(json.dumps(checks, indent=1))
        raise SystemExit("a Triton op differs from the PyTorch chunk form; no timings taken")
    training = bench_training(fla, shapes, args.repeats, args.bw)
    decode = [] if args.no_decode else bench_decode(fla, args.repeats * 10, args.bw)
    compiles = log.table()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "checks": checks, "training": training, "compile": compiles,
              "decode": decode}  # fmt: skip
    (args.out / "triton_gpu.json").write_text(json.dumps(result, indent=1))
    md = markdown(meta, checks, training, compiles, decode)
    (args.out / "triton_gpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
