"""The mlstm family against mlstm_kernels' native kernels (float64: outputs, final states and
gradients), strong gates, the state packing, and argument errors. The shared suite
(tests/ops/test_families.py) holds every form to the recurrent one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.ops.mlstm import (
    chunk_mlstm,
    mlstm,
    pack_state,
    parallel_mlstm,
    recurrent_mlstm,
    unpack_state,
)

TOL = {"rtol": 1e-9, "atol": 1e-9}
GATES = {  # (input gate scale and shift, forget gate scale and shift) of the pre-activations
    "mild": (1.0, 0.0, 1.0, 3.0),
    "spread": (3.0, 0.0, 3.0, 2.0),
    "strong": (10.0, 5.0, 30.0, -20.0),  # exp(ĩ) up to e^35, log f down to −60 a step
}


def inputs(B, T, H, K, V, gates="spread", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    si, mi, sf, mf = GATES[gates]
    return {
        "q": randn(B, T, H, K),
        "k": randn(B, T, H, K),
        "v": randn(B, T, H, V),
        "i": si * randn(B, T, H) + mi,
        "f": sf * randn(B, T, H) + mf,
    }


def leaves(x):
    return {n: t.clone().requires_grad_() for n, t in x.items()}


def grads(o, S, x, extra=()):
    gen = torch.Generator().manual_seed(5)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for s in S:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return torch.autograd.grad(loss, [*x.values(), *extra])


def tr(t):
    return t.transpose(1, 2)


def random_state(B, H, K, V, seed=9):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    n = torch.randn(B, H, K, generator=gen, dtype=torch.float64)
    m = 2 * torch.randn(B, H, generator=gen, dtype=torch.float64)
    return C, n, m


@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "seed"), [(2, 64, 3, 8, 5, 0), (1, 128, 2, 16, 16, 1)]
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_mlstm_kernels_chunkwise(B, T, H, K, V, seed, gates, with_state):
    chunkwise = pytest.importorskip("mlstm_kernels.torch.chunkwise.native")
    x = inputs(B, T, H, K, V, gates, seed)
    state = [t.requires_grad_() for t in random_state(B, H, K, V)] if with_state else []

    xa = leaves(x)
    S0 = pack_state(*state) if with_state else None
    o, S = chunk_mlstm(**xa, initial_state=S0, output_final_state=True, chunk_size=32)
    ours = (o, *grads(o, unpack_state(S), xa, state))

    xb = leaves(x)
    kw = {}
    if with_state:
        kw = {"c_initial": state[0], "n_initial": state[1], "m_initial": state[2][..., None]}
    h, (C, n, m) = chunkwise.mlstm_chunkwise__native_autograd(
        *(tr(xb[name]) for name in "qkvif"), **kw, return_last_states=True, chunk_size=32
    )
    theirs = (tr(h), *grads(tr(h), (C, n, m[..., 0]), xb, state))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(unpack_state(S), (C, n, m[..., 0]), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("T", [17, 45, 100])
def test_odd_lengths_against_the_chunkwise_kernel_padded(T):
    """Their chunkwise kernel needs whole chunks: inputs padded at the end, the valid part
    compared (padding after the last token changes nothing before it)."""
    chunkwise = pytest.importorskip("mlstm_kernels.torch.chunkwise.native")
    x = inputs(2, T, 2, 8, 8, seed=T)
    o, _ = chunk_mlstm(**x, chunk_size=16)
    pad = -T % 16
    xs = [F.pad(x[n], (0, 0) * (x[n].dim() - 2) + (0, pad)) for n in "qkvif"]
    h = chunkwise.mlstm_chunkwise__native_autograd(*map(tr, xs), chunk_size=16)
    torch.testing.assert_close(o, tr(h)[:, :T], **TOL)
    torch.testing.assert_close(recurrent_mlstm(**x)[0], o, **TOL)


@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize("T", [1, 33, 80])
def test_every_form_equals_mlstm_kernels_parallel(T, gates):
    """Their parallel kernel omits the m_0 = 0 term of the stabiliser, which the output sees only
    through eps · exp(m): with eps = 0 every form equals it whatever the gates."""
    parallel = pytest.importorskip("mlstm_kernels.torch.parallel.native")
    x = inputs(2, T, 3, 8, 6, gates, seed=T)
    xb = leaves(x)
    h = tr(parallel.mlstm_parallel__native_autograd(*(tr(xb[n]) for n in "qkvif"), eps=0.0))
    theirs = (h, *grads(h, (), xb))
    for form in ("recurrent", "chunk", "parallel"):
        xa = leaves(x)
        o, _ = mlstm(**xa, eps=0.0, form=form, chunk_size=16)
        for a, b in zip((o, *grads(o, (), xa)), theirs, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_default_eps_equals_mlstm_kernels_parallel_where_the_stabilisers_agree():
    parallel = pytest.importorskip("mlstm_kernels.torch.parallel.native")
    x = inputs(2, 50, 2, 8, 8)
    x["i"][:, 0] = x["i"][:, 0].abs()  # ĩ_1 ≥ log f_1: their m_t equals the recurrent one
    h = tr(parallel.mlstm_parallel__native_autograd(*(tr(x[n]) for n in "qkvif")))
    torch.testing.assert_close(chunk_mlstm(**x, chunk_size=16)[0], h, **TOL)


def test_recurrent_equals_mlstm_kernels_native_sequence_with_a_state():
    sequence = pytest.importorskip("mlstm_kernels.torch.recurrent.native_sequence")
    x = inputs(2, 30, 3, 8, 4, "strong")
    C0, n0, m0 = random_state(2, 3, 8, 4)
    h, (C, n, m) = sequence.mlstm_recurrent_sequence__native_fw(
        *(tr(x[n]) for n in "qkvif"),
        c_initial=C0,
        n_initial=n0,
        m_initial=m0[..., None],
        return_last_states=True,
        dtype_state=torch.float64,
    )
    o, S = recurrent_mlstm(**x, initial_state=pack_state(C0, n0, m0), output_final_state=True)
    torch.testing.assert_close(o, tr(h), **TOL)
    for a, b in zip(unpack_state(S), (C, n, m[..., 0]), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_extreme_gates_stay_finite_and_match_the_recurrent_form(form):
    x = inputs(1, 70, 2, 8, 8, "strong")
    x["f"][0, ::7] = -1e30  # forget everything
    x["i"][0, 3::11] = 700.0  # exp(ĩ) beyond float32
    x["i"][0, 5::13] = -1e4  # no input
    xa, xb = leaves(x), leaves(x)
    o, S = mlstm(**xa, form=form, chunk_size=16, output_final_state=True)
    r, R = recurrent_mlstm(**xb, output_final_state=True)
    ga, gb = grads(o, (S,), xa), grads(r, (R,), xb)
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in ga)
    torch.testing.assert_close(o, r, **TOL)
    torch.testing.assert_close(S, R, **TOL)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("form", ["recurrent", "chunk", "parallel"])
@pytest.mark.parametrize(("dtype", "big"), [(torch.float32, 120.0), (torch.float64, 800.0)])
def test_eps_zero_with_an_underflowing_exp_minus_m_stays_finite(form, dtype, big):
    """With eps = 0 and m so large that exp(−m) underflows, a zero query row gave 0 / 0 (NaN),
    and the chunk backward NaN at it and at the last chunk's zero padding (den² = 0): the
    readout's exp(−m) is floored at about √tiny. The forms agree forward and backward."""
    x = {n: t.to(dtype) for n, t in inputs(1, 9, 2, 4, 3).items()}
    x["q"][:, 3] = 0  # an all-zero query row
    x["i"] = torch.full_like(x["i"], big)
    x["f"] = torch.full_like(x["f"], 3.0)
    xa, xb = leaves(x), leaves(x)
    o, S = mlstm(**xa, eps=0.0, form=form, chunk_size=4, output_final_state=True)
    r, R = recurrent_mlstm(**xb, eps=0.0, output_final_state=True)
    assert torch.isfinite(o).all() and (o[:, 3] == 0).all()
    ga, gb = grads(o, (S,), xa), grads(r, (R,), xb)
    assert all(torch.isfinite(g).all() for g in ga)
    tol = TOL if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(o, r, **tol)
    torch.testing.assert_close(S, R, **tol)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_the_readout_floor_has_the_same_gradient_in_every_form():
    """|q·n| below the floor with eps = 0: the floor takes the max's gradient (d lo / dm = −lo
    in autograd as in the chunk backward); the forms agree to 1e-9 of each tensor's scale."""
    x = inputs(1, 9, 2, 4, 3)
    x["q"][:, 3] *= 1e-160  # |q·n| ≈ 1e-160, below the float64 floor √tiny ≈ 1.5e-154
    x["i"] = torch.full_like(x["i"], 800.0)
    x["f"] = torch.full_like(x["f"], 3.0)
    ref = None
    for form in ("recurrent", "chunk", "parallel"):
        xa = leaves(x)
        o, S = mlstm(**xa, eps=0.0, form=form, chunk_size=4, output_final_state=True)
        got = (o, S, *grads(o, (S,), xa))
        assert all(torch.isfinite(t).all() for t in got)
        ref = got if ref is None else ref
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_float32_chunk_is_close_to_float64():
    x = inputs(2, 200, 2, 16, 16)
    ref = recurrent_mlstm(**x)[0]
    o = chunk_mlstm(**{n: t.float() for n, t in x.items()})[0]
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)


