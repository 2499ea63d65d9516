"""The selective scan (Mamba-1's S6): scan and chunk against recurrent, both against mamba-ssm's
selective_scan_ref transcribed in its [B, D, T] layout, float64 forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops.registry import family
from seqlab.ops.selective_scan import (
    chunk_selective_scan,
    make_selective_scan_inputs,
    recurrent_selective_scan,
    scan_selective_scan,
    selective_scan_flops,
)

F64 = {"rtol": 1e-9, "atol": 1e-9}


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's selective_scan_ref (real A, one group, no z): u, delta [B, D, T], B, C
    [B, N, T]."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[..., None]
    return out, x


def _inputs(B, T, D, N, seed, dtype=torch.float64, strong=False):
    g = torch.Generator().manual_seed(seed)
    x = make_selective_scan_inputs("default", B, T, D=D, N=N, dtype=dtype, generator=g)
    if strong:  # Δ A down to −1e4 per step
        x["delta_bias"] = x["delta_bias"] + 50.0
    return x


def _run(fn, x, h0=None, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if torch.is_tensor(v)}
    h = None if h0 is None else h0.clone().requires_grad_(True)
    y, S = fn(
        **leaves, delta_softplus=x["delta_softplus"], initial_state=h, output_final_state=True, **kw
    )
    (
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + S.square().sum()
    ).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    if h is not None:
        grads["initial_state"] = h.grad
    return y, S, grads


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    D=st.integers(1, 5),
    N=st.integers(1, 4),
    chunk=st.integers(1, 9),
    init=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_chunk_matches_recurrent_float64(B, T, D, N, chunk, init, seed):
    x = _inputs(B, T, D, N, seed)
    h0 = torch.randn(B, D, N, dtype=torch.float64) if init else None
    y_r, S_r, g_r = _run(recurrent_selective_scan, x, h0)
    y_c, S_c, g_c = _run(chunk_selective_scan, x, h0, chunk_size=chunk)
    torch.testing.assert_close(y_c, y_r, **F64)
    torch.testing.assert_close(S_c, S_r, **F64)
    assert set(g_c) == set(g_r)
    for k in g_r:
        torch.testing.assert_close(g_c[k], g_r[k], **F64, msg=lambda m, k=k: f"{k}: {m}")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 45),
    D=st.integers(1, 6),
    N=st.integers(1, 5),
    init=st.booleans(),
    strong=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_scan_matches_recurrent_float64(B, T, D, N, init, strong, seed):
    x = _inputs(B, T, D, N, seed, strong=strong)
    h0 = torch.randn(B, D, N, dtype=torch.float64) if init else None
    y_r, S_r, g_r = _run(recurrent_selective_scan, x, h0)
    y_s, S_s, g_s = _run(scan_selective_scan, x, h0)
    torch.testing.assert_close(y_s, y_r, **F64)
    torch.testing.assert_close(S_s, S_r, **F64)
    assert set(g_s) == set(g_r)
    for k in g_r:
        torch.testing.assert_close(g_s[k], g_r[k], **F64, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", [30.0, 1e6, 1e30])
def test_scan_huge_delta_stays_finite(dtype, shift):
    """Δ·|A| per step from ~30 to 1e30: every decay is 0 in effect, and nothing the recurrent
    form keeps finite (output, state, any gradient) becomes NaN or Inf."""
    x = _inputs(2, 37, 4, 3, seed=5, dtype=dtype)
    x["delta_bias"] = x["delta_bias"] + shift
    y_r, S_r, g_r = _run(recurrent_selective_scan, x)
    y_s, S_s, g_s = _run(scan_selective_scan, x)
    tol = {"rtol": 1e-9, "atol": 0} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 0}
    torch.testing.assert_close(y_s, y_r, **tol)
    torch.testing.assert_close(S_s, S_r, **tol)
    for k in g_r:
        assert torch.isfinite(g_s[k])[torch.isfinite(g_r[k])].all(), k


def test_scan_empty_batch():
    x = _inputs(0, 6, 3, 2, seed=0)
    y, S, g = _run(scan_selective_scan, x, torch.zeros(0, 3, 2, dtype=torch.float64))
    assert y.shape == (0, 6, 3) and S.shape == (0, 3, 2)
    assert not g["A"].any() and g["D"].shape == (3,)


@pytest.mark.parametrize("T", [1, 7, 33])
def test_matches_mamba_ssm_reference(T):
    x = _inputs(2, T, 5, 3, seed=T)
    ref_args = {
        "u": x["u"].transpose(1, 2),
        "delta": x["delta"].transpose(1, 2),
        "A": x["A"],
        "B": x["B"].transpose(1, 2),
        "C": x["C"].transpose(1, 2),
        "D": x["D"],
        "delta_bias": x["delta_bias"],
        "delta_softplus": True,
    }
    y_ref, S_ref = selective_scan_ref(**ref_args)
    forms = ((recurrent_selective_scan, {}), (scan_selective_scan, {}))
    for fn, kw in (*forms, (chunk_selective_scan, {"chunk_size": 4})):
        y, S = fn(**x, output_final_state=True, **kw)
        torch.testing.assert_close(y.transpose(1, 2), y_ref, **F64)
        torch.testing.assert_close(S, S_ref, **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_decays(dtype):
    x = _inputs(1, 50, 4, 3, seed=3, dtype=dtype, strong=True)
    y_r, S_r = recurrent_selective_scan(**x, output_final_state=True)
    tol = F64 if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for y, S in (
        chunk_selective_scan(**x, output_final_state=True, chunk_size=8),
        scan_selective_scan(**x, output_final_state=True),
    ):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, y_r, **tol)
        torch.testing.assert_close(S, S_r, **tol)


@pytest.mark.parametrize("T", [1, 20, 64, 100])
def test_flops_matmul_matches_counter(T):
    fam = family("selective_scan")
    dims = {"D": 6, "N": 4}
    x = fam.make_inputs("default", 1, T, 1, dtype=torch.float32, **dims)
    with FlopCounterMode(display=False) as counter:
        fam.forms["chunk"](**x, chunk_size=16)
    assert selective_scan_flops("default", "chunk", T, 1, chunk_size=16, **dims).matmul == (
        counter.get_total_flops()
    )
    with FlopCounterMode(display=False) as counter:
        fam.forms["scan"](**x)
    assert fam.flops("default", "scan", T, 1, **dims).matmul == counter.get_total_flops()
    assert fam.flops("default", "recurrent", T, 1, **dims).other > 0


def test_errors():
    x = _inputs(1, 5, 3, 2, seed=0)
    with pytest.raises(ValueError, match="u must have rank 3"):
        recurrent_selective_scan(**{**x, "u": x["u"][0]})
    with pytest.raises(ValueError, match="B has shape"):
        chunk_selective_scan(**{**x, "B": x["B"][:, :, :1]})
    with pytest.raises(ValueError, match="initial_state"):
        chunk_selective_scan(**x, initial_state=torch.zeros(1, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_selective_scan(**x, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        chunk_selective_scan(**{**x, "A": x["A"].long()})


def test_mamba_ssm_peer_matches_the_recurrent_form():
    peer = family("selective_scan").peers["mamba-ssm"]()
    if peer is None:
        pytest.skip("mamba-ssm is not installed (the transcription above stands in for it)")
    x = _inputs(2, 19, 5, 3, seed=2, dtype=torch.float32)  # it computes in float32 only
    y = peer(**x)
    assert y.shape == x["u"].shape
    torch.testing.assert_close(y, recurrent_selective_scan(**x)[0], rtol=1e-5, atol=1e-5)
