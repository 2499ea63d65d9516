"""The sLSTM op family: the fused form against the recurrent reference (float64, forward and
backward, initial states, both forget gates), both against the xlstm package's vanilla sLSTM cell
with mapped weights, the stabiliser at extreme pre-activations, and argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.ops.registry import family
from seqlab.ops.slstm import fused_slstm, make_slstm_inputs, recurrent_slstm, slstm

F64 = {"rtol": 1e-9, "atol": 1e-9}


def _inputs(B, T, H, D, seed, variant="sigmoid", dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = make_slstm_inputs(variant, B, T, H, dtype=torch.float64, generator=g, D=D)
    x["x"] = x["x"] * scale
    return {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in x.items()}


def _state(B, H, D, seed, dtype=torch.float64, kind="random"):
    """A reachable state [B, 4, H, D]: |c| ≤ n, n > 0, h = σ(·) c / n, any m; or the empty one."""
    if kind == "empty":
        return torch.zeros(B, 4, H, D, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 101)
    n = torch.rand(B, H, D, generator=g, dtype=torch.float64) * 3 + 0.05
    c = n * (2 * torch.rand(B, H, D, generator=g, dtype=torch.float64) - 1)
    h = torch.rand(B, H, D, generator=g, dtype=torch.float64) * c / n
    m = 4 * torch.randn(B, H, D, generator=g, dtype=torch.float64)
    return torch.stack((h, c, n, m), dim=1).to(dtype)


def _run(fn, x, S0=None, seed=0):
    """o, final state and the gradients of a seeded weighted sum of both, by input name."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if torch.is_tensor(v)}
    if S0 is not None:
        leaves["initial_state"] = S0.clone().requires_grad_(True)
    opts = {k: v for k, v in x.items() if not torch.is_tensor(v)}
    o, S = fn(**leaves, **opts, output_final_state=True)
    g = torch.Generator().manual_seed(seed + 7)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    loss = (o * wo).sum() + (S * ws).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, grads, strict=True))


def _assert_same(a, b, tol, label=""):
    torch.testing.assert_close(a[0], b[0], **tol, msg=lambda m: f"{label} o: {m}")
    torch.testing.assert_close(a[1], b[1], **tol, msg=lambda m: f"{label} state: {m}")
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(
            a[2][name], b[2][name], **tol, msg=lambda m, name=name: f"{label} d/d{name}: {m}"
        )


# shapes, both forget gates, no / a random / the empty initial state, plain and large inputs
CASES = dict(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    H=st.integers(1, 3),
    D=st.integers(1, 6),
    variant=st.sampled_from(["sigmoid", "exp"]),
    init=st.sampled_from([None, "random", "empty"]),
    scale=st.sampled_from([1.0, 5.0]),
    seed=st.integers(0, 1000),
)


@settings(max_examples=25, deadline=None)
@given(**CASES)
def test_fused_matches_recurrent_float64(B, T, H, D, variant, init, scale, seed):
    x = _inputs(B, T, H, D, seed, variant, scale=scale)
    S0 = None if init is None else _state(B, H, D, seed, kind=init)
    _assert_same(_run(fused_slstm, x, S0, seed), _run(recurrent_slstm, x, S0, seed), F64)


@settings(max_examples=20, deadline=None)
@given(**CASES)
def test_fused_forward_without_grad_matches_recurrent_float64(
    B, T, H, D, variant, init, scale, seed
):
    """Without a backward to come the fused form keeps no history but the outputs (another
    path through its loop): the same outputs and final state."""
    x = _inputs(B, T, H, D, seed, variant, scale=scale)
    S0 = None if init is None else _state(B, H, D, seed, kind=init)
    before = None if S0 is None else S0.clone()
    with torch.no_grad():
        got = fused_slstm(**x, initial_state=S0, output_final_state=True)
    if S0 is not None:  # the state buffers are the form's own, never the caller's
        torch.testing.assert_close(S0, before, rtol=0, atol=0)
    want = recurrent_slstm(**x, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(got[0], want[0], **F64)
    torch.testing.assert_close(got[1], want[1], **F64)
    kept = fused_slstm(**x, initial_state=S0, output_final_state=True)  # no leaf needs grad
    torch.testing.assert_close(kept[0], got[0], rtol=0, atol=0)


def test_without_bias_equals_zero_bias():
    x = _inputs(2, 9, 2, 3, 0)
    x_nob = {k: v for k, v in x.items() if k != "b"}
    for fn in (fused_slstm, recurrent_slstm):
        o, S = fn(**{**x, "b": torch.zeros_like(x["b"])}, output_final_state=True)
        o2, S2 = fn(**x_nob, output_final_state=True)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)
        torch.testing.assert_close(S2, S, rtol=0, atol=0)


