"""The Mamba-1 mixer: streaming equals one pass, gradients, state size, a model built from it."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import build_mixer
from seqlab.mixers.mamba import Mamba

D, B, T = 32, 2, 40


def _mixer(**options):
    torch.manual_seed(0)
    return build_mixer("mamba", D, **options).double()


def _x(T=T):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("example", sorted(Mamba.examples))
def test_prefill_then_decode_equals_one_pass(example):
    m, x = _mixer(**Mamba.examples[example]), _x()
    y, _ = m(x)
    y1, state = m(x[:, :30])
    steps = [y1]
    for t in range(30, T):
        yt, state = m(x[:, t : t + 1], state)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-9, atol=1e-9)


def test_two_halves_equal_one_pass():
    m, x = _mixer(d_state=8, chunk_size=16), _x()
    y, S = m(x)
    ya, state = m(x[:, :17])
    yb, S2 = m(x[:, 17:], state)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-9, atol=1e-9)
    for k in S:
        torch.testing.assert_close(S2[k], S[k], rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_parameter():
    m = _mixer(d_state=8, chunk_size=16)
    y, _ = m(_x())
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_bytes_and_shapes():
    m = build_mixer("mamba", D, d_state=8, chunk_size=16)
    _, state = m(torch.randn(B, 5, D))
    assert state["h"].dtype == torch.float32
    assert m.state_bytes(state) == sum(t.numel() * t.element_size() for t in state.values())
    assert m.state_bytes_for(B, 100) == m.state_bytes(state)
    assert {k: tuple(v.shape) for k, v in state.items()} == m.state_shapes(B)


def test_declarations():
    m = build_mixer("mamba", D, d_state=8, chunk_size=16)
    assert m.dt_rank == 2
    call = m.op_call()
    assert call.dims == {"D": 2 * D, "N": 8} and call.options == {}
    f = m.flops(40)
    assert f.per_token.matmul > 0 and f.prefill.matmul > 0 and f.decode.matmul > 0


def test_builds_from_pattern():
    from seqlab.model.lm import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, pattern="mamba*3,attn"))
    out = model(torch.randint(0, 64, (2, 12)))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape[:2] == (2, 12) and torch.isfinite(logits).all()
