"""The Triton kernels on a GPU beside flash-linear-attention 0.6.0 and SDPA, in one run.

From the repository root on a machine with an NVIDIA GPU (torch with CUDA, triton 3.6.0); fla is
an optional peer, pure Python, installed beside the tree (the GPU machine may have no network):

    pip install --no-deps --target .bench_deps fla-core==0.6.0
    PYTHONPATH=.:.bench_deps python benchmarks/bench_triton_gpu.py --out benchmarks/results/gpu

The kernels' own tests run there too, compiled and with bfloat16 added (pytest and hypothesis
installed the same way if the machine lacks them):

    PYTHONPATH=.:.bench_deps python -m pytest tests/ops/triton -q

Before timing anything it checks each Triton op against the PyTorch chunk form on the same inputs
(B x T = --check-shape), forward and backward, and reports its gap to fla; it stops if one is
off, by more than 2e-2 (bf16), 3e-3 (fp16) or 1e-4 (fp32) x max |reference| (--keep-going
times anyway). Then, with q, k, v in --dtype, float32 gates and β, H = --heads, K = V =
--head-dim, (B, T) in --shapes:
  * simple_gla (g [B, T, H]), gla (g [B, T, H, K]), gated_delta (β, g [B, T, H]): seqlab's
    backend="triton" op vs fla's chunk_simple_gla / chunk_gla / chunk_gated_delta_rule, and causal
    SDPA on the same q, k, v; forward (no grad) and forward+backward;
  * the first call of each (shape, op, pass) in seconds, and each Triton kernel's compile time as
    Triton reports it (a fresh TRITON_CACHE_DIR unless --warm-cache; fla's includes its autotuning);
  * the median of --repeats timed calls (CUDA events) after one warm-up call, seqlab / fla;
  * achieved bandwidth: the bytes an op must at least move (read q, k, v, gates; write o; for
    the backward also read dO and write every gradient) over the time, as a fraction of --bw
    (3.35 TB/s, H100 SXM);
  * decode: one fused recurrent step (T = 1 with a state) at each of --contexts (1K and 32K) and
    --decode-batches vs SDPA over a KV cache of that length (append one token, attend to all);
    the recurrent state is [K, V] per head whatever the context, so its step costs the same at
    every context;
  * profile: each op's kernels under torch.profiler at --profile-shape (2x8192), µs per call and
    share of the op (fla's too with --profile-fla, after its autotuning): where the time goes;
    and per Triton kernel the bytes its tensor arguments hold over its time, as a fraction of
    --bw: a floor on the bandwidth it achieves (a kernel re-reading an input moves more).

Output: triton_gpu.json and triton_gpu.md in --out, rewritten (atomically) after every finished
row, so a run killed midway keeps what it measured; "complete" is false (the markdown starts with
"(partial run)") until the script ends on its own, and "stopped" says why sections are missing
when --time-limit or a failed check ended it early. The markdown is printed at the end.

Choosing the work: --sections (check, training, decode, profile; they run in the order check,
training, profile, decode), --ops (simple_gla, gla, gated_delta; every section takes the same
subset), --passes (fwd, fwd+bwd; training and profile), --no-fla. fla 0.6.0 refuses its gated
backward on Hopper with the GPU image's Triton 3.6.0 (fla #640; those rows record its error);
--fla-past-guard times it anyway, marked so in the results (load_fla says how).
--time-limit S starts no new row once S seconds have passed since the script's start (after its
imports); a row already started runs to its end, compilation and fla's autotuning included. The
files are then completed as usual, with "stopped" saying where, and the exit status is 0. A
failed check exits 1 after writing its rows. The check guards only the timings of its own
process, so a call that times also checks. benchmarks/gpu_bench.sh runs this script in steps
sized for one 10-minute call of a lent GPU machine (`kernels`: --sections check,decode,profile
after the compiled tests; `kernel-speed`: --sections check,training,profile --profile-fla), each
with --time-limit.

Smoke test on a CPU: Triton's interpreter runs the kernels on CPU tensors (slowly; it computes
tl.dot on bfloat16 wrongly, so fp32 or fp16); timings come from time.perf_counter and mean
nothing, peak memory is not recorded (tests/benchmarks/test_bench_triton_gpu.py does this):

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py --device cpu \\
        --dtype fp32 --heads 2 --head-dim 16 --shapes 1x64 --check-shape 1x40 \\
        --contexts 16,64 --decode-batches 1 --repeats 1 --no-fla --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.files import write_text_atomic
from seqlab.ops import delta_rule, gated_linear

# Defaults of the command-line options.
H, K = 16, 128  # heads, key dim; V = K
SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 32768)]
CHECK_SHAPE = (2, 1000)
CONTEXTS = (1024, 32768)
DECODE_BATCHES = (1, 8)

OPS = ("simple_gla", "gla", "gated_delta")
DECODE_OPS = ("simple_gla", "gated_delta")  # the ops fla has a fused recurrent step for
PASSES = ("fwd", "fwd+bwd")
SECTIONS = ("check", "training", "decode", "profile")
PROFILE_SHAPE = (2, 8192)
PROFILE_CALLS = 5
PROFILE_TOP = 8  # kernels listed per (op, pass, implementation)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Triton vs the PyTorch chunk form (which accumulates in float32), x max |reference|: the kernel
# tests' tolerances against float64 (tests/ops/triton/conftest.py), float32 loosened for the
# longer check sequence.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class Setup:
    """What every measurement shares: where the tensors live, their dtype and head sizes."""

    device: str
    dtype: torch.dtype
    H: int
    K: int  # = V
    bw: float  # peak memory bandwidth, bytes/s

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


class CompileLog:
    """Per-kernel Triton compile seconds, from the hooks around each compilation (the
    interpreter compiles nothing, so on a CPU it stays empty)."""

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


def load_fla(past_guard: bool = False):
    """fla's three chunk ops and its decode steps, or None when fla is not importable.

    fla 0.6.0 refuses the backward of its gated ops (chunk_simple_gla, chunk_gated_delta_rule)
    on Hopper with Triton 3.4 to 3.7.0, the GPU image's 3.6.0 included, because Triton
    miscompiles its chunk_bwd_kernel_dqkwg there (fla #640): without tilelang those rows record
    fla's RuntimeError. past_guard lifts that one check (fla.ops.common.chunk_o's
    IS_NVIDIA_HOPPER, read when the backward is called; the kernels' configs were chosen at
    import) so the same kernels run and can be timed; their gradients are then what fla warns
    of, and the results say so."""
    try:
        import fla
        import fla.ops.common.chunk_o
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as e:
        print(f"fla not importable ({e}); timing seqlab and SDPA only", file=sys.stderr)
        return None
    version = fla.__version__
    if past_guard:
        fla.ops.common.chunk_o.IS_NVIDIA_HOPPER = False
        version += " (past its Hopper guard: gated backward timed, its gradients not trusted)"
    return {
        "version": version,
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


def run_op(op: str, x: dict, backend: str, **kw):
    """seqlab's op through the public dispatcher, as a model calls it (the mixers skip the value
    checks of g and β, which read them back to the host: fla does not check them either);
    returns (o, state)."""
    fn = delta_rule if op == "gated_delta" else gated_linear
    return fn(**x, backend=backend, check_values=False, **kw)


def seqlab_op(op: str, x: dict):
    return run_op(op, x, "triton")[0]


def seqlab_step(op: str, x: dict):
    return run_op(op, x, "triton", form="recurrent", output_final_state=True)


def make_inputs(su: Setup, op: str, B: int, T: int, grad: bool, seed: int = 0) -> dict:
    """q, k, v [B, T, H, K] in su.dtype; log-gates (median ≈ −0.05; /16 per channel) and β
    float32."""
    gen = torch.Generator(device=su.device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=su.device)

    x = {"q": randn(B, T, su.H, su.K), "k": randn(B, T, su.H, su.K), "v": randn(B, T, su.H, su.K)}
    if op == "gated_delta":
        x["k"] = F.normalize(x["k"], dim=-1)
    x = {n: t.to(su.dtype) for n, t in x.items()}
    if op == "gla":
        x["g"] = F.logsigmoid(randn(B, T, su.H, su.K) + 3) / 16
    else:
        x["g"] = F.logsigmoid(randn(B, T, su.H) + 3)
    if op == "gated_delta":
        x["beta"] = torch.sigmoid(randn(B, T, su.H))
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def sdpa_inputs(su: Setup, B: int, T: int, grad: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=su.device).manual_seed(0)
    shape = (B, su.H, T, su.K)
    return {
        n: torch.randn(shape, generator=gen, device=su.device, dtype=su.dtype).requires_grad_(grad)
        for n in ("q", "k", "v")
    }


def sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def min_bytes(su: Setup, op: str, B: int, T: int, pass_: str) -> int:
    """What the op must at least read and write: inputs, o; backward adds dO and the grads."""
    n = B * T * su.H
    qkv = n * 3 * su.K * su.dtype.itemsize
    o = n * su.K * su.dtype.itemsize
    gates = {"simple_gla": n * 4, "gla": n * su.K * 4, "gated_delta": 2 * n * 4, "sdpa": 0}[op]
    fwd = qkv + gates + o
    return fwd if pass_ == "fwd" else 2 * fwd


def time_call(su: Setup, fn, repeats: int) -> dict:
    """The first call (compilation, autotuning) in seconds, then the median of `repeats` calls
    after one warm-up, in ms (CUDA events; perf_counter on a CPU), and the peak memory of one
    call (None on a CPU)."""
    sync = torch.cuda.synchronize if su.cuda else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    fn()
    if su.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if su.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if su.cuda else None
    return {"first_s": round(first, 3), "ms": statistics.median(times), "peak_gib": peak}


def runner(impl, x: dict, pass_: str):
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                impl(x)

        return fwd
    # o has v's shape and dtype (q, k, v [B, T, H, D]; SDPA's [B, H, T, D]); calling impl here
    # to get it would compile the forward before time_call measures the first call
    do = torch.randn_like(x["v"].detach())
    leaves = list(x.values())

    def fwd_bwd():
        impl(x).backward(do)
        for t in leaves:
            t.grad = None

    return fwd_bwd


def ready(fn):
    """A `make` for measure() when the callable needs no set-up."""
    return fn


def measure(su: Setup, label: str, make, repeats: int) -> dict:
    """time_call(make()); an error is recorded, not raised: one failing peer must not end the
    whole run."""
    try:
        return time_call(su, make(), repeats)
    except Exception as e:
        traceback.print_exc()
        print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
        if su.cuda:
            torch.cuda.empty_cache()
        return {"error": error_text(e)}


def error_text(e: Exception) -> str:
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(ours: dict, ref: dict, tol: float) -> tuple[dict[str, float], str]:
    """Each tensor's max error / max |reference|, and "yes" or which of them exceed `tol` (a NaN
    error does)."""
    errs = {n: rel_err(ours[n], ref[n]) for n in ref}
    bad = [n for n, e in errs.items() if not e <= tol]
    return errs, "yes" if not bad else f"NO: {', '.join(bad)} > {tol:g}"


def run_with_grads(su: Setup, op: str, x: dict, backend: str) -> dict:
    """o, the final state and the gradient of every input under fixed random weights on both."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, s = run_op(op, leaves, backend, output_final_state=True)
    gen = torch.Generator(device=su.device).manual_seed(2)
    wo = torch.randn(o.shape, generator=gen, device=su.device)
    ws = torch.randn(s.shape, generator=gen, device=su.device)
    ((o.float() * wo).sum() + (s * ws).sum()).backward()
    return {"o": o, "state": s, **{f"d{n}": t.grad for n, t in leaves.items()}}


