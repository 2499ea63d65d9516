"""The Triton kernels on a GPU, checked and timed beside flash-linear-attention 0.6.0 and SDPA.

`bash benchmarks/gpu_run.sh` is the one command that runs this on a lent GPU machine (wheels, the
compiled kernel tests beside it, results folder, summary); this script is its body. From the
repository root on a machine with an NVIDIA GPU (torch with CUDA, triton 3.6.0; fla-core 0.6.0 an
optional peer, pure Python, installed beside the tree):

    PYTHONPATH=.:.bench_deps python benchmarks/bench_triton_gpu.py --out benchmarks/results/gpu

Sections, in this order (--sections chooses; each takes the --ops subset):
  * first: each op's first call, forward and then forward+backward, in a fresh Triton cache
    (compilation, and fla's autotuning), seqlab in this process before anything else compiles,
    fla's in one background process per op (--first-impl says whose a process times);
  * check: every kernel family against the PyTorch chunk form in float64 on the same rounded
    inputs, forward and backward (o, the final state and the gradient of every input, the
    initial state included): scalar gate, per-channel gate and the gated delta rule, each with
    an initial state at --check-shape, with strong decays, packed (cu_seqlens, sequences of
    length 1, one chunk and more, one state each), the fused recurrent step (decode, B = 8,
    T = 1) and the fused recurrent form over packed sequences; the delta rule also with negative
    eigenvalues (β in (0, 2)). In every --check-dtypes (bf16 and fp32 on a GPU), with fresh
    random inputs (--seed, recorded) and every tensor that torch.empty hands out filled with
    NaN while the Triton op runs (torch's deterministic mode), so an element a kernel never
    writes shows. Reported as max |error| / max |reference| per tensor against TOL. fla's
    forward and backward (bf16, no initial state) are held to the same reference. The dtypes
    after the first, and fla's first calls, run in background processes beside the first dtype
    (compilation is single-threaded; the machine has cores to spare) and are waited for before
    any timing; --serial runs them here, in turn;
  * training: with q, k, v in --dtype, float32 gates and β, H = --heads, K = V = --head-dim,
    (B, T) in --shapes: simple_gla (g [B, T, H]), gla (g [B, T, H, K]) and gated_delta (β,
    g [B, T, H]) through seqlab's backend="triton" op vs fla's chunk_simple_gla / chunk_gla /
    chunk_gated_delta_rule and causal SDPA, forward (no grad) and forward+backward; the median
    of --repeats calls (CUDA events) after a warm-up, the calls cycling through --input-sets
    sets of inputs (so no call finds its inputs in the 60 MB L2 by luck); achieved bandwidth:
    the bytes an op must at least move (read q, k, v, gates; write o; the backward also reads
    dO and writes every gradient) over its time, as a fraction of the device-to-device copy
    bandwidth measured at the start (--bw overrides);
  * decode: one fused recurrent step (T = 1 with a state) at each of --contexts (1K and 32K)
    and --decode-batches vs SDPA over a KV cache of that length (append one token, attend to
    all): the recurrent state is [K, V] per head whatever the context, the cache grows;
  * profile: each op's kernels under torch.profiler at --profile-shape, µs per call and share of
    the op (fla's too with --profile-fla), and per Triton kernel the bytes its tensor arguments
    hold over its time as a fraction of the copy bandwidth: a floor on what it achieves.
--tests-workers N also runs tests/ops/triton (compiled, bfloat16 added) under pytest-xdist in N
background processes beside the checks, its log in --out/tests.log.

Output: triton_gpu.json and triton_gpu.md in --out, rewritten (atomically) after every finished
row, so a run killed midway keeps what it measured; "complete" is false (the markdown starts with
"(partial run)") until the script ends on its own, and "stopped" says why sections are missing.
A short summary is printed last. --time-limit S starts no new row once S seconds have passed
since the script's start; background processes are ended at --background-limit (default 55 %
of S). A failed check stops before any timing and exits 1 (--keep-going times anyway and exits
1 at the end).

fla 0.6.0 refuses its gated backward on Hopper with the GPU image's Triton 3.6.0 (fla #640);
--fla-past-guard lifts that one check so its kernels run, and the check rows show what its
gradients are worth (load_fla says how).

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
import dataclasses
import itertools
import json
import math
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.files import write_text_atomic
from seqlab.ops import delta_rule, gated_linear

ROOT = Path(__file__).resolve().parents[1]

# Defaults of the command-line options.
H, K = 16, 128  # heads, key dim; V = K
SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 32768)]
CHECK_SHAPE = (2, 2000)  # not a multiple of the chunk: the last chunk is partial
CONTEXTS = (1024, 32768)
DECODE_BATCHES = (1, 8)
DECODE_CHECK_BATCH = 8

OPS = ("simple_gla", "gla", "gated_delta")
DECODE_OPS = ("simple_gla", "gated_delta")  # the ops fla has a fused recurrent step for
PASSES = ("fwd", "fwd+bwd")
SECTIONS = ("first", "check", "training", "decode", "profile")  # in the order they run
IMPLS = ("seqlab", "fla")
PROFILE_SHAPE = (2, 8192)
PROFILE_CALLS = 5
PROFILE_TOP = 8  # kernels listed per (op, pass, implementation)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Max |error| / max |reference| of each tensor against the float64 PyTorch chunk form on the same
# rounded inputs. float32: the kernels multiply in IEEE float32 (no tf32), so round-off, grown
# over T = 2000 and strong decays (the kernel tests' 1e-5 holds at their short lengths). Half
# inputs: the state accumulates in float32 but the tensor-core products take operands in the
# input dtype (decayed keys, pseudo-values, per-chunk states), as the kernel tests allow.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
SPEED_TARGET = 0.8  # seqlab's time at most this times fla's (the issue's target)
FIRST_CALL_TARGET_S = 10.0


@dataclass(frozen=True)
class Setup:
    """What every measurement shares: where the tensors live, their dtype and head sizes."""

    device: str
    dtype: torch.dtype
    H: int
    K: int  # = V
    bw: float  # device-to-device copy bandwidth, bytes/s (read + written)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


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
    import) so the same kernels run and can be timed; the check section shows what their
    gradients are then worth, and the results say the guard was lifted."""
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
        version += " (past its Hopper guard: gated backward run, see the check rows)"
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
    if op != "gated_delta":
        kw.pop("allow_neg_eigval", None)
    return fn(**x, backend=backend, check_values=False, **kw)


