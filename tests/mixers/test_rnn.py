"""The LSTM and GRU mixers: one head is torch.nn.LSTM / GRU followed by a Linear, H heads are H
such modules over the same input (float64, forward and gradients); prefill runs the fused form
and a decode step the recurrent one; options, init, state and models built from patterns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seqlab.ops.rnn as rnn_ops
from seqlab.mixers import build_mixer
from seqlab.mixers.rnn import GRU, LSTM
from seqlab.ops.rnn import rnn_flops

D, B, T = 12, 2, 19
F64 = {"rtol": 1e-10, "atol": 1e-12}


def make(cell, dtype=torch.float64, **options):
    torch.manual_seed(0)
    return build_mixer(cell, D, **options).to(dtype)


def make_x(T=T, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def torch_heads(mixer):
    """One torch.nn.LSTM / GRU(d_model, N) per head holding that head's weights, float64."""
    cls = nn.LSTM if mixer.cell == "lstm" else nn.GRU
    bias = mixer.b_ih is not None
    modules = []
    for k in range(mixer.num_heads):
        m = cls(D, mixer.head_size, bias=bias, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            m.weight_ih_l0.copy_(mixer.W_ih[k])
            m.weight_hh_l0.copy_(mixer.W_hh[k])
            if bias:
                m.bias_ih_l0.copy_(mixer.b_ih[k])
                m.bias_hh_l0.copy_(mixer.b_hh[k])
        modules.append(m)
    return modules


def reference(mixer, modules, x, state=None):
    """The mixer's function from torch.nn modules: heads side by side, then the same o_proj
    weight (a copy)."""
    outs, finals = [], []
    for k, m in enumerate(modules):
        hx = None
        if state is not None:
            hx = tuple(state[n][:, k][None] for n in mixer.matrices)
            hx = hx if mixer.cell == "lstm" else hx[0]
        o, final = m(x, hx)
        outs.append(o)
        finals.append(final if mixer.cell == "lstm" else (final,))
    proj = mixer.o_proj.weight.detach().clone().requires_grad_()
    y = torch.cat(outs, -1) @ proj.T
    S = {n: torch.stack([f[i][0] for f in finals], 1) for i, n in enumerate(mixer.matrices)}
    return y, S, proj


@pytest.mark.parametrize(
    ("cell", "options"),
    [
        ("lstm", {}),
        ("lstm", {"num_heads": 3}),
        ("lstm", {"num_heads": 2, "hidden_size": 10, "bias": False}),
        ("gru", {}),
        ("gru", {"num_heads": 4, "hidden_size": 8}),
        ("gru", {"bias": False, "hidden_size": 5}),
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_the_mixer_is_torch_nn_modules_and_a_linear(cell, options, with_state):
    mixer = make(cell, **options)
    modules = torch_heads(mixer)
    x = make_x()
    state = None
    if with_state:
        gen = torch.Generator().manual_seed(5)
        state = {
            n: torch.randn(t.shape, generator=gen, dtype=t.dtype)
            for n, t in mixer.init_state(B).items()
        }
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, S = mixer(xa, state)
    y_ref, S_ref, proj = reference(mixer, modules, xb, state)
    torch.testing.assert_close(y, y_ref, **F64)
    assert S.keys() == S_ref.keys() == set(mixer.matrices)
    for n in S:
        torch.testing.assert_close(S[n], S_ref[n], **F64)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **F64)
    torch.testing.assert_close(mixer.o_proj.weight.grad, proj.grad, **F64)
    for k, m in enumerate(modules):
        torch.testing.assert_close(mixer.W_ih.grad[k], m.weight_ih_l0.grad, **F64)
        torch.testing.assert_close(mixer.W_hh.grad[k], m.weight_hh_l0.grad, **F64)
        if mixer.b_ih is not None:
            torch.testing.assert_close(mixer.b_ih.grad[k], m.bias_ih_l0.grad, **F64)
            torch.testing.assert_close(mixer.b_hh.grad[k], m.bias_hh_l0.grad, **F64)


@pytest.fixture
def forms(monkeypatch):
    """The forms the mixers call, in order."""
    calls = []
    for name in ("fused_rnn", "recurrent_rnn"):
        op = getattr(rnn_ops, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            calls.append(_name.split("_")[0])
            return _op(*args, **kwargs)

        monkeypatch.setattr(rnn_ops, name, spy)
    return calls


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_prefill_runs_the_fused_form_and_a_decode_step_the_recurrent_one(cell, forms):
    mixer = make(cell, num_heads=2)
    x = make_x()
    y, state = mixer(x)
    y1, s = mixer(x[:, :7])
    ys = [y1]
    for t in range(7, T):
        yt, s = mixer(x[:, t : t + 1], s)
        ys.append(yt)
    assert forms == ["fused", "fused"] + ["recurrent"] * (T - 7)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)
    for n in state:
        torch.testing.assert_close(s[n], state[n], **F64)


def test_options_and_errors():
    m = build_mixer("lstm", D)
    assert (m.num_heads, m.head_size) == (1, D)
    assert m.W_ih.shape == (1, 4 * D, D) and m.W_hh.shape == (1, 4 * D, D)
    g = build_mixer("gru", D, num_heads=3, hidden_size=24, bias=False)
    assert g.W_hh.shape == (3, 24, 8) and g.b_ih is None and g.o_proj.in_features == 24
    assert dict(g.named_parameters()).keys() == {"W_ih", "W_hh", "o_proj.weight"}
    with pytest.raises(ValueError, match="hidden_size 12 must be a multiple of num_heads 5"):
        build_mixer("lstm", D, num_heads=5)
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("gru", D, num_heads=0)
    with pytest.raises(ValueError, match="hidden"):
        build_mixer("gru", D, hiden_size=3)


def test_recurrent_weights_keep_torch_init_and_the_output_projection_follows_the_policy():
    torch.manual_seed(0)
    m = build_mixer("lstm", 64, num_heads=4, init_std=0.05, out_init_std=0.01)
    bound = 16**-0.5  # N = 64 / 4
    for name in ("W_ih", "W_hh", "b_ih", "b_hh"):
        p = getattr(m, name).detach()
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
        assert abs(p.std().item() / (bound / 3**0.5) - 1) < 0.1, name  # uniform's std
    assert abs(m.o_proj.weight.std().item() / 0.01 - 1) < 0.1


@pytest.mark.parametrize(("cls", "names"), [(LSTM, ("h", "c")), (GRU, ("h",))])
def test_state_layout_bytes_and_declarations(cls, names):
    m = build_mixer(cls.cell, D, num_heads=2, hidden_size=8)
    _, state = m(torch.randn(B, 5, D))
    assert tuple(state) == names and all(t.shape == (B, 2, 4) for t in state.values())
    assert all(t.dtype == torch.float32 for t in state.values())
    assert m.state_bytes(state) == m.state_bytes_for(B, 1000) == len(names) * B * 8 * 4
    assert not m.state_grows
    call = m.op_call()
    assert call == (cls.cell, 2, {"D": D, "N": 4}, {})
    f = m.flops(40)
    G = 4 if cls is LSTM else 3
    # T · 2G · (H·N · D + H·N · N), H·N · H·N for the GRU's two heads run as one dense call
    products = 40 * 2 * G * (8 * D + 8 * (8 if cls is GRU else 4))
    if cls is LSTM:  # oneDNN's fused LSTM: products the counter does not see
        assert f.prefill.matmul == 0 and f.prefill.other > products
    else:
        assert f.prefill.matmul == products
    pointwise = rnn_flops(cls.cell, "recurrent", 40, 2, D=D, N=4).other
    assert f.prefill.total == products + pointwise
    assert f.decode.matmul == 2 * 2 * G * 4 * (D + 4)
    assert f.per_token.matmul == 2 * 8 * D


def test_bfloat16_parameters_keep_a_float32_state():
    m = make("lstm", dtype=torch.bfloat16, num_heads=2)
    x = make_x().to(torch.bfloat16)
    y, s = m(x[:, :10])
    y2, s = m(x[:, 10:11], s)
    assert y.dtype == y2.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in s.values())
    y_ref, _ = make("lstm", num_heads=2)(make_x())
    torch.testing.assert_close(y.double(), y_ref[:, :10], rtol=0, atol=2e-2)


@pytest.mark.parametrize("pattern", ["lstm", "gru", "lstm*2,attn", "gru(num_heads=2),lstm,attn"])
def test_builds_from_pattern_and_streams(pattern):
    from seqlab.model.lm import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, d_model=32, n_layers=3, pattern=pattern))
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids)
    assert out.logits.shape == (2, 12, 64) and torch.isfinite(out.logits).all()
    part = model(ids[:, :11])
    step = model(ids[:, 11:], part.state)
    torch.testing.assert_close(step.logits[:, 0], out.logits[:, -1], rtol=1e-4, atol=1e-5)