def check_op(su: Setup, fla, op: str, B: int, T: int) -> dict:
    """One row: Triton vs the PyTorch chunk form on the same inputs; an error fails the row."""
    try:
        x = make_inputs(su, op, B, T, grad=True, seed=1)
        outs = {b: run_with_grads(su, op, x, b) for b in ("triton", "torch")}
        errs, ok = compare(outs["triton"], outs["torch"], TOL[su.dtype])
        row = {"op": op, **{n: f"{e:.1e}" for n, e in errs.items()}}
        if fla is not None:
            with torch.no_grad():
                row["o vs fla"] = f"{rel_err(fla[op](x), outs['torch']['o']):.1e}"
    except Exception as e:
        traceback.print_exc()
        row, ok = {"op": op}, f"NO: {error_text(e)}"
    return {**row, "ok": ok}


class Report:
    """Everything measured so far, rewritten to --out after every finished row (a run killed
    midway keeps its rows); "complete" turns true only when the run ends on its own."""

    def __init__(self, out: Path, meta: dict, log: CompileLog, deadline: float | None):
        self.out, self.log, self.deadline = out, log, deadline  # deadline: perf_counter seconds
        self.data = {"complete": False, "meta": meta, "checks": [], "training": [], "decode": []}
        self.data["profile"] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, row: dict):
        self.data[section].append(row)
        self.save()

    def stop(self, reason: str):
        self.data["stopped"] = reason
        self.save()

    def stopped(self, before: str) -> bool:
        """Whether to start no more measurements: stopped already, or out of time (which is
        then recorded, naming `before`, the measurement it would have started)."""
        late = self.deadline is not None and time.perf_counter() >= self.deadline
        if late and "stopped" not in self.data:
            limit = self.data["meta"]["time_limit_s"]
            self.stop(f"time limit {limit:g} s reached before {before}")
        return "stopped" in self.data

    def save(self, complete: bool = False):
        self.data["complete"] = complete
        self.data["compile"] = self.log.table()
        write_text_atomic(self.out / "triton_gpu.json", json.dumps(self.data, indent=1))
        write_text_atomic(self.out / "triton_gpu.md", markdown(self.data))