def seqlab_op(op: str, x: dict):
    return run_op(op, x, "triton")[0]


def seqlab_step(op: str, x: dict):
    return run_op(op, x, "triton", form="recurrent", output_final_state=True)


def make_inputs(
    su: Setup,
    op: str,
    B: int,
    T: int,
    grad: bool,
    seed: int = 0,
    gates: str = "default",
    neg_eig: bool = False,
    states: int = 0,
) -> dict:
    """q, k, v [B, T, H, K] in su.dtype (unit keys for the delta rule); log-gates and β float32.

    gates "default": median ≈ −0.05 (/16 per channel), as a freshly initialised model;
    "strong": logsigmoid(2 z − 1), median ≈ −1.3 with a tail past −7, per channel too, as
    trained models' fast-forgetting heads. neg_eig: β in (0, 2). states > 0: an initial state
    [states, H, K, K] in float32."""
    gen = torch.Generator(device=su.device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=su.device)

    x = {"q": randn(B, T, su.H, su.K), "k": randn(B, T, su.H, su.K), "v": randn(B, T, su.H, su.K)}
    if op == "gated_delta":
        x["k"] = F.normalize(x["k"], dim=-1)
    x = {n: t.to(su.dtype) for n, t in x.items()}
    gate_shape = (B, T, su.H, su.K) if op == "gla" else (B, T, su.H)
    if gates == "strong":
        x["g"] = F.logsigmoid(2 * randn(*gate_shape) - 1)
    else:
        x["g"] = F.logsigmoid(randn(*gate_shape) + 3) / (16 if op == "gla" else 1)
    if op == "gated_delta":
        x["beta"] = torch.sigmoid(randn(B, T, su.H)) * (2 if neg_eig else 1)
    if states:
        x["initial_state"] = randn(states, su.H, su.K, su.K) * 0.5
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def input_sets(su: Setup, op: str, B: int, T: int, grad: bool, n: int) -> list[dict]:
    return [make_inputs(su, op, B, T, grad, seed=i) for i in range(n)]


def sdpa_inputs(su: Setup, B: int, T: int, grad: bool, n: int = 1) -> list[dict]:
    gen = torch.Generator(device=su.device).manual_seed(0)
    shape = (B, su.H, T, su.K)
    return [
        {
            name: torch.randn(
                shape, generator=gen, device=su.device, dtype=su.dtype
            ).requires_grad_(grad)
            for name in ("q", "k", "v")
        }
        for _ in range(n)
    ]


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


