"""The Hyena mixer: streaming equals one pass (prefill + decode, two halves), gradients reach
every parameter, the predicted state bytes are the real ones, causality, and a model builds it
from a pattern."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import MIXERS, build_mixer
from seqlab.mixers.hyena import Hyena
from seqlab.ops.registry import family

D = 32
B = 2


def make(seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    return build_mixer("hyena", D, **options).to(dtype)


def make_x(T, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype)


EXAMPLES = sorted(Hyena.examples)


def test_registered_and_declared():
    assert MIXERS["hyena"] is Hyena
    assert Hyena.core_op == "hyena" and Hyena.state_grows
    family(Hyena.core_op)
    for options in Hyena.examples.values():
        build_mixer("hyena", D, **options)


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("cut", [1, 13])
def test_prefill_then_decode_equals_one_pass(example, cut):
    m = make(**Hyena.examples[example])
    T = 20
    x = make_x(T)
    full, s_full = m(x)
    y, s = m(x[:, :cut])
    outs = [y]
    for t in range(cut, T):
        y, s = m(x[:, t : t + 1], s)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    for k in s_full:
        torch.testing.assert_close(s[k], s_full[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("T", [9, 40])
def test_two_halves_with_the_state_equal_one_pass(example, T):
    m = make(**Hyena.examples[example])
    x = make_x(T)
    full, _ = m(x)
    h = T // 2
    a, s = m(x[:, :h])
    b, _ = m(x[:, h:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-10)


def test_init_state_is_a_valid_start():
    m = make()
    x = make_x(12)
    full, _ = m(x)
    y, _ = m(x, m.init_state(B))
    torch.testing.assert_close(y, full, rtol=0, atol=1e-10)


def test_float32_decode_matches_one_pass():
    m = make(dtype=torch.float32)
    x = make_x(20, dtype=torch.float32)
    full, _ = m(x)
    y, s = m(x[:, :10])
    outs = [y]
    for t in range(10, 20):
        y, s = m(x[:, t : t + 1], s)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("example", EXAMPLES)
def test_gradients_reach_every_parameter(example):
    m = make(dtype=torch.float32, **Hyena.examples[example])
    y, _ = m(make_x(17, dtype=torch.float32))
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("example", EXAMPLES)
def test_state_bytes_for_equals_the_real_state(example, dtype):
    m = make(dtype=dtype, **Hyena.examples[example])
    assert m.state_bytes_for(B, 0) == m.state_bytes(m.init_state(B))
    for T in (1, 5, 16, 33):
        _, s = m(make_x(T, dtype=dtype))
        assert m.state_bytes(s) == m.state_bytes_for(B, T), T
    # decode steps grow it token by token
    _, s = m(make_x(4, dtype=dtype))
    for t in range(5, 8):
        _, s = m(make_x(1, seed=t, dtype=dtype), s)
        assert m.state_bytes(s) == m.state_bytes_for(B, t)


@pytest.mark.parametrize("example", EXAMPLES)
def test_outputs_do_not_see_the_future(example):
    m = make(**Hyena.examples[example])
    x = make_x(24)
    x2 = x.clone()
    x2[:, 13:] = torch.randn(B, 11, D, dtype=torch.float64)
    a, _ = m(x)
    b, _ = m(x2)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_fft_and_direct_forms_agree():
    fft = make(filter_order=16)
    direct = make(filter_order=16, form="direct")
    x = make_x(25)
    torch.testing.assert_close(fft(x)[0], direct(x)[0], rtol=0, atol=1e-10)


def test_filters_decay_from_fast_to_slow_channels():
    m = make()
    alpha = m.filter.alpha[:D]
    assert bool((alpha[1:] > alpha[:-1]).all())


def test_flops_and_op_call():
    m = make()
    fl = m.flops(64)
    assert fl.per_token.total > 0 and fl.prefill.total > 0 and fl.decode.total > 0
    call = m.op_call()
    fam = family("hyena")
    assert fam.flops(call.variant, fam.fast, 64, call.H, **call.dims) == fl.prefill
    # the decode step grows with the context
    assert m.flops(128).decode.total > fl.decode.total


def test_config_errors():
    with pytest.raises(ValueError, match="emb_dim"):
        build_mixer("hyena", D, emb_dim=4)
    with pytest.raises(ValueError, match="form"):
        build_mixer("hyena", D, form="chunk")


def test_builds_from_a_pattern():
    from seqlab.model.lm import CausalLM, ModelConfig

    torch.manual_seed(0)
    lm = CausalLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, pattern="hyena,attn"))
    ids = torch.randint(0, 64, (2, 19))
    out = lm(ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert logits.shape == (2, 19, 64)
    assert torch.isfinite(logits).all()
