"""Dense channel mixers: the formulas, shapes, gradients, initialisation and a zero aux loss.

Run: .venv/bin/python -m pytest tests/channel/test_dense.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.channel import MLP, SwiGLU, build_channel_mixer
from seqlab.channel.mlp import swiglu_hidden

F64 = {"rtol": 1e-12, "atol": 1e-12}


def test_mlp_is_linear_gelu_linear():
    mlp = build_channel_mixer("mlp", 8, bias=True).double()
    assert mlp.hidden == 32
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = F.gelu(x @ mlp.w_in.weight.T + mlp.w_in.bias)
    y, aux = mlp(x)
    torch.testing.assert_close(y, h @ mlp.w_out.weight.T + mlp.w_out.bias, **F64)
    assert aux.shape == () and aux.item() == 0.0


def test_swiglu_is_silu_gate_times_up():
    swiglu = build_channel_mixer("swiglu", 8, hidden=12).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    w_gate, w_up = swiglu.w_in.weight[:12], swiglu.w_in.weight[12:]
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ swiglu.w_out.weight.T
    y, aux = swiglu(x)
    torch.testing.assert_close(y, expected, **F64)
    assert aux.shape == () and aux.item() == 0.0


@pytest.mark.parametrize(
    ("d_model", "multiple_of", "hidden"),
    [(64, 16, 176), (48, 16, 128), (768, 256, 2048), (4096, 256, 11008), (1, 16, 16)],
)
def test_swiglu_default_hidden(d_model, multiple_of, hidden):
    # round(8/3·D) rounded up: 64 → 171 → 176, 48 → 128 exactly, LLaMA-7B's 4096 → 11008.
    assert swiglu_hidden(d_model, multiple_of) == hidden


def test_swiglu_uses_default_or_given_hidden():
    assert SwiGLU(64).hidden == 176
    assert SwiGLU(64, SwiGLU.Config(multiple_of=64)).hidden == 192
    assert SwiGLU(64, SwiGLU.Config(hidden=100, multiple_of=64)).hidden == 100


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_shapes_and_every_parameter_gets_gradient(name, bias):
    mixer = build_channel_mixer(name, 16, bias=bias)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, aux = mixer(x)
    assert y.shape == x.shape and aux.shape == ()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("cls", [MLP, SwiGLU])
def test_init_std_and_scaled_output_projection(cls):
    torch.manual_seed(0)
    mixer = cls(256, cls.Config(out_init_std=0.002, bias=True))
    assert mixer.w_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mixer.w_out.weight.std().item() == pytest.approx(0.002, rel=0.05)
    assert mixer.w_in.bias.abs().sum() == 0 and mixer.w_out.bias.abs().sum() == 0
    plain = cls(256)
    assert plain.w_out.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
def test_seeded_construction_is_deterministic(name):
    x = torch.randn(2, 4, 16)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(build_channel_mixer(name, 16)(x)[0])
    assert torch.equal(outs[0], outs[1])