def elapsed_ms(cuda: bool, fn) -> float:
    """One call of fn in ms: CUDA events around it on a GPU, perf_counter on a CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy of nbytes, bytes read plus written per second: the median of
    `repeats` copies after three warm-ups (CUDA events; perf_counter on a CPU). The ceiling the
    bandwidth fractions are taken of, measured on the machine that is timed."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = [elapsed_ms(device == "cuda", partial(dst.copy_, src)) for _ in range(3 + repeats)]
    return 2 * src.numel() * 4 / (statistics.median(ms[3:]) * 1e-3)


def time_call(su: Setup, fn, repeats: int) -> dict:
    """The first call (compilation, autotuning where not done yet) in seconds, then the median of
    `repeats` calls after one warm-up, in ms (CUDA events; perf_counter on a CPU), and the peak
    memory of one call (None on a CPU)."""
    su.sync()
    t0 = time.perf_counter()
    fn()
    su.sync()
    first = time.perf_counter() - t0
    fn()
    if su.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = [elapsed_ms(su.cuda, fn) for _ in range(repeats)]
    peak = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if su.cuda else None
    return {"first_s": round(first, 3), "ms": statistics.median(times), "peak_gib": peak}


def runner(impl, xs: list[dict] | dict, pass_: str):
    """A call of impl for time_call; each call takes the next of the input sets xs, in turn."""
    xs = [xs] if isinstance(xs, dict) else xs
    turn = itertools.cycle(range(len(xs)))
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                impl(xs[next(turn)])

        return fwd
    # o has v's shape and dtype (q, k, v [B, T, H, D]; SDPA's [B, H, T, D]); calling impl here
    # to get it would compile the forward before time_call measures the first call
    dos = [torch.randn_like(x["v"].detach()) for x in xs]

    def fwd_bwd():
        i = next(turn)
        impl(xs[i]).backward(dos[i])
        for t in xs[i].values():
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
    """max |a − b| / max |b|; NaN when a holds a NaN or an infinity (a poisoned element)."""
    a, b = a.detach().double(), b.detach().to(a.device).double()
    if not torch.isfinite(a).all():
        return math.nan
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(ours: dict, ref: dict, tol: float) -> tuple[dict[str, float], str]:
    """Each tensor's max error / max |reference|, and "yes" or which of them exceed `tol` (a NaN
    error does)."""
    errs = {n: rel_err(ours[n], ref[n]) for n in ref}
    bad = [n for n, e in errs.items() if not e <= tol]
    return errs, "yes" if not bad else f"NO: {', '.join(bad)} > {tol:g}"


@dataclass(frozen=True)
class Case:
    """One correctness check: an op, its gates and the form and layout it runs in."""

    name: str
    op: str
    gates: str = "default"  # or "strong" (make_inputs)
    neg_eig: bool = False  # β in (0, 2), allow_neg_eigval
    packed: bool = False  # one row of sequences of uneven lengths (cu_seqlens)
    form: str = "chunk"  # "recurrent": the fused kernel, forward only
    decode: bool = False  # B = DECODE_CHECK_BATCH, T = 1: one decode step

    @property
    def grad(self) -> bool:
        return self.form == "chunk"


def check_cases(ops) -> list[Case]:
    """Every kernel family in every layout the models call it in."""
    cases = []
    for op in ops:
        cases += [Case(op, op), Case(f"{op} strong", op, gates="strong")]
        if op == "gated_delta":
            cases.append(Case(f"{op} neg-eig", op, neg_eig=True))
        cases.append(Case(f"{op} packed", op, packed=True))
        cases.append(Case(f"{op} decode", op, form="recurrent", decode=True))
        if op == "gated_delta":
            cases.append(
                Case(f"{op} neg-eig decode", op, neg_eig=True, form="recurrent", decode=True)
            )
        cases.append(Case(f"{op} recurrent packed", op, form="recurrent", packed=True))
    return cases


def packed_offsets(total: int) -> list[int]:
    """Boundaries of packed sequences in `total` tokens: lengths 1, 64 (one chunk), 37, then the
    rest in two uneven parts (those that fit)."""
    cuts = {0, 1, 65, 102, 102 + (total - 102) * 3 // 7, total}
    return sorted(c for c in cuts if 0 <= c <= total)


@contextlib.contextmanager
def poisoned():
    """While active, every tensor torch.empty (and its kin) hands out is filled with NaN, the
    integer ones with their maximum (torch's deterministic mode with fill_uninitialized_memory;
    warn_only, so an op without a deterministic kernel still runs): an output element a kernel
    never writes reads NaN and fails the check."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def case_inputs(su: Setup, case: Case, B: int, T: int, seed: int) -> tuple[dict, dict]:
    """The case's inputs (an initial state per sequence) and the op's keyword arguments."""
    kw = {"form": case.form, "output_final_state": True, "allow_neg_eigval": case.neg_eig}
    if case.decode:
        B, T = DECODE_CHECK_BATCH, 1
    states = B
    if case.packed:
        cu = packed_offsets(B * T)
        B, T, states = 1, B * T, len(cu) - 1
        kw["cu_seqlens"] = torch.tensor(cu)
    x = make_inputs(su, case.op, B, T, False, seed, case.gates, case.neg_eig, states)
    return x, kw


NAMES = {"initial_state": "h0"}  # gradient names in the tables: dh0


def run_case(op: str, x: dict, backend: str, kw: dict, grad: bool, weights: dict) -> dict:
    """o, the final state and (grad) the gradient of every input under the fixed random weights
    `weights` (float64 values the inputs' dtype holds exactly, so both sides get the same dO)."""
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items()}
    o, s = run_op(op, leaves, backend, **kw)
    out = {"o": o} if s is None else {"o": o, "state": s}
    if grad:
        loss = (o.double() * weights["o"]).sum()
        if s is not None:
            loss = loss + (s.double() * weights["state"]).sum()
        loss.backward()
        out |= {f"d{NAMES.get(n, n)}": t.grad for n, t in leaves.items()}
    return out


