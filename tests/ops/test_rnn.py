"""The rnn family (LSTM, GRU): both forms against torch.nn.LSTM / torch.nn.GRU modules whose
weights are loaded from the op's, float64 forward and backward (inputs, weights, initial state),
H heads as one module with a block-diagonal recurrent weight; the peer; float32 and half inputs;
streaming; FLOPs where the counter sees them; errors for bad input."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops.registry import family
from seqlab.ops.rnn import (
    GATES,
    dense_heads,
    fused_rnn,
    make_rnn_inputs,
    recurrent_rnn,
    rnn,
    rnn_flops,
    torch_weights,
)

F64 = {"rtol": 1e-10, "atol": 1e-12}
FORMS = {"recurrent": recurrent_rnn, "fused": fused_rnn}
# the fused form with each layout of the heads: a call per head, one block-diagonal call
FUSED = {f"fused/{heads}": partial(fused_rnn, heads=heads) for heads in ("loop", "dense")}


def inputs(cell, B, T, H, D, N, seed, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = make_rnn_inputs(cell, B, T, H, dtype=dtype, generator=gen, D=D, N=N)
    if not bias:
        x["b_ih"] = x["b_hh"] = None
    return x


def random_state(cell, B, H, N, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (B, H, N)
    h = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (h, torch.randn(shape, generator=gen, dtype=torch.float64)) if cell == "lstm" else h


def state_tensors(S):
    return list(S) if isinstance(S, tuple) else [S]


def loss_of(o, S, seed):
    """A seeded random weighted sum of the output and every state tensor."""
    gen = torch.Generator().manual_seed(seed + 2)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for s in state_tensors(S):
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return loss


def run_op(fn, x, S0, seed):
    """(o, state, grads by name) of an op form; grads of x, the weights and the initial state."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if torch.is_tensor(t)}
    S0 = None if S0 is None else [s.clone().requires_grad_() for s in state_tensors(S0)]
    init = None if S0 is None else (tuple(S0) if x["cell"] == "lstm" else S0[0])
    o, S = fn(**leaves, cell=x["cell"], initial_state=init, output_final_state=True)
    wrt = list(leaves.values()) + (S0 or [])
    grads = torch.autograd.grad(loss_of(o, S, seed), wrt)
    names = list(leaves) + ["h0", "c0"][: len(S0 or [])]
    return o.detach(), [s.detach() for s in state_tensors(S)], dict(zip(names, grads, strict=True))


def run_module(x, S0, seed):
    """The same run on a torch.nn.LSTM / GRU of hidden size H·N with the op's weights loaded,
    head by head and gate by gate (recurrent weight block-diagonal); its gradients read back
    into the op's layout."""
    cell, W_ih, W_hh, b_ih, b_hh = (x[k] for k in ("cell", "W_ih", "W_hh", "b_ih", "b_hh"))
    G, (H, _, N), D = GATES[cell], W_hh.shape, W_ih.shape[2]
    B, T, _ = x["x"].shape
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    module = cls(D, H * N, bias=b_ih is not None, batch_first=True, dtype=torch.float64)

    def rows(g, k):  # gate g of head k in the module's rows
        return slice(g * H * N + k * N, g * H * N + (k + 1) * N)

    with torch.no_grad():
        module.weight_hh_l0.zero_()
        for k in range(H):
            for g in range(G):
                mine = slice(g * N, (g + 1) * N)
                module.weight_ih_l0[rows(g, k)] = W_ih[k, mine]
                module.weight_hh_l0[rows(g, k), k * N : (k + 1) * N] = W_hh[k, mine]
                if b_ih is not None:
                    module.bias_ih_l0[rows(g, k)] = b_ih[k, mine]
                    module.bias_hh_l0[rows(g, k)] = b_hh[k, mine]
    xs = x["x"].clone().requires_grad_()
    S0 = None if S0 is None else [s.clone().requires_grad_() for s in state_tensors(S0)]
    hx = None
    if S0 is not None:
        hx = [s.reshape(B, H * N)[None] for s in S0]
        hx = tuple(hx) if cell == "lstm" else hx[0]
    o, S = module(xs, hx)
    o = o.view(B, T, H, N)
    S = tuple(s[0].view(B, H, N) for s in state_tensors(S))
    S = S if cell == "lstm" else S[0]
    params = dict(module.named_parameters())
    wrt = [xs, *params.values(), *(S0 or [])]
    names = ["x", *params, *("h0", "c0")[: len(S0 or [])]]
    grads = dict(zip(names, torch.autograd.grad(loss_of(o, S, seed), wrt), strict=True))
    out = {"x": grads["x"], "W_ih": torch.empty_like(W_ih), "W_hh": torch.empty_like(W_hh)}
    if b_ih is not None:
        out["b_ih"], out["b_hh"] = torch.empty_like(b_ih), torch.empty_like(b_hh)
    for k in range(H):
        for g in range(G):
            mine = slice(g * N, (g + 1) * N)
            out["W_ih"][k, mine] = grads["weight_ih_l0"][rows(g, k)]
            out["W_hh"][k, mine] = grads["weight_hh_l0"][rows(g, k), k * N : (k + 1) * N]
            if b_ih is not None:
                out["b_ih"][k, mine] = grads["bias_ih_l0"][rows(g, k)]
                out["b_hh"][k, mine] = grads["bias_hh_l0"][rows(g, k)]
    for name in ("h0", "c0")[: len(S0 or [])]:
        out[name] = grads[name]
    return o.detach(), [s.detach() for s in state_tensors(S)], out


