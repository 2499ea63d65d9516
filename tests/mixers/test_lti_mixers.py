"""The LTI mixers S4D and LMU: prefill then decode equals one pass, two halves with the state
equal one pass, gradients reach every parameter, state bytes, FLOPs, and LMs built from patterns."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seqlab.mixers import MIXERS, build_mixer
from seqlab.ops.registry import family

D, B, T = 32, 2, 37
F64 = {"rtol": 1e-9, "atol": 1e-10}
CASES = {
    f"{name}:{example}": (name, options)
    for name in ("s4d", "lmu")
    for example, options in MIXERS[name].examples.items()
}


def make(case, dtype=torch.float64):
    name, options = CASES[case]
    torch.manual_seed(0)
    return build_mixer(name, D, **options).to(dtype)


def make_x(dtype=torch.float64, T=T):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=dtype)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **F64)


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_equals_one_pass(case):
    mixer, x = make(case), make_x()
    y, state = mixer(x)
    cut = 25
    y1, s = mixer(x[:, :cut])
    ys = [y1]
    for t in range(cut, T):
        yt, s = mixer(x[:, t : t + 1], s)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)
    assert_same_state(s, state)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cut", [1, 18, 36])
def test_two_halves_with_the_state_equal_one_pass(case, cut):
    mixer, x = make(case), make_x()
    y, state = mixer(x)
    y1, s = mixer(x[:, :cut])
    y2, s = mixer(x[:, cut:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **F64)
    assert_same_state(s, state)


@pytest.mark.parametrize("case", CASES)
def test_decode_from_an_empty_state_equals_a_pass(case):
    mixer, x = make(case), make_x(T=5)
    y, state = mixer(x)
    s = mixer.init_state(B).copy()
    s = {k: v.double() for k, v in s.items()}
    ys = []
    for t in range(5):
        yt, s = mixer(x[:, t : t + 1], s)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_reach_every_parameter(case, with_state):
    mixer = make(case, torch.float32)
    x = make_x(torch.float32).requires_grad_(True)
    state = None
    if with_state:
        _, state = mixer(make_x(torch.float32, T=9))
    y, s = mixer(x, state)
    (y.square().sum() + sum(v.sum() for v in s.values())).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES)
def test_state_bytes_equal_the_state_tensors(case):
    mixer = make(case, torch.float32)
    _, state = mixer(make_x(torch.float32))
    init = mixer.init_state(B)
    real = sum(t.numel() * t.element_size() for t in state.values())
    assert state.keys() == init.keys()
    for k in state:
        assert state[k].shape == init[k].shape and state[k].dtype == init[k].dtype == torch.float32
    assert mixer.state_bytes(state) == mixer.state_bytes(init) == real
    assert mixer.state_bytes_for(B, 1000) == real
    call = mixer.op_call()
    fam = family(mixer.core_op)
    assert fam.state_bytes(call.variant, T, call.H, **call.dims) * B == real


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T_", [1, 37])
def test_flops_match_the_flop_counter(case, T_):
    mixer = make(case, torch.float32)
    x = make_x(torch.float32, T=T_)[:1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mixer(x)
    f = mixer.flops(T_)
    assert counter.get_total_flops() == f.per_token.matmul * T_ + f.prefill.matmul
    assert f.decode == family(mixer.core_op).flops(
        mixer.op_call().variant, "recurrent", 1, mixer.op_call().H, **mixer.op_call().dims
    )


def test_float32_mixers_keep_float32_states_and_agree_with_float64():
    for case in CASES:
        m32, m64 = make(case, torch.float32), make(case)
        y32, s32 = m32(make_x().float())
        y64, _ = m64(make_x())
        assert all(v.dtype == torch.float32 for v in s32.values())
        torch.testing.assert_close(y32.double(), y64, rtol=1e-3, atol=1e-4)


def test_s4d_inits():
    lin = build_mixer("s4d", 8, d_state=8)
    inv = build_mixer("s4d", 8, d_state=8, init="inv")
    n = torch.arange(4.0)
    torch.testing.assert_close(lin.A_im[0], torch.pi * n)
    torch.testing.assert_close(inv.A_im[0], 8 / torch.pi * (8 / (2 * n + 1) - 1))
    dt = lin.log_dt.exp()
    assert (dt >= 1e-3).all() and (dt <= 1e-1).all()
    with pytest.raises(ValueError):
        build_mixer("s4d", 8, d_state=7)


@pytest.mark.parametrize("pattern", ["s4d*3,attn", "lmu,attn"])
def test_lm_builds_from_a_pattern_and_runs(pattern):
    from seqlab.model.lm import CausalLM, ModelConfig

    torch.manual_seed(0)
    lm = CausalLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, pattern=pattern))
    ids = torch.randint(0, 64, (2, 19))
    out = lm(ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert logits.shape == (2, 19, 64) and torch.isfinite(logits).all()