def run_checks(su: Setup, fla, report: Report, ops, shape: tuple[int, int]):
    for op in ops:
        if report.stopped(f"check {op}"):
            return
        report.add("checks", check_op(su, fla, op, *shape))


def bench_training(su: Setup, fla, report: Report, shapes, ops, passes, repeats: int):
    for B, T in shapes:
        for pass_ in passes:
            s = None  # SDPA's time on this (B, T, pass), measured with the first row
            for op in ops:
                if report.stopped(f"training {op} B={B} T={T} {pass_}"):
                    return
                if s is None:
                    attn = partial(runner, sdpa, sdpa_inputs(su, B, T, pass_ != "fwd"), pass_)
                    s = measure(su, f"sdpa {B}x{T} {pass_}", attn, repeats)
                x = make_inputs(su, op, B, T, grad=pass_ != "fwd")
                ours = measure(
                    su, f"seqlab {op}", partial(runner, partial(seqlab_op, op), x, pass_), repeats
                )
                peer = {}
                if fla is not None:
                    peer = measure(su, f"fla {op}", partial(runner, fla[op], x, pass_), repeats)
                row = {
                    "op": op,
                    "B": B,
                    "T": T,
                    "pass": pass_,
                    "min_bytes": min_bytes(su, op, B, T, pass_),
                }
                for impl, r in (("seqlab", ours), ("fla", peer), ("sdpa", s)):
                    row.update({f"{impl}_{k}": v for k, v in r.items()})
                    if "ms" in r:
                        moved = min_bytes(su, "sdpa" if impl == "sdpa" else op, B, T, pass_)
                        row[f"{impl}_bw_frac"] = moved / (r["ms"] * 1e-3) / su.bw
                if "ms" in ours and "ms" in peer:
                    row["seqlab_over_fla"] = ours["ms"] / peer["ms"]
                report.add("training", row)
                times = "  ".join(
                    f"{i} {r.get('ms', float('nan')):8.3f} ms"
                    for i, r in (("seqlab", ours), ("fla", peer), ("sdpa", s))
                )
                print(f"{op:11s} B={B} T={T:5d} {pass_:7s} {times}", flush=True)
                del x
                if su.cuda:
                    torch.cuda.empty_cache()