def loss_weights(ref: dict, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator(device=ref["o"].device).manual_seed(seed + 7)
    return {
        n: torch.randn(t.shape, generator=gen, device=t.device).to(dtype).double()
        for n, t in ref.items()
        if n in ("o", "state")
    }


def reference(op: str, x: dict, kw: dict, grad: bool, seed: int, dtype: torch.dtype):
    """The PyTorch chunk form in float64 on x's (rounded) values, and the loss weights."""
    x64 = {n: t.detach().double() for n, t in x.items()}
    kw64 = kw | {"form": "chunk"}
    with torch.no_grad():
        o, s = run_op(op, x64, "torch", **kw64)
    w = loss_weights({"o": o} if s is None else {"o": o, "state": s}, dtype, seed)
    return run_case(op, x64, "torch", kw64, grad, w), w


def checked(row: dict, run, tol: float) -> dict:
    """row with each tensor's error and "ok": run() returns (ours, reference); an exception fails
    the row, with its message."""
    try:
        ours, ref = run()
        errs, ok = compare(ours, ref, tol)
        row |= {n: f"{e:.1e}" for n, e in errs.items()}
    except Exception as e:
        traceback.print_exc()
        ok = f"NO: {error_text(e)}"
    return {**row, "tol": tol, "ok": ok}


def check_case(su: Setup, case: Case, B: int, T: int, seed: int) -> dict:
    """One row: seqlab's Triton op (poisoned outputs) vs the float64 PyTorch chunk form."""
    row = {"case": case.name, "impl": "seqlab", "dtype": DTYPE_NAMES[su.dtype]}

    def run():
        x, kw = case_inputs(su, case, B, T, seed)
        row.update(B=x["q"].shape[0], T=x["q"].shape[1])
        ref, w = reference(case.op, x, kw, case.grad, seed, su.dtype)
        with poisoned():
            ours = run_case(case.op, x, "triton", kw, case.grad, w)
            su.sync()
        return ours, ref

    return checked(row, run, TOL[su.dtype])


def check_fla(su: Setup, fla, op: str, B: int, T: int, seed: int) -> dict:
    """fla's op (forward and backward; no initial or final state, as timed) vs the same float64
    reference as seqlab's rows."""
    row = {"case": op, "impl": "fla", "dtype": DTYPE_NAMES[su.dtype], "B": B, "T": T}

    def run():
        x = make_inputs(su, op, B, T, False, seed)
        ref, w = reference(op, x, {"output_final_state": False}, True, seed, su.dtype)
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
        with poisoned():
            o = fla[op](leaves)
            (o.double() * w["o"]).sum().backward()
            su.sync()
        return {"o": o, **{f"d{n}": t.grad for n, t in leaves.items()}}, ref

    return checked(row, run, TOL[su.dtype])


def run_checks(su: Setup, report: Report, ops, shape: tuple[int, int], dtypes, seed: int):
    for dtype in dtypes:
        sd = dataclasses.replace(su, dtype=DTYPES[dtype])
        for case in check_cases(ops):
            if report.stopped(f"check {case.name} {dtype}"):
                return
            row = check_case(sd, case, *shape, seed)
            print(f"check {case.name:28s} {dtype:5s} {row['ok']}", flush=True)
            report.add("checks", row)


def run_fla_checks(su: Setup, fla, report: Report, ops, shape: tuple[int, int], seed: int):
    for op in [op for op in ops if op in fla]:
        if report.stopped(f"check fla {op}"):
            return
        row = check_fla(su, fla, op, *shape, seed)
        print(f"check fla {op:24s} {row['dtype']:5s} {row['ok']}", flush=True)
        report.add("checks", row)


def first_calls(su: Setup, fla, report: Report, ops, impl: str, shape: tuple[int, int]):
    """Each op's first forward (no grad) and then its first forward+backward, at `shape`, in
    seconds: compilation (and fla's autotuning) of whatever an earlier call did not already
    build. Run before anything else compiles, in a fresh Triton cache."""
    B, T = shape
    for op in ops:
        if report.stopped(f"first call {impl} {op}"):
            return
        row = {"op": op, "impl": impl, "B": B, "T": T}
        fn = partial(seqlab_op, op) if impl == "seqlab" else fla[op]
        try:
            x = make_inputs(su, op, B, T, grad=True)
            su.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x)
            su.sync()
            row["fwd_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            fn(x).backward(torch.randn_like(x["v"]))
            su.sync()
            row["bwd_s"] = round(time.perf_counter() - t0, 2)
            row["total_s"] = round(row["fwd_s"] + row["bwd_s"], 2)
        except Exception as e:
            traceback.print_exc()
            row["error"] = error_text(e)
        print(f"first call {impl} {op}: {row}", flush=True)
        report.add("first_call", row)
        if impl == "fla" and op in DECODE_OPS:
            # not timed: compiles fla's decode step in this background process, so the process
            # that times it only tunes it
            with contextlib.suppress(Exception):
                x = make_inputs(su, op, 1, 1, grad=False, states=1)
                fn = fla[f"step_{op}"]
                fn({n: t.detach() for n, t in x.items()})


class Background:
    """Processes that run beside the checks (other check dtypes, fla's first calls, the compiled
    kernel tests): compilation is single-threaded, and the machine has cores to spare. Each
    runs in its own process group, so ending it ends its workers too."""

    def __init__(self):
        self.jobs: list[dict] = []
        self.dir = Path(tempfile.mkdtemp(prefix="bench-jobs-"))

    def start(self, name: str, cmd: list[str], log: Path, result: Path | None = None, env=None):
        f = open(log, "w")  # noqa: SIM115 (closed in wait)
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        job = {"name": name, "proc": proc, "log": log, "result": result, "file": f}
        self.jobs.append(job | {"t0": time.perf_counter()})
        print(f"background: {name} started", flush=True)

    def wait(self, deadline: float | None) -> list[dict]:
        """Wait for every job, ending those still running at `deadline` (perf_counter s); one
        status row each, with the last line of its log."""
        rows = []
        for job in self.jobs:
            proc = job["proc"]
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                rc, cut = proc.wait(timeout), False
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                rc, cut = proc.wait(), True
            job["file"].close()
            lines = [line for line in job["log"].read_text(errors="replace").splitlines() if line]
            row = {"job": job["name"], "rc": rc, "cut": cut}
            row |= {"seconds": round(time.perf_counter() - job["t0"], 1)}
            row["last_line"] = lines[-1][:300] if lines else ""
            rows.append(row)
            print(f"background: {row}", flush=True)
        return rows

    def kill(self):
        """End every job still running (this process is ending early)."""
        for job in self.jobs:
            if job["proc"].poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job["proc"].pid, 9)

    def results(self) -> list[tuple[str, dict]]:
        """Each finished or ended job's report (what it wrote before it ended)."""
        out = []
        for job in self.jobs:
            path = job["result"]
            if path is not None and path.exists():
                out.append((job["name"], json.loads(path.read_text())))
        return out