def test_state_packing_round_trips():
    C, n, m = random_state(2, 3, 4, 5)
    S = pack_state(C, n, m)
    assert S.shape == (2, 3, 5, 6) and not S[..., -1, :-1].any()
    for a, b in zip(unpack_state(S), (C, n, m), strict=True):
        assert torch.equal(a, b)


def test_chunked_runs_carry_the_state():
    x = inputs(1, 90, 2, 8, 8)
    o, S = chunk_mlstm(**x, output_final_state=True, chunk_size=16)
    a = {n: t[:, :37] for n, t in x.items()}
    b = {n: t[:, 37:] for n, t in x.items()}
    o1, S1 = chunk_mlstm(**a, output_final_state=True, chunk_size=16)
    o2, S2 = recurrent_mlstm(**b, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **TOL)
    torch.testing.assert_close(S2, S, **TOL)


def test_sliced_forward_without_autograd_equals_one_pass(monkeypatch):
    import seqlab.ops._common as common

    x = inputs(1, 100, 2, 8, 8)
    o, S = chunk_mlstm(**x, output_final_state=True, chunk_size=16)
    monkeypatch.setattr(common, "SLICE_ROWS", 32)  # slices of 16 tokens × 2 heads
    with torch.no_grad():
        o2, S2 = chunk_mlstm(**x, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(o2, o, **TOL)
    torch.testing.assert_close(S2, S, **TOL)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda x: x.update(i=x["i"][..., :1]), ValueError, "i has shape"),
        (lambda x: x.update(f=x["f"][:, :, :, None]), ValueError, "f must have rank 3"),
        (lambda x: x.update(i=x["i"].long()), TypeError, "i must be a floating-point"),
        (lambda x: x["f"].__setitem__((0, 0, 0), float("nan")), ValueError, "must be finite"),
        (lambda x: x.update(initial_state=torch.zeros(1, 2, 8, 8)), ValueError, "initial_state"),
        (lambda x: x.update(eps=-1.0), ValueError, "eps must be"),
        (lambda x: x.update(form="scan"), ValueError, "form must be one of"),
        (lambda x: x.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda x: x.update(v=x["v"][:, :3]), ValueError, "v has shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    x = inputs(1, 6, 2, 8, 8)
    change(x)
    with pytest.raises(error, match=match):
        mlstm(**x)


def test_parallel_form_with_a_state_equals_the_recurrent_form():
    x = inputs(2, 40, 2, 8, 8, "strong")
    S0 = pack_state(*random_state(2, 2, 8, 8))
    o, S = parallel_mlstm(**x, initial_state=S0, output_final_state=True)
    r, R = recurrent_mlstm(**x, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o, r, **TOL)
    torch.testing.assert_close(S, R, **TOL)


# The chunk form's hand-written backward (`_ChunkMLSTM`) against autograd through the recurrent
# form, float64. Gate settings beyond GATES: "huge" input gates (ĩ up to ~60: the stabiliser
# switches to the input branch m_t = ĩ_t at many steps), "weak" inputs (exp(ĩ) ≈ e^−6: the
# normaliser stays small, so |den| < exp(−m) and the readout's max takes its other branch).
BACKWARD_GATES = {
    **GATES,
    "huge": (15.0, 20.0, 3.0, 1.0),
    "weak": (1.0, -6.0, 1.0, 3.0),
}


def gate_inputs(B, T, H, K, V, gates, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    si, mi, sf, mf = BACKWARD_GATES[gates]
    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    return {**x, "i": si * randn(B, T, H) + mi, "f": sf * randn(B, T, H) + mf}


def run_with_grads(fn, x, S0, loss_on, seed, **kwargs):
    """fn's output, final state and the gradients of a seeded random weighting of the output
    ("o"), of the final state ("state") or of both, with respect to q, k, v, i, f (and S0)."""
    xs = leaves(x)
    S0 = None if S0 is None else S0.clone().requires_grad_()
    o, S = fn(**xs, initial_state=S0, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = 0
    if loss_on in ("o", "both"):
        loss = loss + (o * wo).sum()
    if loss_on in ("state", "both"):
        loss = loss + (S * ws).sum()
    wrt = [*xs.values(), *([] if S0 is None else [S0])]
    names = [*xs, *([] if S0 is None else ["initial_state"])]
    return (
        o.detach(),
        S.detach(),
        dict(zip(names, torch.autograd.grad(loss, wrt, materialize_grads=True), strict=True)),
    )


def assert_grads_match(actual, expected, label):
    """Each tensor to 1e-9 of its own largest entry. The floor (1e-30) sits far above the chunk
    form's exp clamp at e^−80 (what it stands in for changes results by ~1e-35 of their scale)
    and far below any gradient these inputs give."""
    o, S, grads = actual
    o_ref, S_ref, grads_ref = expected
    pairs = [("o", o, o_ref), ("state", S, S_ref)]
    pairs += [(f"d/d{n}", grads[n], grads_ref[n]) for n in grads_ref]
    assert grads.keys() == grads_ref.keys()
    for name, a, b in pairs:
        atol = 1e-9 * b.abs().max().item() + 1e-30
        torch.testing.assert_close(
            a, b, rtol=1e-9, atol=atol, msg=lambda m, n=name: f"{label} {n}: {m}"
        )


@pytest.mark.parametrize("gates", list(BACKWARD_GATES))
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "chunk_size", "seed"),
    [
        (1, 40, 2, 8, 5, 16, 0),  # T not a multiple of the chunk, K ≠ V
        (2, 7, 3, 4, 6, 16, 1),  # T < chunk, B > 1
        (2, 48, 2, 6, 6, 16, 2),  # whole chunks
        (1, 1, 1, 3, 2, 4, 3),  # one step
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_backward_equals_autograd_through_the_recurrent_form(
    B, T, H, K, V, chunk_size, seed, gates, with_state
):
    x = gate_inputs(B, T, H, K, V, gates, seed)
    S0 = pack_state(*random_state(B, H, K, V, seed=seed + 10)) if with_state else None
    for loss_on in ("o", "state", "both"):
        label = f"{gates} state={with_state} loss on {loss_on}"
        ours = run_with_grads(chunk_mlstm, x, S0, loss_on, seed, chunk_size=chunk_size)
        ref = run_with_grads(recurrent_mlstm, x, S0, loss_on, seed)
        assert_grads_match(ours, ref, label)


def test_backward_gate_settings_reach_every_branch(monkeypatch):
    """The gate settings above are only a test of the max terms' gradients if they take both
    sides: the readout's max(|den|, exp(−m)) and the stabiliser's max(log f + m, ĩ)."""
    import seqlab.ops.mlstm as mlstm_ops

    readout = mlstm_ops._readout
    lo_side = []

    def spy(num, den, m, eps):
        lo_side.append(den.abs() < torch.exp(-m))
        return readout(num, den, m, eps)

    monkeypatch.setattr(mlstm_ops, "_readout", spy)
    for gates in BACKWARD_GATES:
        x = gate_inputs(1, 40, 2, 8, 5, gates, 0)
        lo_side.clear()
        recurrent_mlstm(**x)
        share = torch.stack(lo_side).double().mean().item()
        lf = F.logsigmoid(x["f"])
        m, switch = torch.zeros(1, 2, dtype=torch.float64), []
        for t in range(40):
            switch.append(x["i"][:, t] > lf[:, t] + m)
            m = torch.maximum(lf[:, t] + m, x["i"][:, t])
        switched = torch.stack(switch).double().mean().item()
        if gates == "weak":  # the other side of the readout's max throughout
            assert share == 1, share
        else:  # both sides of the stabiliser's max, the readout's max too but for huge inputs
            top = 0.95 if gates == "huge" else 0.5
            assert 0.1 < switched < 0.95 and 0 < share < top, (gates, share, switched)


def test_chunk_backward_passes_gradcheck():
    x = gate_inputs(1, 5, 1, 3, 2, "spread", 4)
    S0 = pack_state(*random_state(1, 1, 3, 2, seed=4))
    args = [t.clone().requires_grad_() for t in (*x.values(), S0)]

    def fn(q, k, v, i, f, S0):
        return chunk_mlstm(q, k, v, i, f, initial_state=S0, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, args)


def test_float32_chunk_gradients_are_close_to_float64():
    x = gate_inputs(2, 150, 2, 16, 16, "spread", 5)
    S0 = pack_state(*random_state(2, 2, 16, 16))
    _, _, ref = run_with_grads(recurrent_mlstm, x, S0, "both", 0)
    x32 = {n: t.float() for n, t in x.items()}
    _, _, grads = run_with_grads(chunk_mlstm, x32, S0.float(), "both", 0)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        scale = ref[name].abs().max()
        torch.testing.assert_close(g.double(), ref[name], rtol=1e-4, atol=1e-4 * scale)


def test_chunk_gradient_of_some_inputs_only():
    """Inputs that do not require a gradient get none; the others are unchanged."""
    x = gate_inputs(1, 30, 2, 4, 4, "spread", 6)
    _, _, full = run_with_grads(chunk_mlstm, x, None, "both", 0, chunk_size=8)
    v = x["v"].clone().requires_grad_()
    o, S = chunk_mlstm(**{**x, "v": v}, output_final_state=True, chunk_size=8)
    gen = torch.Generator().manual_seed(0)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    (dv,) = torch.autograd.grad(loss, [v])
    torch.testing.assert_close(dv, full["v"], **TOL)


@pytest.mark.parametrize("gates", ["spread", "strong", "huge"])
@pytest.mark.parametrize(("B", "T", "H", "chunk_size"), [(1, 70, 2, 16), (2, 45, 1, 8)])
def test_chunk_backward_over_time_slices_equals_the_recurrent_form(
    monkeypatch, B, T, H, chunk_size, gates
):
    """With autograd the chunk form runs in slices of whole chunks, the state and its gradient
    carried between them; slices of one or two chunks here (the last one shorter)."""
    import seqlab.ops.mlstm as mlstm_ops

    monkeypatch.setattr(mlstm_ops, "GRAD_SLICE_ROWS", 2 * B * H * chunk_size)
    x = gate_inputs(B, T, H, 8, 5, gates, T)
    for S0 in (None, pack_state(*random_state(B, H, 8, 5))):
        ours = run_with_grads(chunk_mlstm, x, S0, "both", 1, chunk_size=chunk_size)
        ref = run_with_grads(recurrent_mlstm, x, S0, "both", 1)
        assert_grads_match(ours, ref, f"{gates} state={S0 is not None}")
