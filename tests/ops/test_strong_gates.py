"""Strong and extreme gates: the chunk forms stay exact and stay on exp's fast path.

Run: .venv/bin/python -m pytest tests/ops/test_strong_gates.py -q

The chunk forms clamp every exp of a log-decay to [exp_floor(dtype), 0] (seqlab.ops._common):
PyTorch's CPU exp is 10-35x slower for float32 arguments below about −87.3, where the result is
denormal or 0, and on some CPUs (an Intel Xeon VM) matmuls and multiplies with denormal operands
or results are 6-8x slower, which made the chunk forms slower with the gate values. The clamp
replaces factors below exp(−80) ≈ 1.8e-35 (float64) or exp(−30) ≈ 9.4e-14 (float32) by that
value, so the forms must still agree with the recurrent form (which does not clamp) to float64
round-off at per-step log-decay −20, −100 and −1e4, forward and backward; and, watched at the
aten level, no exp in a float32 chunk form (forward or backward) may take an argument below the
floor or return a denormal, and no matmul or multiply may see a denormal, whatever the gates.
Speed itself is measured by benchmarks/bench_ops_cpu.py --gates, never asserted here.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqlab.ops._common import EXP_FLOOR_32
from seqlab.ops.delta_rule import chunk_delta_rule, parallel_delta_rule, recurrent_delta_rule
from seqlab.ops.gated_linear import (
    chunk_gated_linear,
    parallel_gated_linear,
    recurrent_gated_linear,
)
from tests.ops.conftest import F64, assert_finite_run, assert_same_run, make_inputs, run_grads

# (op name, gate shape, β): the scalar-gated and per-channel gated linear recurrence, and the
# gated delta rule with β in [0, 1] and in [0, 2]
CASES = [
    ("gated_linear", "scalar", None),
    ("gated_linear", "channel", None),
    ("delta_rule", "scalar", "unit"),
    ("delta_rule", "scalar", "neg"),
]
# per-step log-decays: mild, strong (−3: b_i − b_j crosses −87 inside a chunk of 64), and
# extreme; "random strong": uniform in [−25, 0]; "mixed": each step 0, −1e4 or uniform in [−25, 0]
FILLS = [-0.05, -3.0, -20.0, -100.0, -1e4, "random strong", "mixed"]
TINY32 = torch.finfo(torch.float32).tiny  # the smallest normal float32, exp(−87.34)


def forms(name: str, beta: str | None):
    if name == "gated_linear":
        return recurrent_gated_linear, chunk_gated_linear, parallel_gated_linear
    neg = {"allow_neg_eigval": beta == "neg"}
    return tuple(
        functools.partial(f, **neg)
        for f in (recurrent_delta_rule, chunk_delta_rule, parallel_delta_rule)
    )


def inputs(gate: str, beta: str | None, fill, T: int = 75, K: int = 8, seed: int = 11):
    """q, k, v (, β), an initial state, and g filled as named."""
    x = make_inputs(2, T, 2, K, 12, gate=gate, beta=beta, initial_state=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shape, dt = x["g"].shape, x["g"].dtype
    strong = -25 * torch.rand(shape, generator=gen, dtype=dt)
    if fill == "random strong":
        x["g"] = strong
    elif fill == "mixed":
        pick = torch.randint(0, 3, shape, generator=gen)
        x["g"] = torch.where(pick == 0, 0.0, torch.where(pick == 1, -1e4, strong)).to(dt)
    else:
        x["g"] = torch.full(shape, float(fill), dtype=dt)
    return x


@pytest.mark.parametrize("fill", FILLS, ids=str)
@pytest.mark.parametrize("name,gate,beta", CASES, ids=lambda p: str(p))
def test_strong_gates_match_recurrent_float64(name, gate, beta, fill):
    """Chunk sizes 16, 64 (the default) and 24 (not a power of two: the per-channel form pads
    its halving to 32), and the parallel form, against the recurrent form: outputs, final
    states and the gradients of every input, to round-off."""
    recurrent, chunk, parallel = forms(name, beta)
    x = inputs(gate, beta, fill)
    ref = run_grads(recurrent, x)
    assert_finite_run(ref, "recurrent")
    for label, fn in [
        ("chunk 16", functools.partial(chunk, chunk_size=16)),
        ("chunk 24", functools.partial(chunk, chunk_size=24)),
        ("chunk 64", chunk),
        ("parallel", parallel),
    ]:
        run = run_grads(fn, x)
        assert_finite_run(run, label)
        assert_same_run(run, ref, **F64, label=f"{label}, log-decay {fill}")


# products whose float32 operands and results the spy watches for denormals
PRODUCTS = {
    torch.ops.aten.mm,
    torch.ops.aten.bmm,
    torch.ops.aten.baddbmm,
    torch.ops.aten.addmm,
    torch.ops.aten.mul,
    torch.ops.aten.mul_,
}


def smallest_nonzero(tensors) -> float:
    """The smallest nonzero |value| of the float32 tensors among `tensors` (1.0 if none)."""
    mins = [1.0]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
            nz = t.abs()[t != 0]
            if nz.numel():
                mins.append(nz.min().item())
    return min(mins)


class ExpSpy(TorchDispatchMode):
    """Records every aten exp call on float32: (smallest argument, smallest nonzero |result|),
    the smallest nonzero |value| of every float32 triangular-solve operand, and of every float32
    operand and result of a product (matmul or multiply: `product_tiny`, (op, value))."""

    def __init__(self):
        super().__init__()
        self.exps: list[tuple[float, float]] = []
        self.solve_tiny: list[float] = []
        self.product_tiny: list[tuple[str, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if func.overloadpacket in PRODUCTS:
            tiny = smallest_nonzero(args)  # before an in-place op runs
            out = func(*args, **(kwargs or {}))
            tiny = min(tiny, smallest_nonzero(out if isinstance(out, tuple) else (out,)))
            self.product_tiny.append((func.overloadpacket.__name__, tiny))
            return out
        arg_min = None
        is_exp = func.overloadpacket in (torch.ops.aten.exp, torch.ops.aten.exp_)
        if is_exp and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            arg_min = x.min().item() if x.numel() else 0.0  # before an in-place exp_ runs
        if func.overloadpacket is torch.ops.aten.linalg_solve_triangular:
            for t in args:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    nz = t.abs()[t != 0]
                    self.solve_tiny.append(nz.min().item() if nz.numel() else 1.0)
        out = func(*args, **(kwargs or {}))
        if arg_min is not None:
            nz = out.abs()[out != 0]
            self.exps.append((arg_min, nz.min().item() if nz.numel() else 1.0))
        return out


@pytest.mark.parametrize("fill", [-3.0, -20.0, -1e4, "random strong", "mixed"], ids=str)
@pytest.mark.parametrize("name,gate,beta", CASES, ids=lambda p: str(p))
def test_chunk_forms_keep_exp_off_its_slow_path(name, gate, beta, fill):
    """float32, forward and backward, chunk sizes 64 and 24: every exp argument is ≥ the float32
    floor (exp's fast path), no exp result, no triangular-solve operand and no operand or result
    of a matmul or multiply is a denormal, and there were exps to watch (the spy sees the forms'
    work)."""
    _, chunk, _ = forms(name, beta)
    x = {n: t.float() for n, t in inputs(gate, beta, fill, T=130, K=16).items()}
    for chunk_size in (64, 24):
        with ExpSpy() as spy:
            run = run_grads(functools.partial(chunk, chunk_size=chunk_size), x)
        assert_finite_run(run, f"chunk {chunk_size}")
        assert spy.exps, "no exp was seen"
        lowest = min(a for a, _ in spy.exps)
        assert lowest >= EXP_FLOOR_32, f"exp of {lowest:.4g}: below the floor {EXP_FLOOR_32}"
        smallest = min(r for _, r in spy.exps)
        assert smallest >= TINY32, f"an exp returned the denormal {smallest:.3g}"
        op, tiny = min(spy.product_tiny, key=lambda p: p[1])
        assert tiny >= TINY32, f"{op} saw the denormal {tiny:.3g}"
        if name == "delta_rule":
            assert spy.solve_tiny and min(spy.solve_tiny) >= TINY32, spy.solve_tiny


def test_the_spy_sees_a_slow_exp():
    """The spy itself: an unclamped exp of a strong decay is caught."""
    with ExpSpy() as spy:
        torch.full((4,), -100.0).exp()
    [(arg, result)] = spy.exps
    assert arg == -100.0 and 0 < result < TINY32


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_per_channel_chunk_form_forms_no_cck_tensor(grad):
    """The per-channel chunk form builds its intra-chunk output by recursive halving: no
    [C, C, K] tensor, forward or backward (the largest are [C, C] per chunk and head, or the
    [C, K] inputs); the parallel form, the oracle, still forms [T, T, K]."""
    B, T, H, K, V, C = 1, 128, 2, 32, 16, 64
    x = make_inputs(B, T, H, K, V, gate="channel", initial_state=True, seed=2)
    leaves = {n: t.float().requires_grad_(grad) for n, t in x.items()}
    for fn, bound in [
        (functools.partial(chunk_gated_linear, chunk_size=C), B * H * T * max(C, K, V)),
        (parallel_gated_linear, None),
    ]:
        with torch.set_grad_enabled(grad), LargestTensor() as spy:
            o, s = fn(**leaves, output_final_state=True)
            if grad:
                (o.sum() + s.sum()).backward()
        if bound is None:
            assert spy.numel >= B * H * T * T * K
        else:
            assert spy.numel <= bound, f"a tensor of {spy.numel} elements (bound {bound})"
