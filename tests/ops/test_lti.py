"""The LTI families (seqlab.ops.lti): s4d and lmu. FFT form against the recurrent reference in
float64, forward and backward (every input's gradient, the initial state's included), the final
state, strong Δ; FLOPs against FlopCounterMode; the LMU's discretisation and its Legendre window."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops.lti import lmu_continuous, lmu_matrices
from seqlab.ops.registry import family

TOL = {"rtol": 1e-9, "atol": 1e-9}


def _state(name, B, H, dims, gen):
    if name == "s4d":
        return torch.randn(B, H, dims["N"] // 2, 2, generator=gen, dtype=torch.float64)
    return torch.randn(B, H, dims["d"], generator=gen, dtype=torch.float64)


def _compare(name, x, h0, gen):
    fam = family(name)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    h0_leaf = None if h0 is None else h0.clone().requires_grad_(True)
    outs = {}
    for form in ("recurrent", "fft"):
        inputs = {k: v for k, v in leaves.items()}
        o, S = fam.forms[form](**inputs, initial_state=h0_leaf, output_final_state=True)
        outs[form] = (o, S)
    (o_r, S_r), (o_f, S_f) = outs["recurrent"], outs["fft"]
    torch.testing.assert_close(o_f, o_r, **TOL)
    torch.testing.assert_close(S_f, S_r, **TOL)
    wo = torch.randn(o_r.shape, generator=gen, dtype=torch.float64)
    wS = torch.randn(S_r.shape, generator=gen, dtype=torch.float64)
    wrt = [*leaves.values()] + ([] if h0_leaf is None else [h0_leaf])
    grads = {}
    for form, (o, S) in outs.items():
        grads[form] = torch.autograd.grad(
            (o * wo).sum() + (S * wS).sum(), wrt, retain_graph=True, allow_unused=True
        )
        # Ā is unused by the FFT form at T = 1 without a state: its gradient is 0 there
        pairs = zip(grads[form], wrt, strict=True)
        grads[form] = [torch.zeros_like(w) if g is None else g for g, w in pairs]
    names = [*leaves] + ([] if h0_leaf is None else ["initial_state"])
    for n, a, b in zip(names, grads["fft"], grads["recurrent"], strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(["s4d", "lmu"]),
    B=st.integers(1, 3),
    T=st.integers(1, 33),
    H=st.integers(1, 3),
    n=st.sampled_from([2, 4, 6]),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fft_equals_recurrent_forward_backward(name, B, T, H, n, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    dims = {"N": n} if name == "s4d" else {"d": n, "theta": float(max(T, 4))}
    x = family(name).make_inputs("default", B, T, H, dtype=torch.float64, generator=gen, **dims)
    h0 = _state(name, B, H, {"N": n, "d": n}, gen) if with_state else None
    _compare(name, x, h0, gen)


@pytest.mark.parametrize("T", [1, 17, 64])
def test_s4d_strong_dt_and_decay(T):
    """Δ up to e² (Ā near 0 for the real part's −1/2 times large Δ) and strongly damped modes."""
    gen = torch.Generator().manual_seed(T)
    x = family("s4d").make_inputs("default", 2, T, 3, dtype=torch.float64, generator=gen, N=8)
    x["log_dt"] = torch.tensor([-7.0, 0.0, 2.0], dtype=torch.float64)
    x["A_re"] = x["A_re"] * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)[:, None]
    _compare("s4d", x, _state("s4d", 2, 3, {"N": 8}, gen), gen)


@pytest.mark.parametrize("theta", [2.0, 8.0, 1000.0])
def test_lmu_short_and_long_windows(theta):
    gen = torch.Generator().manual_seed(1)
    x = family("lmu").make_inputs("default", 2, 45, 2, dtype=torch.float64, generator=gen, d=6)
    x["Abar"], x["Bbar"] = lmu_matrices(6, theta)
    _compare("lmu", x, _state("lmu", 2, 2, {"d": 6}, gen), gen)


def test_recurrent_in_pieces_equals_one_pass():
    for name in ("s4d", "lmu"):
        fam = family(name)
        x = fam.make_inputs("default", 2, 30, 2, dtype=torch.float64)
        o, S = fam.forms["fft"](**x, output_final_state=True)
        first = {**x, "u": x["u"][:, :11]}
        second = {**x, "u": x["u"][:, 11:]}
        o1, S1 = fam.forms["fft"](**first, output_final_state=True)
        o2, S2 = fam.forms["recurrent"](**second, initial_state=S1, output_final_state=True)
        torch.testing.assert_close(torch.cat([o1, o2], 1), o, **TOL)
        torch.testing.assert_close(S2, S, **TOL)