def job_command(args, su: Setup, seed: int, out: Path, extra: list[str]) -> list[str]:
    """This script in a background process: the same machine settings, the Triton cache of this
    process (--warm-cache keeps the inherited TRITON_CACHE_DIR), no jobs of its own."""
    shapes = ",".join(f"{B}x{T}" for B, T in args.shapes)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    cmd += ["--dtype", args.dtype, "--heads", str(su.H), "--head-dim", str(su.K)]
    cmd += ["--shapes", shapes, "--check-shape", "x".join(map(str, args.check_shape))]
    cmd += ["--seed", str(seed), "--bw", repr(su.bw), "--serial", "--keep-going", "--warm-cache"]
    cmd += ["--out", str(out), *extra]
    if args.fla_past_guard:
        cmd.append("--fla-past-guard")
    if args.fla_ops is not None:
        cmd += ["--fla-ops", ",".join(args.fla_ops)]
    return cmd


def start_background(args, su: Setup, fla, seed: int, limit: float | None) -> Background:
    bg = Background()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    timed = [] if limit is None else ["--time-limit", f"{limit:.0f}"]
    if "check" in args.sections:
        for dtype in args.check_dtypes[1:]:
            out = bg.dir / f"check-{dtype}"
            extra = ["--sections", "check", "--check-dtypes", dtype, "--no-fla", *timed]
            extra += ["--ops", ",".join(args.ops)]
            cmd = job_command(args, su, seed, out, extra)
            bg.start(
                f"check {dtype}", cmd, bg.dir / f"check-{dtype}.log", out / "triton_gpu.json", env
            )
    if "first" in args.sections and fla is not None:
        # fla's autotuning results stay in its process, so this one tunes afresh, uncontended,
        # unless --share-autotuning (then this one loads them: no second tuning)
        fla_env = env | {"FLA_CACHE_RESULTS": "1" if args.share_autotuning else "0"}
        for op in [op for op in args.ops if op in fla]:
            out = bg.dir / f"fla-first-{op}"
            extra = ["--sections", "first", "--first-impl", "fla", "--ops", op, *timed]
            cmd = job_command(args, su, seed, out, extra)
            bg.start(
                f"fla first call {op}",
                cmd,
                bg.dir / f"fla-{op}.log",
                out / "triton_gpu.json",
                fla_env,
            )
    if args.tests_workers:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=20"]
        cmd += ["-n", str(args.tests_workers), "tests/ops/triton"]
        bg.start("tests/ops/triton", cmd, args.out / "tests.log", None, env)
    return bg


def finish_background(bg: Background, report: Report, deadline: float | None):
    """Wait for the background processes (ending them at deadline) and take in their rows."""
    report.data["background"] = bg.wait(deadline)
    for name, data in bg.results():
        for section in ("checks", "first_call"):
            report.data[section] += data.get(section, [])
        if data.get("stopped"):
            report.data.setdefault("background_stopped", []).append(f"{name}: {data['stopped']}")
    first = report.data["first_call"]
    for status in report.data["background"]:
        op = status["job"].removeprefix("fla first call ")
        if op != status["job"] and not any(r["impl"] == "fla" and r["op"] == op for r in first):
            # ended before its row: the first call took longer than the job had, or it failed
            if status["cut"]:
                why = f"cut at the background limit after {status['seconds']:.0f} s"
            else:
                why = f"ended (exit {status['rc']}) before its row: {status['last_line']}"
            first.append({"op": op, "impl": "fla", "error": why})
    report.save()


class Report:
    """Everything measured so far, rewritten to --out after every finished row (a run killed
    midway keeps its rows); "complete" turns true only when the run ends on its own."""

    SECTIONS = ("first_call", "checks", "training", "decode", "profile")

    def __init__(self, out: Path, meta: dict, log: CompileLog, deadline: float | None):
        self.out, self.log, self.deadline = out, log, deadline  # deadline: perf_counter seconds
        self.data = {"complete": False, "meta": meta} | {s: [] for s in self.SECTIONS}
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