def test_two_passes_equal_one():
    """The final state carries everything: [0, t) then [t, T) from its state equals [0, T)."""
    x = _inputs(2, 30, 2, 4, 3)
    o, S = fused_slstm(**x, output_final_state=True)
    first = {k: v[:, :11] if k == "x" else v for k, v in x.items()}
    rest = {k: v[:, 11:] if k == "x" else v for k, v in x.items()}
    o1, S1 = fused_slstm(**first, output_final_state=True)
    o2, S2 = recurrent_slstm(**rest, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **F64)
    torch.testing.assert_close(S2, S, **F64)


@pytest.mark.parametrize("variant", ["sigmoid", "exp"])
def test_outputs_do_not_depend_on_the_stabiliser(variant):
    """(c, n, m) and (c e^δ, n e^δ, m − δ) are one state: the outputs agree, whatever δ."""
    x = _inputs(2, 17, 2, 3, 5, variant)
    S0 = _state(2, 2, 3, 5)
    delta = 3 * torch.randn(2, 2, 3, dtype=torch.float64)
    S1 = S0.clone()
    S1[:, 1] *= delta.exp()
    S1[:, 2] *= delta.exp()
    S1[:, 3] -= delta
    for fn in (fused_slstm, recurrent_slstm):
        torch.testing.assert_close(
            fn(**x, initial_state=S1)[0], fn(**x, initial_state=S0)[0], **F64
        )


def _cell(H, D, dtype):
    """The xlstm package's vanilla sLSTM cell (what sLSTMLayer runs on CPU) in `dtype`."""
    cell_mod = pytest.importorskip("xlstm.blocks.slstm.cell")
    config = cell_mod.sLSTMCellConfig(hidden_size=H * D, num_heads=H, backend="vanilla")
    return cell_mod.sLSTMCell(config).to(dtype)