def test_float32_inputs_keep_float32_and_agree():
    for name in ("s4d", "lmu"):
        fam = family(name)
        x = fam.make_inputs("default", 2, 50, 3, dtype=torch.float32)
        o, S = fam.forms["fft"](**x, output_final_state=True)
        r, Sr = fam.forms["recurrent"](**x, output_final_state=True)
        assert o.dtype == torch.float32 and S.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(S, Sr, rtol=1e-4, atol=1e-4)
        assert S[0].numel() * 4 == fam.state_bytes("default", 50, 3, **fam.dims)


@pytest.mark.parametrize("name", ["s4d", "lmu"])
@pytest.mark.parametrize("form", ["recurrent", "fft"])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_flops_matmul_part_matches_flop_counter(name, form, T):
    fam = family(name)
    H = 3
    x = fam.make_inputs("default", 1, T, H, dtype=torch.float32, **fam.dims)
    with FlopCounterMode(display=False) as counter:
        fam.forms[form](**x, output_final_state=True)
    flops = fam.flops("default", form, T, H, **fam.dims)
    assert counter.get_total_flops() == flops.matmul
    assert flops.other > 0


# ------------------------------------------------------------------------------------------ LMU


def test_lmu_zoh_matches_fine_euler_integration():
    """Ā = e^{A}, B̄ = ∫₀¹ e^{As} B ds, integrated by 20000 Euler steps of ẋ = A x (+ B)."""
    d, theta = 5, 4.0
    A, Bv = lmu_continuous(d, theta)
    Abar, Bbar = lmu_matrices(d, theta)
    n = 20000
    h = 1.0 / n
    X = torch.eye(d, dtype=torch.float64)
    b = torch.zeros(d, dtype=torch.float64)
    for _ in range(n):  # midpoint (RK2) steps: error O(h²)
        X = X + h * (A @ (X + 0.5 * h * (A @ X)))
        b = b + h * (A @ (b + 0.5 * h * (A @ b + Bv)) + Bv)
    torch.testing.assert_close(Abar, X, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Bbar, b, rtol=1e-6, atol=1e-7)


def test_lmu_continuous_matrices_match_the_paper():
    A, Bv = lmu_continuous(3, 1.0)
    expected = torch.tensor([[-1.0, -1.0, -1.0], [3.0, -3.0, -3.0], [-5.0, 5.0, -5.0]])
    torch.testing.assert_close(A, expected.double())
    torch.testing.assert_close(Bv, torch.tensor([1.0, -3.0, 5.0]).double())


def _shifted_legendre(d: int, r: torch.Tensor) -> torch.Tensor:
    """P_i(2r − 1), i < d, by Bonnet's recurrence: [d, len(r)]."""
    x = 2 * r - 1
    P = [torch.ones_like(x), x]
    for i in range(1, d - 1):
        P.append(((2 * i + 1) * x * P[i] - i * P[i - 1]) / (i + 1))
    return torch.stack(P[:d])


def test_lmu_memory_of_a_sinusoid_reconstructs_the_window():
    """u(t − θ') ≈ Σ_i P_i(2θ'/θ − 1) m_i(t) over the window θ' ∈ [0, θ]."""
    d, theta, T = 12, 200.0, 600
    Abar, Bbar = lmu_matrices(d, theta)
    t = torch.arange(T, dtype=torch.float64)
    u = torch.sin(2 * math.pi * t / 150.0)
    m, _ = family("lmu").forms["fft"](u[None, :, None], Abar, Bbar)
    m_T = m[0, -1, 0]  # [d]
    lags = torch.arange(0, int(theta) + 1, dtype=torch.float64)
    recon = _shifted_legendre(d, lags / theta).T @ m_T
    truth = u[T - 1 - lags.long()]
    err = (recon - truth).abs()
    assert err[5:-5].max() < 0.05, err.max()


@pytest.mark.parametrize("form", ["recurrent", "fft"])
def test_lmu_memory_order_zero_is_refused_by_both_forms(form):
    """d = 0 gave an empty result (recurrent) and an MKL error (fft): a ValueError naming d."""
    fam = family("lmu")
    x = fam.make_inputs("default", 1, 8, 2, dtype=torch.float64, d=0)
    with pytest.raises(ValueError, match="memory order d"):
        fam.forms[form](**x, output_final_state=True)