def assert_same(actual, expected, label, tol=F64):
    o, S, grads = actual
    o_ref, S_ref, grads_ref = expected
    torch.testing.assert_close(o, o_ref, **tol, msg=lambda m: f"{label} o: {m}")
    torch.testing.assert_close(S, S_ref, **tol, msg=lambda m: f"{label} state: {m}")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], grads_ref[name], **tol, msg=lambda m, n=name: f"{label} d/d{n}: {m}"
        )


@settings(max_examples=40, deadline=None)
@given(
    cell=st.sampled_from(["lstm", "gru"]),
    B=st.integers(1, 3),
    T=st.sampled_from([1, 2, 7, 23]),
    H=st.integers(1, 3),
    D=st.integers(1, 6),
    N=st.integers(1, 5),
    bias=st.booleans(),
    init=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_both_forms_equal_torch_nn_modules_float64(cell, B, T, H, D, N, bias, init, seed):
    x = inputs(cell, B, T, H, D, N, seed, bias=bias)
    S0 = random_state(cell, B, H, N, seed) if init else None
    expected = run_module(x, S0, seed)
    for form, fn in {**FORMS, **FUSED}.items():
        assert_same(run_op(fn, x, S0, seed), expected, f"{cell} {form} H={H}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("T", "H"), [(1, 1), (40, 1), (33, 4)])
def test_realistic_widths_equal_torch_nn_modules(cell, T, H):
    """The family's make_inputs at widths a model uses (strong gates: ×4 tokens, forget bias)."""
    x = inputs(cell, 2, T, H, 24, 16, seed=T)
    S0 = random_state(cell, 2, H, 16, seed=T)
    expected = run_module(x, S0, 5)
    for form, fn in {**FORMS, **FUSED}.items():
        assert_same(run_op(fn, x, S0, 5), expected, f"{cell} {form}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("H", [1, 3])
def test_the_peer_is_the_same_function_with_its_gradients(cell, H):
    fam = family("rnn")
    peer = fam.peers["torch.nn"]()
    x = inputs(cell, 2, 11, H, 5, 4, seed=H)
    tensors = {n: t.clone().requires_grad_() for n, t in x.items() if torch.is_tensor(t)}
    o = peer(**tensors, cell=cell)
    ref, _ = recurrent_rnn(**x)
    torch.testing.assert_close(o, ref, **F64)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
    grads = torch.autograd.grad((o * w).sum(), list(tensors.values()))
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if torch.is_tensor(t)}
    o_ref, _ = recurrent_rnn(**leaves, cell=cell)
    grads_ref = torch.autograd.grad((o_ref * w).sum(), list(leaves.values()))
    for name, a, b in zip(tensors, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **F64, msg=name)


def test_torch_weights_lay_out_the_heads_block_diagonally():
    x = inputs("lstm", 1, 1, 2, 3, 2, seed=0)
    w = torch_weights("lstm", x["W_ih"], x["W_hh"], x["b_ih"], x["b_hh"])
    assert w["weight_hh_l0"].shape == (4 * 4, 4) and w["weight_ih_l0"].shape == (16, 3)
    # gate f (1) of head 1, unit 0 is row 1·H·N + 1·N + 0 = 6; head 0's columns are zero there
    torch.testing.assert_close(w["weight_hh_l0"][6, 2:], x["W_hh"][1, 2])
    assert not w["weight_hh_l0"][6, :2].any()
    torch.testing.assert_close(w["bias_ih_l0"][6], x["b_ih"][1, 2])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("cut", [1, 12, 24])
def test_streaming_equals_one_pass(cell, cut):
    """Fused prefill, then recurrent decode steps, equals one fused pass (and one recurrent one)."""
    x = inputs(cell, 2, 25, 2, 6, 5, seed=cut)
    S0 = random_state(cell, 2, 2, 5, seed=cut)
    o, S = fused_rnn(**x, initial_state=S0, output_final_state=True)
    o_rec, S_rec = recurrent_rnn(**x, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o, o_rec, **F64)

    def part(lo, hi):
        return {**x, "x": x["x"][:, lo:hi]}

    outs, state = [], S0
    o1, state = fused_rnn(**part(0, cut), initial_state=state, output_final_state=True)
    outs.append(o1)
    for t in range(cut, 25):
        ot, state = recurrent_rnn(**part(t, t + 1), initial_state=state, output_final_state=True)
        outs.append(ot)
    torch.testing.assert_close(torch.cat(outs, 1), o, **F64)
    torch.testing.assert_close(state_tensors(state), state_tensors(S), **F64)
    # a fused call at T = 1 is one recurrent step too
    o_one, _ = fused_rnn(**part(0, 1), initial_state=S0)
    torch.testing.assert_close(o_one, o[:, :1], **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("H", [1, 4])
def test_float32_forms_are_close_to_float64(cell, H):
    x64 = inputs(cell, 2, 200, H, 32, 16, seed=1)
    x32 = {n: t.float() if torch.is_tensor(t) else t for n, t in x64.items()}
    S0 = random_state(cell, 2, H, 16, seed=1)
    S0_32 = tuple(s.float() for s in S0) if cell == "lstm" else S0.float()
    o_ref, S_ref = recurrent_rnn(**x64, initial_state=S0, output_final_state=True)
    for form, fn in {**FORMS, **FUSED}.items():
        o, S = fn(**x32, initial_state=S0_32, output_final_state=True)
        assert o.dtype == torch.float32
        assert all(s.dtype == torch.float32 for s in state_tensors(S))
        torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=2e-5, msg=form)
        # c is unbounded (|h| < 1 is not): relative there
        for s, ref in zip(state_tensors(S), state_tensors(S_ref), strict=True):
            torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=2e-5, msg=form)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_inputs_run_in_float32_with_a_float32_state(cell, dtype):
    x = inputs(cell, 2, 30, 2, 8, 8, seed=3, dtype=dtype)
    x64 = {n: t.double() if torch.is_tensor(t) else t for n, t in x.items()}
    o_ref, _ = recurrent_rnn(**x64)
    for form, fn in FORMS.items():
        o, S = fn(**x, output_final_state=True)
        assert o.dtype == dtype and all(s.dtype == torch.float32 for s in state_tensors(S))
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=2 * eps, msg=form)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [1, 2, 8])
def test_flops_where_the_counter_sees_the_products(cell, dtype, H):
    """float64 fused calls run ATen's native loop, so the counter sees the products of both
    forms; float32 sees them in the recurrent form and the fused GRU, not in oneDNN's fused LSTM
    (its products are in `other`); a dense call of the heads counts its zero blocks; every form
    counts B sequences B times."""
    B, T, D, N = 3, 17, 6, 5
    x = inputs(cell, B, T, H, D, N, seed=0, dtype=dtype)
    G = GATES[cell]
    dense = H > 1 and (H == 8 or cell == "gru")
    assert dense_heads(cell, H, N) == dense
    for form, fn in FORMS.items():
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn(**x, output_final_state=True)
        f = rnn_flops(cell, form, T, H, D=D, N=N)
        expected = f.matmul
        products = (
            2 * G * T * (H * N * D + (H * N * H * N if form == "fused" and dense else H * N * N))
        )
        if dtype == torch.float64 and form == "fused" and cell == "lstm":
            expected = products
        else:
            assert f.matmul == (0 if form == "fused" and cell == "lstm" else products)
        assert counter.get_total_flops() == B * expected, form
        assert f.total - products == rnn_flops(cell, "recurrent", T, H, D=D, N=N).other


