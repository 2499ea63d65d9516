"""Triton backend of the gated delta rule against the float64 recurrent reference.

Run: .venv/bin/python -m pytest tests/ops/triton -q   (on CPU through Triton's interpreter)

Chunk kernels (UT transform; forward and backward) and the fused recurrent kernel (forward, the
decode step), for DeltaNet (no gate) and Gated DeltaNet (g [B, T, H]), β in [0, 1] and in [0, 2]
(allow_neg_eigval): outputs, final states and the gradient of every input (q, k, v, β, g,
initial_state), at the tolerances of conftest.TOL.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.ops.delta_rule import delta_rule, recurrent_delta_rule
from tests.ops.conftest import make_inputs, one_by_one, run_grads, two_pass
from tests.ops.triton.conftest import (
    DTYPES,
    EXTREME,
    INTERPRETER_MARKS,
    TOL,
    assert_run_close,
    on_device,
    reference_inputs,
)

pytestmark = INTERPRETER_MARKS
GATES = (None, "scalar")
F32 = TOL[torch.float32]


def triton_op(chunk_size: int = 16, form: str = "chunk"):
    return functools.partial(
        delta_rule, backend="triton", form=form, chunk_size=chunk_size, allow_neg_eigval=True
    )


def reference(**x):
    return recurrent_delta_rule(**x, allow_neg_eigval=True)


def check(x, chunk_size, tol=F32, label="", grad_scale=None):
    run = run_grads(triton_op(chunk_size), x)
    ref = run_grads(reference, reference_inputs(x))
    if grad_scale == "max":
        grad_scale = max(g.abs().max().item() for g in ref[2].values())
    assert_run_close(run, ref, tol, label, grad_scale)
    return run


# (B, T, H, K, V, chunk_size, initial_state, beta): as for the gated linear tests, with β in
# [0, 1] and in [0, 2] (negative eigenvalues of I − β k kᵀ).
SHAPES = [
    (2, 37, 2, 8, 12, 16, True, "unit"),
    (1, 100, 1, 32, 32, 64, True, "neg"),
    (1, 1, 2, 8, 12, 16, True, "neg"),
    (1, 20, 2, 16, 8, 32, False, "unit"),
    (1, 40, 1, 128, 96, 32, True, "neg"),
]


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-C{}-h0{}-{}".format(*s)
)
@pytest.mark.parametrize("gate", GATES)
def test_chunk_matches_reference(shape, gate):
    *dims, C, h0, beta = shape
    x = make_inputs(*dims, gate=gate, beta=beta, initial_state=h0, seed=sum(dims))
    check(on_device(x, torch.float32), C, label=f"{shape} {gate}")


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_half_inputs(dtype, gate):
    """float32 β and gates with half q, k, v; grads in each input's dtype, state in float32."""
    x = make_inputs(2, 45, 2, 16, 16, gate=gate, beta="neg", initial_state=True, seed=4)
    x = {n: t.float() if n in ("g", "beta") else t for n, t in on_device(x, dtype).items()}
    o, s, grads = check(x, 32, TOL[dtype], str(dtype))
    assert o.dtype == dtype and s.dtype == torch.float32
    assert all(grads[n].dtype == x[n].dtype for n in x)


@pytest.mark.parametrize("fill", ["-30", "mix"])
def test_extreme_gates_and_beta_bounds(fill):
    """Log-decay −30 (or a mixture with 0), β at 0, 1 and 2 (± 1e-6): finite and close."""
    x = make_inputs(
        1, 70, 2, 8, 12, gate="scalar", gate_fill=fill, beta="neg", beta_fill="bounds",
        initial_state=True, seed=6,
    )  # fmt: skip
    check(on_device(x, torch.float32), 64, EXTREME, fill, grad_scale="max")


@pytest.mark.parametrize("gate", GATES)
def test_state_carries_across_a_split(gate):
    x = make_inputs(2, 61, 2, 8, 12, gate=gate, beta="unit", initial_state=True, seed=7)
    x = on_device(x, torch.float32)
    both = run_grads(two_pass(triton_op(16), triton_op(16), 29), x)
    assert_run_close(both, run_grads(reference, reference_inputs(x)), F32, "split")


@pytest.mark.parametrize("gate", GATES)
def test_prefill_then_decode(gate):
    """A chunk prefill hands its state to fused recurrent decode steps (T = 1 each)."""
    x = make_inputs(2, 27, 2, 8, 12, gate=gate, beta="neg", initial_state=True, seed=8)
    x = on_device(x, torch.float32)
    t = 20
    o, S = triton_op(16)(**{n: a[:, :t] for n, a in x.items() if n != "initial_state"},
                         initial_state=x["initial_state"], output_final_state=True)  # fmt: skip
    outs = [o]
    for i in range(t, 27):
        step = {n: a[:, i : i + 1] for n, a in x.items() if n != "initial_state"}
        o, S = triton_op(form="recurrent")(**step, initial_state=S, output_final_state=True)
        outs.append(o)
    o_ref, S_ref = reference(**reference_inputs(x), output_final_state=True)
    assert_run_close((torch.cat(outs, 1), S, {}), (o_ref, S_ref, {}), F32, "decode")


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_packed_sequences(gate, initial_state):
    cu = [0, 5, 21, 22, 60]
    x = make_inputs(
        1, 60, 2, 8, 12, gate=gate, beta="unit", initial_state=initial_state, N=4, seed=10
    )
    x = on_device(x, torch.float32)
    run = run_grads(triton_op(16), x, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert run[1].shape == (4, 2, 8, 12)
    ref = run_grads(one_by_one(reference, cu), reference_inputs(x))
    assert_run_close(run, ref, F32, f"cu={cu}")


@pytest.mark.parametrize(
    "packed, KV", [(False, (8, 12)), (True, (8, 12)), (False, (128, 96))], ids=["", "cu", "wide"]
)
@pytest.mark.parametrize("gate", GATES)
def test_recurrent_form(gate, packed, KV):
    cu = [0, 9, 10, 33] if packed else None
    B, N = (1, 3) if packed else (2, 2)
    x = make_inputs(B, 33, 2, *KV, gate=gate, beta="neg", initial_state=True, N=N, seed=11)
    x = on_device(x, torch.float32)
    with torch.no_grad():
        o, S = triton_op(form="recurrent")(**x, output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = reference(**reference_inputs(x), output_final_state=True, cu_seqlens=cu)
    assert_run_close((o, S, {}), (o_ref, S_ref, {}), F32, "recurrent")


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 90),
    K=st.sampled_from([4, 8, 16, 32]),
    V=st.sampled_from([4, 12, 32]),
    chunk_size=st.sampled_from([16, 32, 64]),
    gate=st.sampled_from(GATES),
    beta=st.sampled_from(["unit", "neg"]),
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, T, K, V, chunk_size, gate, beta, initial_state, seed):
    x = make_inputs(B, T, 1, K, V, gate=gate, beta=beta, initial_state=initial_state, seed=seed)
    check(on_device(x, torch.float32), chunk_size, label=f"T={T} K={K} V={V} C={chunk_size}")