def sdpa_step(q, k, v, cache_k, cache_v, pos: int):
    """Append one token to the KV cache and attend to all pos + 1 positions."""
    cache_k[:, :, pos : pos + 1] = k
    cache_v[:, :, pos : pos + 1] = v
    return F.scaled_dot_product_attention(q, cache_k, cache_v)


def bench_decode(su: Setup, fla, report: Report, batches, contexts, ops, repeats: int):
    from seqlab.ops.triton.recurrent import fused_recurrent

    H, K = su.H, su.K
    for B in batches:
        for ctx in contexts:
            for op in ops:
                x = {n: t.detach() for n, t in make_inputs(su, op, B, 1, grad=False).items()}
                x["initial_state"] = torch.randn(B, H, K, K, device=su.device) * 0.1
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
                    if report.stopped(f"decode {impl} {op} B={B} context={ctx}"):
                        return
                    r = measure(su, f"{impl} step {op}", partial(ready, fn), repeats)
                    if "ms" in r:
                        r["bw_frac"] = 8 * B * H * K * K / (r["ms"] * 1e-3) / su.bw
                    report.add("decode", {"op": op, "B": B, "context": ctx, "impl": impl, **r})
            if report.stopped(f"decode sdpa B={B} context={ctx}"):
                return
            gen = torch.Generator(device=su.device).manual_seed(0)
            cache = [
                torch.randn(B, H, ctx + 1, K, generator=gen, device=su.device, dtype=su.dtype)
                for _ in range(2)
            ]
            q, k, v = (torch.randn(B, H, 1, K, device=su.device, dtype=su.dtype) for _ in range(3))
            step = partial(sdpa_step, q, k, v, *cache, ctx)
            r = measure(su, f"sdpa step {ctx}", partial(ready, step), repeats)
            if "ms" in r:
                moved = 2 * B * H * (ctx + 1) * K * su.dtype.itemsize
                r["bw_frac"] = moved / (r["ms"] * 1e-3) / su.bw
            report.add(
                "decode", {"op": "attention", "B": B, "context": ctx, "impl": "sdpa kv-cache", **r}
            )
            del cache


