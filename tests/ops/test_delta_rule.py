"""Gated delta rule: the chunk and parallel forms agree with recurrent, forward and backward.

Run: .venv/bin/python -m pytest tests/ops/test_delta_rule.py -q

Agreement is checked in float64 at rtol = atol = 1e-10 (conftest.F64) on the output, the final state
and the gradient of every input (q, k, v, beta, g, initial_state), for DeltaNet (no gate) and Gated
DeltaNet (g [B, T, H]), with β in [0, 1] and in [0, 2] (allow_neg_eigval). Keys are L2-normalised,
as the layers do, so every factor I − β k kᵀ has spectral norm ≤ 1 and nothing may blow up.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.ops import _common
from seqlab.ops._common import SLICE_ROWS
from seqlab.ops.delta_rule import (
    chunk_delta_rule,
    delta_rule,
    parallel_delta_rule,
    recurrent_delta_rule,
)
from tests.ops.conftest import (
    F64,
    FORMS,
    LOW_PRECISION,
    assert_close_to_scale,
    assert_finite_run,
    assert_float32_run_close,
    assert_same_run,
    make_inputs,
    naive_delta_rule,
    one_by_one,
    run_grads,
    two_pass,
)

GATES = (None, "scalar")
BETAS = ("unit", "neg")  # β ∈ [0, 1], or [0, 2] with allow_neg_eigval=True
HYPOTHESIS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def op(form: str, beta: str = "unit", chunk_size: int = 64):
    fn = {"recurrent": recurrent_delta_rule, "parallel": parallel_delta_rule}.get(form)
    if form == "chunk":
        fn = functools.partial(chunk_delta_rule, chunk_size=chunk_size)
    return functools.partial(fn, allow_neg_eigval=beta == "neg")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gate", GATES)
def test_recurrent_is_the_written_recurrence(gate, beta):
    x = make_inputs(2, 13, 2, 8, 12, gate=gate, beta=beta, initial_state=True, seed=1)
    assert_same_run(run_grads(op("recurrent", beta), x), run_grads(naive_delta_rule, x), **F64)


def test_delta_rule_overwrites_the_value_under_a_key():
    """β = 1 with a unit key replaces what the state held under that key: reading it gives v."""
    x = make_inputs(1, 6, 1, 8, 4, beta="unit", beta_fill=1.0, initial_state=True)
    x["q"] = x["k"] * 8**0.5  # scale · qᵀ S = kᵀ S
    o, _ = recurrent_delta_rule(**x)
    torch.testing.assert_close(o, x["v"], **F64)


# (B, T, H, K, V, chunk_size): T = 1, T < C, T = C, T not a multiple of C, a multiple of C,
# C not a power of two, K > V.
SHAPES = [
    (2, 1, 2, 8, 12, 64),
    (2, 10, 2, 8, 12, 64),
    (1, 16, 2, 8, 12, 16),
    (2, 77, 2, 8, 12, 32),
    (2, 96, 2, 8, 12, 32),
    (1, 50, 2, 8, 12, 24),
    (1, 40, 1, 16, 4, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-C{}".format(*s))
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("initial_state", [False, True])
def test_forms_match_recurrent(shape, gate, beta, initial_state):
    *dims, C = shape
    x = make_inputs(*dims, gate=gate, beta=beta, initial_state=initial_state, seed=sum(shape))
    ref = run_grads(op("recurrent", beta), x)
    assert_same_run(run_grads(op("chunk", beta, C), x), ref, **F64, label="chunk")
    assert_same_run(run_grads(op("parallel", beta), x), ref, **F64, label="parallel")


# B·H = 1 with T a multiple of C: the chunked view of an input could alias it. T = 52, C = 16:
# in two-chunk slices the last one (20 steps) is a padded partial chunk.
NO_GRAD_SHAPES = [*SHAPES, (1, 32, 1, 8, 4, 16), (1, 52, 2, 8, 4, 16)]


@pytest.mark.parametrize(
    "shape", NO_GRAD_SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-C{}".format(*s)
)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("slicing", ["one-slice", "slice-per-chunk", "two-chunk-slices"])
def test_no_grad_path_matches_recurrent_and_leaves_inputs_alone(
    form, shape, gate, beta, slicing, monkeypatch
):
    """Without autograd the chunk core updates its intermediates in place: same numbers,
    and the caller's tensors (some chunk views alias them when B·H = 1) are untouched.
    Time slices of one or two chunks carry the state (two: a ragged last slice is padded)."""
    *dims, C = shape
    B, H = dims[0], dims[2]
    rows = {"one-slice": SLICE_ROWS, "slice-per-chunk": 1}.get(slicing, 2 * B * H * C * 1)
    monkeypatch.setattr(_common, "SLICE_ROWS", rows)
    x = make_inputs(*dims, gate=gate, beta=beta, initial_state=True, seed=sum(shape))
    before = {n: t.clone() for n, t in x.items()}
    with torch.no_grad():
        fn = op(form, beta, C) if form == "chunk" else op(form, beta)
        o, S = fn(**x, output_final_state=True)
        o_ref, S_ref = op("recurrent", beta)(**x, output_final_state=True)
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(S, S_ref, **F64)
    for n, t in x.items():
        assert torch.equal(t, before[n]), f"{n} was modified"


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gate", GATES)
def test_forms_match_recurrent_long_sequence(gate, beta):
    """T ≥ 1000, not a multiple of any chunk size used."""
    x = make_inputs(1, 1037, 1, 8, 16, gate=gate, beta=beta, initial_state=True, seed=3)
    ref = run_grads(op("recurrent", beta), x)
    assert_same_run(run_grads(op("chunk", beta, 64), x), ref, **F64, label="chunk 64")
    assert_same_run(run_grads(op("chunk", beta, 24), x), ref, **F64, label="chunk 24")
    assert_same_run(run_grads(op("parallel", beta), x), ref, **F64, label="parallel")


@HYPOTHESIS
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 130),
    H=st.integers(1, 2),
    K=st.sampled_from([4, 8, 16]),
    V=st.sampled_from([4, 12]),
    chunk_size=st.sampled_from([1, 7, 16, 24, 32, 64]),
    gate=st.sampled_from(GATES),
    beta=st.sampled_from(BETAS),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forms_match_recurrent_random_shapes(
    B, T, H, K, V, chunk_size, gate, beta, initial_state, seed
):
    x = make_inputs(B, T, H, K, V, gate=gate, beta=beta, initial_state=initial_state, seed=seed)
    ref = run_grads(op("recurrent", beta), x, seed)
    assert_same_run(run_grads(op("chunk", beta, chunk_size), x, seed), ref, **F64, label="chunk")
    assert_same_run(run_grads(op("parallel", beta), x, seed), ref, **F64, label="parallel")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_dispatch_picks_the_named_form(form, chunk_size):
    x = make_inputs(2, 40, 2, 8, 12, gate="scalar", beta="neg", initial_state=True)
    kw = {"output_final_state": True, "allow_neg_eigval": True}
    o, s = delta_rule(**x, **kw, form=form, chunk_size=chunk_size)
    if form == "chunk":
        o_ref, s_ref = chunk_delta_rule(**x, **kw, chunk_size=chunk_size)
    else:
        o_ref, s_ref = {"recurrent": recurrent_delta_rule, "parallel": parallel_delta_rule}[form](
            **x, **kw
        )
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


# β at its bounds: just above 0, just below 1, just below 2 (negative eigenvalues ≈ −1), and a
# per-token mixture of the bounds.
EXTREME_BETAS = [
    ("unit", 1e-6),
    ("unit", 1 - 1e-6),
    ("unit", "bounds"),
    ("neg", 2 - 1e-6),
    ("neg", "bounds"),
]


@pytest.mark.parametrize("beta,beta_fill", EXTREME_BETAS, ids=lambda p: str(p))
@pytest.mark.parametrize("fill", [None, "zero", "-30", "mix"], ids=lambda p: f"g={p}")
def test_extreme_gates_and_betas_float64(fill, beta, beta_fill):
    """Log-decay 0, −30 everywhere (b reaches −3000) or mixed, and β at its bounds: every output,
    state and gradient is finite, and the forms still agree."""
    gate = None if fill is None else "scalar"
    x = make_inputs(
        2,
        100,
        2,
        8,
        12,
        gate=gate,
        gate_fill=fill,
        beta=beta,
        beta_fill=beta_fill,
        initial_state=True,
        seed=5,
    )
    ref = run_grads(op("recurrent", beta), x)
    assert_finite_run(ref, "recurrent")
    for label, fn in [
        ("chunk 16", op("chunk", beta, 16)),
        ("chunk 64", op("chunk", beta, 64)),
        ("parallel", op("parallel", beta)),
    ]:
        run = run_grads(fn, x)
        assert_finite_run(run, label)
        assert_same_run(run, ref, **F64, label=label)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta,beta_fill", [("unit", "bounds"), ("neg", "bounds")])
@pytest.mark.parametrize("fill", ["-30", "mix"])
def test_extreme_gates_and_betas_float32(form, fill, beta, beta_fill):
    """float32 must not overflow either. The cumulative log-decay b ≈ −1920 costs float32 ≈ 2e-4
    absolute in each exponent, hence 2e-3 relative to the largest value (of o, of the state, of
    all gradients: d/dg is a sum of O(1) terms that cancel far below float32 round-off)."""
    x = make_inputs(
        2,
        100,
        2,
        8,
        12,
        gate="scalar",
        gate_fill=fill,
        beta=beta,
        beta_fill=beta_fill,
        initial_state=True,
        seed=6,
    )
    ref = run_grads(op("recurrent", beta), x)
    run = run_grads(op(form, beta, 32), {n: t.float() for n, t in x.items()})
    assert_float32_run_close(run, ref, 2e-3, form)


@pytest.mark.parametrize("form", FORMS)
@HYPOTHESIS
@given(
    T=st.integers(2, 90),
    split=st.floats(0, 1),
    second=st.sampled_from(FORMS),
    chunk_size=st.sampled_from([16, 24, 64]),
    gate=st.sampled_from(GATES),
    beta=st.sampled_from(BETAS),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_state_carries_across_a_split(
    form, T, split, second, chunk_size, gate, beta, initial_state, seed
):
    """[0, t) in `form` with output_final_state, then [t, T) from that state (in any form, e.g.
    chunk prefill then recurrent decode), equals one pass: outputs, final state and gradients."""
    t = min(max(1, round(split * T)), T - 1)
    x = make_inputs(2, T, 2, 8, 12, gate=gate, beta=beta, initial_state=initial_state, seed=seed)
    first = op(form, beta, chunk_size)
    both = run_grads(two_pass(first, op(second, beta, chunk_size), t), x, seed)
    assert_same_run(both, run_grads(first, x, seed), **F64, label=f"split at {t}")


@pytest.mark.parametrize("form", FORMS)
@HYPOTHESIS
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    as_type=st.sampled_from(["list", "int32", "int64"]),
    chunk_size=st.sampled_from([16, 24, 64]),
    gate=st.sampled_from(GATES),
    beta=st.sampled_from(BETAS),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_sequences_match_separate_runs(
    form, lens, as_type, chunk_size, gate, beta, initial_state, seed
):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    x = make_inputs(
        1,
        cu[-1],
        2,
        8,
        12,
        gate=gate,
        beta=beta,
        initial_state=initial_state,
        N=len(lens),
        seed=seed,
    )
    cu_seqlens = cu if as_type == "list" else torch.tensor(cu, dtype=getattr(torch, as_type))
    fn = op(form, beta, chunk_size)
    packed = run_grads(fn, x, seed, cu_seqlens=cu_seqlens)
    assert packed[1].shape == (len(lens), 2, 8, 12)
    assert_same_run(packed, run_grads(one_by_one(fn, cu), x, seed), **F64, label=f"cu={cu}")


@pytest.mark.parametrize("form", FORMS)
def test_packed_without_final_state(form):
    x = make_inputs(1, 30, 2, 8, 12, gate="scalar", beta="unit")
    o, s = op(form, "unit", 16)(**x, cu_seqlens=torch.tensor([0, 7, 30]))
    assert s is None
    o_ref, _ = one_by_one(op(form, "unit", 16), [0, 7, 30])(**x)
    torch.testing.assert_close(o, o_ref, **F64)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gate", GATES)
def test_low_precision_accumulates_state_in_float32(dtype, form, gate, beta):
    x = make_inputs(2, 70, 2, 8, 12, gate=gate, beta=beta, initial_state=True, dtype=dtype, seed=9)
    o, s, grads = run_grads(op(form, beta, 32), x)
    assert o.dtype == dtype
    assert s.dtype == torch.float32
    for name, grad in grads.items():
        assert grad.dtype == x[name].dtype, name
    assert_finite_run((o, s, grads), str(dtype))
    ref = run_grads(op("recurrent", beta), {n: t.double() for n, t in x.items()})
    o_ref, s_ref, grads_ref = ref
    tol = LOW_PRECISION[dtype]
    assert_close_to_scale(o, o_ref, tol["o"], "o")
    assert_close_to_scale(s, s_ref, tol["state"], "final_state")
    for name in grads:
        assert_close_to_scale(grads[name], grads_ref[name], tol["grad"], f"d/d{name}")


@pytest.mark.parametrize("form", FORMS)
def test_output_contract(form):
    """final_state is None unless asked for; float64 stays float64; scale multiplies o; the
    inputs are left untouched."""
    x = make_inputs(2, 20, 2, 8, 12, gate="scalar", beta="unit", initial_state=True)
    before = {n: t.clone() for n, t in x.items()}
    fn = op(form, "unit", 16)
    o, s = fn(**x)
    assert s is None and o.dtype == torch.float64 and o.shape == (2, 20, 2, 12)
    o2, s2 = fn(**x, scale=0.25, output_final_state=True)
    assert s2.dtype == torch.float64 and s2.shape == (2, 2, 8, 12)
    torch.testing.assert_close(o2, o * 0.25 / 8**-0.5, **F64)
    o_ref, _ = naive_delta_rule(**x, scale=0.25)
    torch.testing.assert_close(o2, o_ref, **F64)
    for n, t in x.items():
        assert torch.equal(t, before[n]), f"{n} was modified in place"


@pytest.mark.parametrize("C", [1, 7, 8, 16, 24, 32, 48, 64, 96, 128, 256])
@pytest.mark.parametrize("leaf", [2, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_lower_inverse_matches_a_solve(C, leaf, dtype):
    """The blocked inverse (C = leaf · 2^j) and its fallback (other C) agree with a triangular
    solve, read only the strict lower part (the diagonal and above hold garbage here), and
    accept a non-contiguous batch; β up to 2 and unnormalised keys make M far from I."""
    from seqlab.ops.delta_rule import unit_lower_inverse

    g = torch.Generator().manual_seed(C * 31 + leaf)
    k = torch.randn(6, C, 16, generator=g, dtype=torch.float64)
    beta = 2 * torch.rand(6, C, 1, generator=g, dtype=torch.float64)
    M = (beta * k) @ k.transpose(1, 2) / 16
    garbage = M + torch.randn(6, C, C, generator=g, dtype=torch.float64).triu() * 1e3
    eye = torch.eye(C, dtype=torch.float64).expand(6, C, C)
    want = torch.linalg.solve_triangular(M.tril(-1) + eye, eye, upper=False)
    for Mx in (garbage.to(dtype), garbage.to(dtype).transpose(1, 2).contiguous().mT):
        got = unit_lower_inverse(Mx, leaf)
        assert got.dtype == dtype and got.shape == (6, C, C)
        assert torch.equal(got.triu(1), torch.zeros_like(got.triu(1)))
        assert torch.equal(got.diagonal(dim1=1, dim2=2), torch.ones(6, C, dtype=dtype))
        ref = torch.linalg.solve_triangular(Mx.tril(-1) + eye.to(dtype), eye.to(dtype), upper=False)
        tol = 1e-9 if dtype == torch.float64 else 2e-4
        scale = want.abs().amax(dim=(1, 2), keepdim=True)
        assert ((got.double() - want) / scale).abs().max() < tol
        assert ((ref.double() - want) / scale).abs().max() < tol