def bench_training(su: Setup, fla, report: Report, shapes, ops, passes, repeats: int, sets: int):
    for B, T in shapes:
        for pass_ in passes:
            s = None  # SDPA's time on this (B, T, pass), measured with the first row
            for op in ops:
                if report.stopped(f"training {op} B={B} T={T} {pass_}"):
                    return
                grad = pass_ != "fwd"
                if s is None:
                    attn = partial(runner, sdpa, sdpa_inputs(su, B, T, grad, sets), pass_)
                    s = measure(su, f"sdpa {B}x{T} {pass_}", attn, repeats)
                xs = input_sets(su, op, B, T, grad, sets)
                ours = measure(
                    su, f"seqlab {op}", partial(runner, partial(seqlab_op, op), xs, pass_), repeats
                )
                peer = {}
                if fla is not None and op in fla:
                    peer = measure(su, f"fla {op}", partial(runner, fla[op], xs, pass_), repeats)
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
                del xs
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
                if fla is not None and f"step_{op}" in fla:
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
            if fla is not None and op in fla:
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


def table(rows: list[dict], cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines + [""]


def summary(data: dict) -> str:
    """The run in a few lines: checks passed, seqlab / fla per shape, first calls, decode."""
    meta = data["meta"]
    lines = [
        f"Summary: {meta['device']}, {meta['dtype']} timings, copy bandwidth "
        f"{meta['bw'] / 1e12:.2f} TB/s ({meta.get('bw_source', 'given')})",
        "",
    ]
    for impl in IMPLS:
        rows = [c for c in data["checks"] if c.get("impl", "seqlab") == impl]
        if not rows:
            continue
        bad = [c for c in rows if c["ok"] != "yes"]
        dtypes = ", ".join(sorted({c["dtype"] for c in rows}))
        line = f"- correctness, {impl} ({dtypes}): {len(rows) - len(bad)} of {len(rows)} pass"
        if bad:
            why = [f"{c['case']} {c['dtype']} {c['ok'][:70]}" for c in bad]
            line += "; failing: " + "; ".join(why)
        lines.append(line)
    if first := data["first_call"]:
        parts = []
        for r in first:
            got = fmt(r.get("total_s"), ".1f") + " s" if "total_s" in r else r.get("error", "–")
            parts.append(f"{r['impl']} {r['op']} {got[:70]}")
        lines.append(
            f"- first call (forward, then forward+backward, cold cache): {'; '.join(parts)}"
        )
    for bg in data.get("background", []):
        state = "cut at the background limit" if bg["cut"] else f"exit {bg['rc']}"
        line = f"- background {bg['job']}: {state}, {bg['seconds']:.0f} s"
        if bg["job"].startswith("tests"):
            line += f": {bg['last_line']}"
        lines.append(line)
    lines.append("")
    if training := data["training"]:
        shapes = list(dict.fromkeys((r["B"], r["T"]) for r in training))
        keys = list(dict.fromkeys((r["op"], r["pass"]) for r in training))
        at = {(r["op"], r["pass"], r["B"], r["T"]): r for r in training}
        cols = ["op", "pass", *[f"{B}x{T}" for B, T in shapes], f"≤ {SPEED_TARGET}× fla"]
        rows = []
        for op, pass_ in keys:
            ratios = [at.get((op, pass_, B, T), {}).get("seqlab_over_fla") for B, T in shapes]
            row = {"op": op, "pass": pass_}
            row |= {f"{B}x{T}": fmt(x, ".2f") for (B, T), x in zip(shapes, ratios, strict=True)}
            got = [x for x in ratios if x is not None]
            row[cols[-1]] = f"{sum(x <= SPEED_TARGET for x in got)} of {len(got)}" if got else "–"
            rows.append(row)
        lines += ["seqlab time / fla time (below 1: seqlab faster):", ""] + table(rows, cols)
    if decode := data["decode"]:
        rows = {}
        for r in decode:
            if r["impl"] in ("seqlab op", "fla", "sdpa kv-cache"):
                key = (r["op"], r["impl"], r["B"])
                us = r["error"][:40] if "error" in r else fmt(r["ms"] * 1e3, ".1f")
                rows.setdefault(key, {"op": r["op"], "impl": r["impl"], "B": r["B"]})
                rows[key][f"µs at {r['context']}"] = us
        cols = ["op", "impl", "B", *[f"µs at {c}" for c in meta["contexts"]]]
        lines += ["Decode, one token:", ""] + table(list(rows.values()), cols)
    return "\n".join(lines)


CHECK_COLS = ["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def markdown(data: dict) -> str:
    meta = data["meta"]
    fla = f"fla {meta['fla']}" if meta["fla"] else "no fla"
    lines = [] if data["complete"] else ["(partial run)", ""]
    lines += [
        f"seqlab Triton kernels vs {fla} vs SDPA; {meta['device']}; torch {meta['torch']}, "
        f"triton {meta['triton']}, Python {meta['python']}; timings {meta['dtype']}, "
        f"H={meta['heads']}, K=V={meta['head_dim']}; median of {meta['repeats']} over "
        f"{meta.get('input_sets', 1)} input sets; bandwidth as a fraction of "
        f"{meta['bw'] / 1e12:.2f} TB/s; seed {meta.get('seed')}; {meta['date']}",
        "",
    ]
    if "stopped" in data:
        lines += [f"Stopped: {data['stopped']}.", ""]
    lines += [summary(data), ""]
    if first := data["first_call"]:
        lines += [
            "First call in a fresh Triton cache, seconds (forward, then forward+backward):",
            "",
        ]
        lines += table(first, ["op", "impl", "B", "T", "fwd_s", "bwd_s", "total_s", "error"])
    if checks := data["checks"]:
        lines += [
            "Correctness: max |error| / max |reference| per tensor against the PyTorch chunk "
            "form in float64 on the same rounded inputs; outputs poisoned with NaN:",
            "",
        ]
        present = [c for c in CHECK_COLS if any(c in r for r in checks)]
        lines += table(checks, ["case", "impl", "dtype", "B", "T", *present, "tol", "ok"])
    if bg := data.get("background"):
        lines += ["Background processes:", ""]
        lines += table(bg, ["job", "rc", "cut", "seconds", "last_line"])
    for s in data.get("background_stopped", []):
        lines += [f"Background stopped: {s}", ""]
    if training := data["training"]:
        lines += [
            "| op | B | T | pass | seqlab ms | fla ms | seqlab / fla | SDPA ms | seqlab BW "
            "| fla BW | SDPA BW | seqlab GiB | fla GiB |",
            "|" + "---|" * 13,
        ]
        for r in training:
            lines.append(
                f"| {r['op']} | {r['B']} | {r['T']} | {r['pass']} "
                f"| {fmt(r.get('seqlab_ms'), '.3f')} | {fmt(r.get('fla_ms'), '.3f')} "
                f"| {fmt(r.get('seqlab_over_fla'), '.2f')} | {fmt(r.get('sdpa_ms'), '.3f')} "
                f"| {fmt(r.get('seqlab_bw_frac'), '.0%')} | {fmt(r.get('fla_bw_frac'), '.0%')} "
                f"| {fmt(r.get('sdpa_bw_frac'), '.0%')} "
                f"| {fmt(r.get('seqlab_peak_gib'), '.2f')} | {fmt(r.get('fla_peak_gib'), '.2f')} |"
            )
        errors = [(r, k) for r in training for k in r if k.endswith("_error")]
        lines += [f"- {r['op']} B={r['B']} T={r['T']} {r['pass']} {k}: {r[k]}" for r, k in errors]
        lines += [""]
    if compiles := data["compile"]:
        lines += ["Triton compile time per kernel, this process (fla's includes autotuning):", ""]
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
    if B < 1 or T < 1:
        raise argparse.ArgumentTypeError(f"B and T must be at least 1, got {s!r}")
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


def ordered_names(names: tuple):
    """An argparse type: a comma-separated list of `names` in the order given (repeats dropped)."""

    def parse(s: str) -> list:
        parts = list(dict.fromkeys(p.strip() for p in s.split(",") if p.strip()))
        if unknown := [p for p in parts if p not in names]:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(names)}"
            )
        if not parts:
            raise argparse.ArgumentTypeError("expected at least one name")
        return parts

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
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="of q, k, v (timings)")
    ap.add_argument(
        "--check-dtypes",
        type=ordered_names(tuple(DTYPES)),
        help="dtypes the check section runs in (default: bf16,fp32 on a GPU, --dtype on a CPU); "
        "the first here, the others in background processes",
    )
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
        help="profile fla's kernels too (after the training section has autotuned them)",
    )
    ap.add_argument("--decode-batches", type=comma_list(int), default=DECODE_BATCHES)
    ap.add_argument(
        "--sections", type=comma_list(SECTIONS), default=SECTIONS, help=",".join(SECTIONS)
    )
    ap.add_argument(
        "--first-impl",
        choices=(*IMPLS, "none"),
        default="seqlab",
        help="whose first calls the first section times here (fla's run in background "
        "processes unless --serial); none: only fla's, in the background",
    )
    ap.add_argument(
        "--fla-ops",
        type=comma_list(OPS),
        help="the ops fla is run for (default: all of --ops); the others time seqlab and SDPA",
    )
    ap.add_argument(
        "--share-autotuning",
        action="store_true",
        help="the background processes' fla autotuning results are kept and loaded here (no "
        "second tuning; tuned beside other processes)",
    )
    ap.add_argument("--ops", type=comma_list(OPS), default=OPS, help=",".join(OPS))
    ap.add_argument("--passes", type=comma_list(PASSES), default=PASSES, help=",".join(PASSES))
    ap.add_argument("--repeats", type=int, default=10, help="timed calls (decode: 10x)")
    ap.add_argument("--input-sets", type=int, default=3, help="input sets the timed calls cycle")
    ap.add_argument(
        "--bw",
        type=float,
        help="memory bandwidth, bytes/s, the fractions are taken of (default: a device-to-device "
        "copy measured at the start)",
    )
    ap.add_argument("--seed", type=int, help="of the check inputs (default: a fresh one, recorded)")
    ap.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no new row after this long; the files are still completed",
    )
    ap.add_argument(
        "--background-limit",
        type=float,
        metavar="SECONDS",
        help="end background processes this long after the start (default: 55%% of "
        "--time-limit, else none)",
    )
    ap.add_argument(
        "--tests-workers",
        type=int,
        default=0,
        help="also run tests/ops/triton beside the checks in this many pytest-xdist processes",
    )
    ap.add_argument(
        "--serial", action="store_true", help="no background processes: everything here, in turn"
    )
    ap.add_argument("--no-fla", action="store_true", help="skip fla even if importable")
    ap.add_argument(
        "--fla-past-guard",
        action="store_true",
        help="run fla's gated backward where fla refuses it (Hopper, Triton 3.4-3.7.0): see "
        "load_fla",
    )
    ap.add_argument("--warm-cache", action="store_true", help="keep Triton's on-disk cache")
    ap.add_argument("--keep-going", action="store_true", help="time even if a check fails")
    args = ap.parse_args(argv)
    for name in ("repeats", "input_sets", "profile_calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.tests_workers < 0:
        ap.error(f"--tests-workers must be 0 or more, got {args.tests_workers}")
    if args.check_dtypes is None:
        args.check_dtypes = ["bf16", "fp32"] if args.device == "cuda" else [args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU (--device cpu runs Triton's interpreter)")
    if args.device == "cpu" and "bf16" in (args.dtype, *args.check_dtypes):
        ap.error("Triton's interpreter computes tl.dot on bfloat16 wrongly: --dtype fp32 or fp16")
    if args.background_limit is None and args.time_limit is not None:
        args.background_limit = 0.55 * args.time_limit
    return args


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    # `timeout` (gpu_run.sh's hard limit) ends this process with SIGTERM: unwind, so that the
    # background processes, each in a session of its own, are ended too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.warm_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    import triton

    # seqlab's kernels are decorated when first used, below, so the mode is still the
    # environment's: Triton reads TRITON_INTERPRET at each decoration
    if (args.device == "cpu") != triton.knobs.runtime.interpret:
        need = "set TRITON_INTERPRET=1" if args.device == "cpu" else "unset TRITON_INTERPRET"
        raise SystemExit(f"--device {args.device}: {need} in the environment")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    if args.bw is None:
        nbytes = 2**31 if args.device == "cuda" else 2**24
        bw = copy_bandwidth(args.device, nbytes)
        bw_source = f"copy of {nbytes / 2**20:.0f} MiB on the device, measured in this run"
    else:
        bw, bw_source = args.bw, "given"
    su = Setup(args.device, DTYPES[args.dtype], args.heads, args.head_dim, bw)
    log = CompileLog()
    log.install()
    fla = None if args.no_fla else load_fla(args.fla_past_guard)
    if fla is not None and args.fla_ops is not None:
        keep = {"version", *args.fla_ops, *(f"step_{op}" for op in args.fla_ops)}
        fla = {k: v for k, v in fla.items() if k in keep}
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
        "check_dtypes": list(args.check_dtypes),
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
        "input_sets": args.input_sets,
        "seed": seed,
        "bw": bw,
        "bw_source": bw_source,
        "time_limit_s": args.time_limit,
        "background_limit_s": args.background_limit,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": date.today().isoformat(),
    }
    deadline = None if args.time_limit is None else started + args.time_limit
    report = Report(args.out, meta, log, deadline)
    report.save()
    first_shape = args.shapes[0]
    if "first" in args.sections and args.first_impl != "none":
        impl = args.first_impl
        first_calls(su, fla, report, args.ops, impl, first_shape)
        if args.serial and impl == "seqlab" and fla is not None:
            first_calls(su, fla, report, [op for op in args.ops if op in fla], "fla", first_shape)
    if args.serial or report.stopped("background processes"):
        bg, here = None, args.check_dtypes
    else:
        limit = args.background_limit
        left = None if limit is None else max(1.0, limit - (time.perf_counter() - started))
        bg, here = start_background(args, su, fla, seed, left), args.check_dtypes[:1]
    try:
        if "check" in args.sections:
            run_checks(su, report, args.ops, args.check_shape, here, seed)
        if bg is not None:
            limit = args.background_limit
            finish_background(bg, report, None if limit is None else started + limit)
    finally:
        if bg is not None:
            bg.kill()
    if "check" in args.sections and fla is not None and args.first_impl == "seqlab":
        run_fla_checks(su, fla, report, args.ops, args.check_shape, seed)
    failed = [c for c in report.data["checks"] if c["impl"] == "seqlab" and c["ok"] != "yes"]
    if failed and not args.keep_going:
        why = "a Triton op differs from the PyTorch chunk form; no timings taken"
        report.stop(why)
        report.save(complete=True)
        print(json.dumps(failed, indent=1))
        raise SystemExit(why)
    if "training" in args.sections:
        passes, sets = args.passes, args.input_sets
        bench_training(su, fla, report, args.shapes, args.ops, passes, args.repeats, sets)
    if "decode" in args.sections:
        ops = [op for op in args.ops if op in DECODE_OPS]
        batches, contexts = args.decode_batches, args.contexts
        bench_decode(su, fla, report, batches, contexts, ops, args.repeats * 10)
    if "profile" in args.sections:
        peer = fla if args.profile_fla else None
        args_ = (args.ops, args.passes, args.profile_shape, args.profile_calls)
        profile_kernels(su, peer, report, *args_)
    report.save(complete=True)
    print(markdown(report.data))
    print(summary(report.data))
    jobs = [b["job"] for b in report.data.get("background", []) if b["rc"] != 0 and not b["cut"]]
    if failed or jobs:
        jobs_text = ", ".join(jobs) or "none"
        raise SystemExit(f"{len(failed)} check(s) failed; failed background jobs: {jobs_text}")


if __name__ == "__main__":
    main()