def _run_cell(cell, x, S0=None, seed=0):
    """The package's cell on our inputs mapped to its layout: x [B, T, 4·H·D] gate-major (its
    "BSGNH" input), our R and b written through its external `recurrent_kernel` [H, D, 4, D] and
    `bias` [H, 4, D], the state as [4, B, H·D]; its gradients mapped back to our layout."""
    B, T, _, H, D = x["x"].shape
    cell.recurrent_kernel[:] = x["R"]
    cell.bias[:] = x["b"]
    xin = x["x"].reshape(B, T, 4 * H * D).clone().requires_grad_(True)
    state = None
    if S0 is not None:
        state = S0.transpose(0, 1).reshape(4, B, H * D).clone().requires_grad_(True)
    out, S = cell(xin, state)  # out [B, H, T, D] ("BNSH"), S [4, B, H·D]
    o = out.transpose(1, 2)
    S = S.view(4, B, H, D).transpose(0, 1)
    g = torch.Generator().manual_seed(seed + 7)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    loss = (o * wo).sum() + (S * ws).sum()
    leaves = [xin, cell._recurrent_kernel_, cell._bias_] + ([state] if state is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    out_grads = {
        "x": grads[0].view(B, T, 4, H, D),
        "R": cell._recurrent_kernel_int2ext(grads[1]),
        "b": cell._bias_int2ext(grads[2]),
    }
    if state is not None:
        out_grads["initial_state"] = grads[3].view(4, B, H, D).transpose(0, 1)
    return o.detach(), S.detach(), out_grads


@pytest.mark.parametrize(
    ("B", "T", "H", "D", "init", "scale", "seed"),
    [
        (1, 1, 1, 4, None, 1.0, 0),
        (2, 7, 2, 3, "random", 1.0, 1),
        (3, 33, 4, 2, None, 1.0, 2),
        (2, 20, 1, 8, "random", 5.0, 3),
        (2, 12, 3, 5, "empty", 30.0, 4),
    ],
)
def test_matches_the_xlstm_package_float64(B, T, H, D, init, scale, seed):
    """Forward outputs, final (h, c, n, m) and every gradient (inputs, recurrent kernel, bias,
    initial state) against the package's vanilla cell, both in float64, to round-off."""
    cell = _cell(H, D, torch.float64)
    x = _inputs(B, T, H, D, seed, scale=scale)
    S0 = None if init is None else _state(B, H, D, seed, kind=init)
    ref = _run_cell(cell, x, S0, seed)
    for fn in (fused_slstm, recurrent_slstm):
        _assert_same(_run(fn, x, S0, seed), ref, F64, fn.__name__)


def test_matches_the_xlstm_package_float32():
    cell = _cell(2, 16, torch.float32)
    x = _inputs(2, 50, 2, 16, 9, dtype=torch.float32)
    S0 = _state(2, 2, 16, 9, dtype=torch.float32)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    _assert_same(_run(fused_slstm, x, S0), _run_cell(cell, x, S0), tol)


def test_the_registered_peer_is_the_package():
    peer = family("slstm").peers["xlstm"]()
    if peer is None:
        pytest.skip("xlstm is not installed")
    x = _inputs(2, 15, 3, 4, 11)
    o_ref, _ = recurrent_slstm(**x)
    torch.testing.assert_close(peer(**x), o_ref, **F64)
    with pytest.raises(ValueError, match="sigmoid"):
        peer(**_inputs(1, 3, 1, 2, 0, variant="exp"))


@pytest.mark.parametrize("variant", ["sigmoid", "exp"])
@pytest.mark.parametrize("big", [50.0, 1e3, 1e5])
def test_extreme_pre_activations_stay_finite(variant, big):
    """Gate pre-activations of ±big on 30 % of entries (exp(big) overflows float64 beyond 710):
    the stabiliser keeps o, the state and every gradient finite, the fused form equals the
    reference, and float32 agrees with the float64 reference to its rounding of m."""
    x = _inputs(2, 25, 2, 4, 6, variant)
    g = torch.Generator().manual_seed(6)
    signs = torch.randint(0, 2, x["x"].shape, generator=g).to(torch.float64) * 2 - 1
    pick = torch.rand(x["x"].shape, generator=g, dtype=torch.float64) < 0.3
    x["x"] = torch.where(pick, big * signs, x["x"])
    S0 = _state(2, 2, 4, 6)
    ref = _run(recurrent_slstm, x, S0)
    fused = _run(fused_slstm, x, S0)
    for run in (ref, fused):
        assert torch.isfinite(run[0]).all() and torch.isfinite(run[1]).all()
        assert all(torch.isfinite(v).all() for v in run[2].values())
    _assert_same(fused, ref, {"rtol": 1e-9, "atol": 1e-9 * big})
    x32 = {k: v.float() if torch.is_tensor(v) else v for k, v in x.items()}
    run32 = _run(fused_slstm, x32, S0.float())
    # float32 holds m ≈ ±big to eps32 · big, and a = log f + m rounds to that
    tol = max(1e-4, 4e-7 * big)
    torch.testing.assert_close(run32[0].double(), ref[0], rtol=tol, atol=tol)
    assert torch.isfinite(run32[1]).all()
    assert all(torch.isfinite(v).all() for v in run32[2].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_run_in_float32(dtype):
    x = _inputs(2, 12, 2, 4, 8, dtype=dtype)
    o, S = fused_slstm(**x, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    ref, _ = recurrent_slstm(**{k: v.double() if torch.is_tensor(v) else v for k, v in x.items()})
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)


def test_empty_batch():
    x = _inputs(1, 5, 2, 3, 0)
    x["x"] = x["x"][:0]
    for form in ("fused", "recurrent"):
        o, S = slstm(**x, form=form, output_final_state=True)
        assert o.shape == (0, 5, 2, 3) and S.shape == (0, 4, 2, 3)


def test_errors():
    x = _inputs(2, 5, 2, 3, 0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 4, H, D\]"):
        fused_slstm(**{**x, "x": x["x"][:, :, :3]})
    with pytest.raises(ValueError, match="R"):
        fused_slstm(**{**x, "R": x["R"][:, :2]})
    with pytest.raises(ValueError, match="b"):
        fused_slstm(**{**x, "b": x["b"][:1]})
    with pytest.raises(ValueError, match="initial_state"):
        fused_slstm(**x, initial_state=torch.zeros(2, 3, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="forget"):
        fused_slstm(**{**x, "forget": "relu"})
    with pytest.raises(ValueError, match="T = 0"):
        recurrent_slstm(**{**x, "x": x["x"][:, :0]})
    with pytest.raises(TypeError, match="floating-point"):
        fused_slstm(**{**x, "R": x["R"].long()})
    with pytest.raises(ValueError, match="form"):
        slstm(**x, form="chunk")


def test_fused_backward_splits_a_tie_of_the_stabiliser_max_as_the_recurrent_form():
    """With the exponential forget gate, ĩ = f̃ = 1 and m₀ = 0 make ĩ_t = log f_t + m_{t−1} at
    every step: torch.maximum (the recurrent form) gives half the gradient to each side, and the
    fused backward must too (it gave all to ĩ: d/dx differed by 0.56 on a scale of 0.75 where
    the loss reads the final state)."""
    B, T, H, D = 1, 3, 1, 2
    x = torch.zeros(B, T, 4, H, D, dtype=torch.float64)
    x[:, :, 0], x[:, :, 1], x[:, :, 2], x[:, :, 3] = 1.0, 1.0, 0.7, 0.3
    half, one = torch.full((B, H, D), 0.5), torch.ones(B, H, D)
    S0 = torch.stack([torch.zeros(B, H, D), half, one, torch.zeros(B, H, D)], 1).double()
    R = torch.zeros(H, D, 4, D, dtype=torch.float64)

    def grads(form):
        xs, s0 = x.clone().requires_grad_(), S0.clone().requires_grad_()
        o, S = slstm(xs, R, forget="exp", initial_state=s0, form=form, output_final_state=True)
        gen = torch.Generator().manual_seed(5)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
        return torch.autograd.grad(loss, (xs, s0))

    for got, want in zip(grads("fused"), grads("recurrent"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
