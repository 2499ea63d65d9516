"""Triton backend of the gated linear recurrence against the float64 recurrent reference.

Run: .venv/bin/python -m pytest tests/ops/triton -q   (on CPU through Triton's interpreter)

Chunk kernels (forward and backward) and the fused recurrent kernel (forward, the decode step),
for no gate, a scalar gate [B, T, H] and a per-channel gate [B, T, H, K]: outputs, final states
and the gradient of every input (q, k, v, g, initial_state), at the tolerances of conftest.TOL.
Shapes stay small (T ≤ 100, K, V ≤ 32): the interpreter runs every program in Python.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.ops.gated_linear import gated_linear, recurrent_gated_linear
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
GATES = (None, "scalar", "channel")
F32 = TOL[torch.float32]


def triton_op(chunk_size: int = 16, form: str = "chunk"):
    return functools.partial(gated_linear, backend="triton", form=form, chunk_size=chunk_size)


def check(x, chunk_size, tol=F32, label="", grad_scale=None):
    run = run_grads(triton_op(chunk_size), x)
    ref_x = reference_inputs(x)
    ref = run_grads(recurrent_gated_linear, ref_x)
    if grad_scale == "max":
        grad_scale = max(g.abs().max().item() for g in ref[2].values())
    assert_run_close(run, ref, tol, label, grad_scale)
    return run


# (B, T, H, K, V, chunk_size, initial_state): T not a multiple of C with K ≠ V; the production
# chunk 64 with four 16-row sub-chunks (per-channel secondary chunking); T = 1; T < C; wide heads,
# so K and V span several 64-wide blocks (partial gate gradients summed over K blocks).
SHAPES = [
    (2, 37, 2, 8, 12, 16, True),
    (1, 100, 1, 32, 32, 64, True),
    (1, 1, 2, 8, 12, 16, True),
    (1, 20, 2, 16, 8, 32, False),
    (1, 40, 1, 128, 96, 32, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-C{}-h0{}".format(*s))
@pytest.mark.parametrize("gate", GATES)
def test_chunk_matches_reference(shape, gate):
    *dims, C, h0 = shape
    x = on_device(make_inputs(*dims, gate=gate, initial_state=h0, seed=sum(dims)), torch.float32)
    check(x, C, label=f"{shape} {gate}")


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_half_inputs(dtype, gate):
    """float32 gates with half q, k, v (a model may keep its log-decays exact); grads come back
    in each input's dtype, the state in float32."""
    x = make_inputs(2, 45, 2, 16, 16, gate=gate, initial_state=True, seed=4)
    x = {n: t.float() if n == "g" else t for n, t in on_device(x, dtype).items()}
    o, s, grads = check(x, 32, TOL[dtype], str(dtype))
    assert o.dtype == dtype and s.dtype == torch.float32
    assert all(grads[n].dtype == x[n].dtype for n in x)


@pytest.mark.parametrize("fill", ["-30", "mix"])
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_extreme_gates(gate, fill):
    """Log-decay −30 everywhere, or each entry −30, 0 or random: everything stays finite (no
    exp of a positive exponent anywhere) and close to the reference."""
    x = make_inputs(1, 70, 2, 8, 12, gate=gate, gate_fill=fill, initial_state=True, seed=6)
    check(on_device(x, torch.float32), 64, EXTREME, f"{gate} {fill}", grad_scale="max")


@pytest.mark.parametrize("gate", GATES)
def test_state_carries_across_a_split(gate):
    """[0, 29) then [29, 61) from its final state equals one pass, gradients included."""
    x = on_device(
        make_inputs(2, 61, 2, 8, 12, gate=gate, initial_state=True, seed=7), torch.float32
    )
    both = run_grads(two_pass(triton_op(16), triton_op(16), 29), x)
    ref = run_grads(recurrent_gated_linear, reference_inputs(x))
    assert_run_close(both, ref, F32, "split")


@pytest.mark.parametrize("gate", GATES)
def test_prefill_then_decode(gate):
    """A chunk prefill hands its state to fused recurrent decode steps (T = 1 each)."""
    x = on_device(
        make_inputs(2, 27, 2, 8, 12, gate=gate, initial_state=True, seed=8), torch.float32
    )
    t = 20
    o, S = triton_op(16)(**{n: a[:, :t] for n, a in x.items() if n != "initial_state"},
                         initial_state=x["initial_state"], output_final_state=True)  # fmt: skip
    outs = [o]
    for i in range(t, 27):
        step = {n: a[:, i : i + 1] for n, a in x.items() if n != "initial_state"}
        o, S = triton_op(form="recurrent")(**step, initial_state=S, output_final_state=True)
        outs.append(o)
    o_ref, S_ref = recurrent_gated_linear(**reference_inputs(x), output_final_state=True)
    assert_run_close((torch.cat(outs, 1), S, {}), (o_ref, S_ref, {}), F32, "decode")


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_packed_sequences(gate, initial_state):
    """cu_seqlens: sequences shorter than, equal to and longer than a chunk, and of length 1."""
    cu = [0, 5, 21, 22, 60]
    x = make_inputs(1, 60, 2, 8, 12, gate=gate, initial_state=initial_state, N=4, seed=10)
    x = on_device(x, torch.float32)
    run = run_grads(triton_op(16), x, cu_seqlens=torch.tensor(cu))
    assert run[1].shape == (4, 2, 8, 12)
    ref = run_grads(one_by_one(recurrent_gated_linear, cu), reference_inputs(x))
    assert_run_close(run, ref, F32, f"cu={cu}")


@pytest.mark.parametrize(
    "packed, KV", [(False, (8, 12)), (True, (8, 12)), (False, (128, 96))], ids=["", "cu", "wide"]
)
@pytest.mark.parametrize("gate", GATES)
def test_recurrent_form(gate, packed, KV):
    """The fused recurrent kernel as the recurrent form (forward only)."""
    cu = [0, 9, 10, 33] if packed else None
    B, N = (1, 3) if packed else (2, 2)
    x = make_inputs(B, 33, 2, *KV, gate=gate, initial_state=True, N=N, seed=11)
    x = on_device(x, torch.float32)
    with torch.no_grad():
        o, S = triton_op(form="recurrent")(**x, output_final_state=True, cu_seqlens=cu)
    ref_x = reference_inputs(x)
    o_ref, S_ref = recurrent_gated_linear(**ref_x, output_final_state=True, cu_seqlens=cu)
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
    initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, T, K, V, chunk_size, gate, initial_state, seed):
    x = make_inputs(B, T, 1, K, V, gate=gate, initial_state=initial_state, seed=seed)
    check(on_device(x, torch.float32), chunk_size, label=f"T={T} K={K} V={V} C={chunk_size}")