@contextlib.contextmanager
def launch_bytes():
    """While active, {kernel name: bytes its tensor arguments hold, summed over launches} for
    every Triton launch (compiled or interpreted, seqlab's or fla's, the kernel runs as usual).
    That is the traffic of a kernel reading or writing each argument once: a floor on what it
    moves, so bytes / time is a floor on the bandwidth it achieves."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: dict[str, int] = {}
    runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def recording(run):
        def record(self, *args, grid, warmup, **kwargs):
            if not warmup:
                tensors = {
                    a.data_ptr(): a.numel() * a.element_size()
                    for a in (*args, *kwargs.values())
                    if isinstance(a, torch.Tensor)
                }
                name = self.fn.__name__
                seen[name] = seen.get(name, 0) + sum(tensors.values())
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        return record

    for cls, run in runs.items():
        cls.run = recording(run)
    try:
        yield seen
    finally:
        for cls, run in runs.items():
            cls.run = run


def kernel_times(su: Setup, fn, calls: int) -> tuple[list[dict], dict[str, float]]:
    """torch.profiler over `calls` calls of fn (after two unprofiled ones): each kernel's µs per
    call (GPU kernels on CUDA; on a CPU, where the interpreter launches none, the aten ops), and
    each Triton kernel's argument bytes per call (launch_bytes). A kernel the profiler lists
    under its Triton name gets its bandwidth floor: `gbps` and `bw_frac` (of su.bw)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if su.cuda else lambda: None
    fn()
    fn()
    sync()
    activity = ProfilerActivity.CUDA if su.cuda else ProfilerActivity.CPU
    with launch_bytes() as moved, profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync()
    per_call = {name: b / calls for name, b in moved.items()}
    rows = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if su.cuda else e.self_cpu_time_total) / calls
        if us > 0:
            rows.append({"kernel": e.key, "launches": e.count / calls, "us": round(us, 1)})
    return with_bandwidth(sorted(rows, key=lambda r: -r["us"]), per_call, su.bw), per_call