def test_lstm_and_gru_differ_and_gates_saturate():
    """make_inputs gives strong gates: some pre-activations beyond ±4 (σ within 2 % of 0 or 1)."""
    x = inputs("lstm", 2, 50, 1, 32, 16, seed=0)
    pre = x["x"] @ x["W_ih"][0].T + x["b_ih"][0] + x["b_hh"][0]
    assert (pre.abs() > 4).float().mean() > 0.01
    assert (pre[..., 16:32] > 2).float().mean() > 0.2  # forget bias +3 on half the units


def good(cell="lstm", B=2, T=3, H=2, D=4, N=3):
    return inputs(cell, B, T, H, D, N, seed=0)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"cell": "rnn"}, ValueError, ["cell", "'lstm'", "'rnn'"]),
        ({"x": torch.zeros(2, 4)}, ValueError, ["x", "rank 3", "(2, 4)"]),
        ({"x": torch.zeros(2, 3, 5)}, ValueError, ["W_ih", "(2, 12, 4)", "[2, 12, 5]"]),
        ({"x": torch.zeros(2, 0, 4)}, ValueError, ["T = 0"]),
        ({"x": torch.zeros(2, 3, 4, dtype=torch.int64)}, TypeError, ["x", "floating"]),
        ({"W_hh": torch.zeros(2, 9, 3)}, ValueError, ["W_hh", "(2, 9, 3)", "4·N", "lstm"]),
        ({"W_hh": torch.zeros(2, 12)}, ValueError, ["W_hh", "rank 3"]),
        ({"W_ih": torch.zeros(3, 12, 4)}, ValueError, ["W_ih", "(3, 12, 4)"]),
        ({"b_ih": None}, ValueError, ["b_ih", "b_hh", "both"]),
        ({"b_hh": torch.zeros(2, 9)}, ValueError, ["b_hh", "(2, 9)", "[2, 12]"]),
        ({"initial_state": torch.zeros(2, 2, 3)}, TypeError, ["initial_state", "(h, c)"]),
        (
            {"initial_state": (torch.zeros(2, 2, 3), torch.zeros(2, 3, 3))},
            ValueError,
            ["initial_state[1] (c)", "(2, 3, 3)", "[2, 2, 3]"],
        ),
    ],
)
def test_bad_input_is_a_clear_error(change, error, words):
    x = {**good(), **change}
    for fn in FORMS.values():
        with pytest.raises(error) as info:
            fn(**x)
        for w in words:
            assert w in str(info.value), (w, str(info.value))


def test_gru_state_errors_and_form_names():
    x = good("gru")
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 2, 4\)"):
        fused_rnn(**x, initial_state=torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="3·N"):
        recurrent_rnn(**{**x, "W_hh": torch.zeros(2, 12, 3)})  # LSTM weights for a GRU
    with pytest.raises(ValueError, match="'recurrent', 'fused'"):
        rnn(**x, form="chunk")
    with pytest.raises(ValueError, match="heads must be one of 'auto', 'loop', 'dense', got 'x'"):
        fused_rnn(**x, heads="x")
    o, _ = rnn(**x, form="recurrent")
    assert o.shape == (2, 3, 2, 3)