def with_bandwidth(rows: list[dict], per_call: dict[str, float], bw: float) -> list[dict]:
    """Each profiler row whose kernel has argument bytes gets `gbps` and `bw_frac` (of bw)."""
    out = []
    for r in rows:
        if r["kernel"] in per_call:
            b = per_call[r["kernel"]]
            r = r | {"gbps": round(b / r["us"] / 1e3, 1), "bw_frac": b / (r["us"] * 1e-6) / bw}
        out.append(r)
    return out


def profile_kernels(su: Setup, fla, report: Report, ops, passes, shape, calls: int):
    """Where each op's time goes, kernel by kernel, at one shape (beside fla's when given)."""
    B, T = shape
    for op in ops:
        for pass_ in passes:
            impls = {"seqlab": partial(seqlab_op, op)}
            if fla is not None:
                impls["fla"] = fla[op]
            for impl, fn in impls.items():
                if report.stopped(f"profile {impl} {op} {pass_}"):
                    return
                row = {"op": op, "impl": impl, "B": B, "T": T, "pass": pass_}
                try:
                    x = make_inputs(su, op, B, T, grad=pass_ != "fwd")
                    kernels, moved = kernel_times(su, runner(fn, x, pass_), calls)
                    row["total_us"] = round(sum(k["us"] for k in kernels), 1)
                    row["kernels"] = kernels[:PROFILE_TOP]
                    row["launch_bytes"] = moved
                except Exception as e:
                    traceback.print_exc()
                    row["error"] = error_text(e)
                report.add("profile", row)


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    meta = data["meta"]
    fla = f"fla {meta['fla']}" if meta["fla"] else "no fla"
    lines = [] if data["complete"] else ["(partial run)", ""]
    lines += [
        f"seqlab Triton kernels vs {fla} vs SDPA; {meta['device']}; torch {meta['torch']}, "
        f"triton {meta['triton']}; {meta['dtype']}, H={meta['heads']}, K=V={meta['head_dim']}; "
        f"median of {meta['repeats']}; bandwidth as a fraction of {meta['bw'] / 1e12:.2f} TB/s; "
        f"{meta['date']}",
        "",
    ]
    if "stopped" in data:
        lines += [f"Stopped: {data['stopped']}.", ""]
    if checks := data["checks"]:
        B, T = meta["check_shape"]
        lines += [
            f"Correctness (Triton vs the PyTorch chunk form, B={B}, T={T}, max error / max "
            "|reference|):",
            "",
        ]
        cols = [c for c in dict.fromkeys(c for r in checks for c in r) if c != "ok"] + ["ok"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in checks]
        lines += [""]
    if training := data["training"]:
        lines += [
            "| op | B | T | pass | seqlab ms | fla ms | seqlab / fla | SDPA ms | seqlab BW "
            "| fla BW | seqlab first s | fla first s | seqlab GiB | fla GiB |",
            "|" + "---|" * 14,
        ]
        for r in training:
            lines.append(
                f"| {r['op']} | {r['B']} | {r['T']} | {r['pass']} "
                f"| {fmt(r.get('seqlab_ms'), '.3f')} | {fmt(r.get('fla_ms'), '.3f')} "
                f"| {fmt(r.get('seqlab_over_fla'), '.2f')} | {fmt(r.get('sdpa_ms'), '.3f')} "
                f"| {fmt(r.get('seqlab_bw_frac'), '.0%')} | {fmt(r.get('fla_bw_frac'), '.0%')} "
                f"| {fmt(r.get('seqlab_first_s'), '.2f')} | {fmt(r.get('fla_first_s'), '.2f')} "
                f"| {fmt(r.get('seqlab_peak_gib'), '.2f')} | {fmt(r.get('fla_peak_gib'), '.2f')} |"
            )
        errors = [(r, k) for r in training for k in r if k.endswith("_error")]
        lines += [f"- {r['op']} B={r['B']} T={r['T']} {r['pass']} {k}: {r[k]}" for r, k in errors]
        lines += [""]
    if compiles := data["compile"]:
        lines += ["Triton compile time per kernel (all variants; fla's includes autotuning):", ""]
        lines += ["| kernel | variants | compile s |", "|---|---|---|"]
        lines += [f"| {c['kernel']} | {c['variants']} | {c['compile_s']:.2f} |" for c in compiles]
        lines += [""]
    if profile := data["profile"]:
        B, T = profile[0]["B"], profile[0]["T"]
        lines += [
            f"Kernels (torch.profiler, B={B}, T={T}; µs per call, share of the op's, and for "
            "Triton kernels the bandwidth floor: argument bytes / time, as a fraction of "
            f"{data['meta']['bw'] / 1e12:.2f} TB/s):",
            "",
        ]
        lines += ["| op | pass | impl | total µs | kernels |", "|---|---|---|---|---|"]
        for r in profile:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['pass']} | {r['impl']} | – | {r['error']} |")
                continue
            total = r["total_us"]
            parts = "; ".join(
                f"{k['kernel']} {k['us']:.0f} ({k['us'] / total:.0%}"
                + (f", BW ≥ {k['bw_frac']:.0%})" if "bw_frac" in k else ")")
                for k in r["kernels"]
            )
            lines.append(f"| {r['op']} | {r['pass']} | {r['impl']} | {total:.0f} | {parts} |")
        lines += [""]
    if decode := data["decode"]:
        lines += ["Decode (one token, state or KV cache of `context` tokens):", ""]
        lines += ["| op | B | context | impl | µs | BW |", "|---|---|---|---|---|---|"]
        for r in decode:
            us = r["error"] if "error" in r else fmt(r["ms"] * 1e3, ".1f")
            lines.append(
                f"| {r['op']} | {r['B']} | {r['context']} | {r['impl']} | {us} "
                f"| {fmt(r.get('bw_frac'), '.0%')} |"
            )
        lines += [""]
    return "\n".join(lines)


def parse_shape(s: str) -> tuple[int, int]:
    """2x1000 → (2, 1000)."""
    try:
        B, T = map(int, s.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxT, e.g. 2x1000, got {s!r}") from None
    return B, T


def comma_list(item):
    """An argparse type: a comma-separated list of `item` (a converter, or a tuple of names)."""

    def parse(s: str) -> list:
        parts = [p.strip() for p in s.split(",") if p.strip()]
        if isinstance(item, tuple):
            if unknown := [p for p in parts if p not in item]:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(unknown)}; choose from {', '.join(item)}"
                )
            return [p for p in item if p in parts]  # the canonical order
        try:
            return [item(p) for p in parts]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for triton_gpu.json / .md")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: Triton's interpreter (needs TRITON_INTERPRET=1), a smoke test",
    )
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="of q, k, v")
    ap.add_argument("--heads", type=int, default=H, help="H")
    ap.add_argument("--head-dim", type=int, default=K, help="K = V")
    ap.add_argument(
        "--shapes", type=comma_list(parse_shape), default=SHAPES, help="BxT,... (training)"
    )
    ap.add_argument("--check-shape", type=parse_shape, default=CHECK_SHAPE, help="BxT")
    ap.add_argument("--contexts", type=comma_list(int), default=CONTEXTS, help="decode")
    ap.add_argument("--profile-shape", type=parse_shape, default=PROFILE_SHAPE, help="BxT")
    ap.add_argument("--profile-calls", type=int, default=PROFILE_CALLS, help="profiled calls")
    ap.add_argument(
        "--profile-fla",
        action="store_true",
        help="profile fla's kernels too (its first call autotunes: 40-100 s per op)",
    )
    ap.add_argument("--decode-batches", type=comma_list(int), default=DECODE_BATCHES)
    ap.add_argument(
        "--sections", type=comma_list(SECTIONS), default=SECTIONS, help=",".join(SECTIONS)
    )
    ap.add_argument("--ops", type=comma_list(OPS), default=OPS, help=",".join(OPS))
    ap.add_argument("--passes", type=comma_list(PASSES), default=PASSES, help=",".join(PASSES))
    ap.add_argument("--repeats", type=int, default=10, help="timed calls (decode: 10x)")
    ap.add_argument("--bw", type=float, default=3.35e12, help="peak memory bandwidth, bytes/s")
    ap.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no new row after this long; the files are still completed",
    )
    ap.add_argument("--no-fla", action="store_true", help="skip fla even if importable")
    ap.add_argument(
        "--fla-past-guard",
        action="store_true",
        help="time fla's gated backward where fla refuses it (Hopper, Triton 3.4-3.7.0): see "
        "load_fla",
    )
    ap.add_argument("--warm-cache", action="store_true", help="keep Triton's on-disk cache")
    ap.add_argument("--keep-going", action="store_true", help="time even if a check fails")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU (--device cpu runs Triton's interpreter)")
    if args.device == "cpu" and args.dtype == "bf16":
        ap.error("Triton's interpreter computes tl.dot on bfloat16 wrongly: --dtype fp32 or fp16")
    return args


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    if not args.warm_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    import triton

    # seqlab's kernels are decorated when first used, below, so the mode is still the
    # environment's: Triton reads TRITON_INTERPRET at each decoration
    if (args.device == "cpu") != triton.knobs.runtime.interpret:
        need = "set TRITON_INTERPRET=1" if args.device == "cpu" else "unset TRITON_INTERPRET"
        raise SystemExit(f"--device {args.device}: {need} in the environment")
    su = Setup(args.device, DTYPES[args.dtype], args.heads, args.head_dim, args.bw)
    log = CompileLog()
    log.install()
    fla = None if args.no_fla else load_fla(args.fla_past_guard)
    if su.cuda:
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.machine()}, Triton interpreter (timings mean nothing)"
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla["version"] if fla else None,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "heads": su.H,
        "head_dim": su.K,
        "sections": list(args.sections),
        "ops": list(args.ops),
        "passes": list(args.passes),
        "shapes": [list(s) for s in args.shapes],
        "check_shape": list(args.check_shape),
        "contexts": list(args.contexts),
        "profile_shape": list(args.profile_shape),
        "decode_batches": list(args.decode_batches),
        "repeats": args.repeats,
        "bw": args.bw,
        "time_limit_s": args.time_limit,
        "date": date.today().isoformat(),
    }
    deadline = None if args.time_limit is None else started + args.time_limit
    report = Report(args.out, meta, log, deadline)
    report.save()
    if "check" in args.sections:
        run_checks(su, fla, report, args.ops, args.check_shape)
        if any(c["ok"] != "yes" for c in report.data["checks"]) and not args.keep_going:
            why = "a Triton op differs from the PyTorch chunk form; no timings taken"
            report.stop(why)
            report.save(complete=True)
            print(json.dumps(report.data["checks"], indent=1))
            raise SystemExit(why)
    if "training" in args.sections:
        bench_training(su, fla, report, args.shapes, args.ops, args.passes, args.repeats)
    if "profile" in args.sections:
        peer = fla if args.profile_fla else None
        args_ = (args.ops, args.passes, args.profile_shape, args.profile_calls)
        profile_kernels(su, peer, report, *args_)
    if "decode" in args.sections:
        ops = [op for op in args.ops if op in DECODE_OPS]
        batches, contexts = args.decode_batches, args.contexts
        bench_decode(su, fla, report, batches, contexts, ops, args.repeats * 10)
    report.save(complete=True)
    print(markdown(report.data))


if __name__ == "__main__":
    main()
