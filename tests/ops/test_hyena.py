"""The order-2 Hyena op: fft against direct (float64, forward and backward, every input), the
recurrent form and prefill with a cache against one pass, FLOPs against torch's counter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops.registry import families, family

FAM = family("hyena")
SEQ = ("v", "x1", "x2")


def inputs(B, T, H, seed, L=None, D=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = FAM.make_inputs("default", B, T, H, dtype=dtype, generator=gen, D=D)
    if L is not None:  # filters of L lags (shorter or longer than T)
        gen = torch.Generator().manual_seed(seed + 1)
        for k in ("h1", "h2"):
            x[k] = torch.randn(L, x[k].shape[1], generator=gen, dtype=dtype) * 0.3
    return x


def split(x, a, b):
    return {k: (t[:, a:b] if k in SEQ else t) for k, t in x.items()}


def test_registered():
    assert "hyena" in families()
    assert FAM.reference == "direct" and FAM.fast == "fft"
    assert set(FAM.forms) == {"fft", "direct", "recurrent"}


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 33),
    H=st.integers(1, 2),
    L=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_fft_equals_direct_forward_and_backward(B, T, H, L, seed):
    x = {k: t.requires_grad_() for k, t in inputs(B, T, H, seed, L).items()}
    a, _ = FAM.forms["fft"](**x)
    b, _ = FAM.forms["direct"](**x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=a.dtype)
    names = list(x)
    ga = torch.autograd.grad((a * w).sum(), [x[k] for k in names])
    gb = torch.autograd.grad((b * w).sum(), [x[k] for k in names])
    for name, p, q in zip(names, ga, gb, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 25), L=st.one_of(st.none(), st.integers(1, 30)), seed=st.integers(0, 999))
def test_recurrent_equals_direct_with_state(T, L, seed):
    x = inputs(2, T, 1, seed, L)
    a, sa = FAM.forms["recurrent"](**x, output_final_state=True)
    b, sb = FAM.forms["direct"](**x, output_final_state=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    torch.testing.assert_close(sa, sb, rtol=0, atol=1e-12)
    assert sa.shape == (2, T, 2, 3)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(3, 31),
    data=st.data(),
    form=st.sampled_from(["fft", "direct", "recurrent"]),
    seed=st.integers(0, 999),
)
def test_prefill_with_cache_then_decode_equals_one_pass(T, data, form, seed):
    x = inputs(2, T, 1, seed)
    full, s_full = FAM.forms["direct"](**x, output_final_state=True)
    cut = data.draw(st.integers(1, T - 1))
    y0, s = FAM.forms[form](**split(x, 0, cut), output_final_state=True)
    outs = [y0]
    t = cut
    while t < T:  # a prefill chunk, then decode steps
        n = 3 if t == cut else 1
        n = min(n, T - t)
        f = form if n > 1 else "recurrent"
        y, s = FAM.forms[f](**split(x, t, t + n), initial_state=s, output_final_state=True)
        outs.append(y)
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-11)
    torch.testing.assert_close(s, s_full, rtol=0, atol=1e-12)


def test_outputs_do_not_see_the_future():
    x = inputs(1, 16, 1, 0)
    y = x | {k: x[k].clone() for k in SEQ}
    for k in SEQ:
        y[k][:, 9:] = torch.randn(1, 7, y[k].shape[-1], dtype=torch.float64)
    a, _ = FAM.forms["fft"](**x)
    b, _ = FAM.forms["fft"](**y)
    torch.testing.assert_close(a[:, :9], b[:, :9])


def test_float32_inputs_keep_their_dtype():
    x = inputs(1, 10, 1, 0, dtype=torch.float32)
    for form in FAM.forms.values():
        y, s = form(**x, output_final_state=True)
        assert y.dtype == s.dtype == torch.float32


@pytest.mark.parametrize("form", ["fft", "direct", "recurrent"])
@pytest.mark.parametrize("T", [1, 7, 20])
def test_flop_matmul_part_matches_torch_counter(form, T):
    x = inputs(1, T, 2, 0, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        FAM.forms[form](**x)
    fl = FAM.flops("default", form, T, 2, D=3)
    assert fl.matmul == counter.get_total_flops()
    assert fl.other > 0


def test_flops_grow_like_the_form():
    fft = [FAM.flops("default", "fft", T, 1).total for T in (1024, 4096)]
    direct = [FAM.flops("default", "direct", T, 1).total for T in (1024, 4096)]
    assert direct[1] / direct[0] > 14  # quadratic
    assert fft[1] / fft[0] < 6  # n log n
    # a decode step against Tc cached tokens costs the new token's pairs only
    step = FAM.flops("default", "recurrent", 1, 1, D=1, Tc=9)
    assert step.other == 2 * (2 * 10 + 3)


def test_state_bytes_grows_with_T():
    for T in (1, 5, 12):
        x = inputs(1, T, 2, 0, dtype=torch.float32)
        _, s = FAM.forms["fft"](**x, output_final_state=True)
        assert s.numel() * s.element_size() == FAM.state_bytes("default", T, 2, D=3)


def test_bad_inputs_fail_clearly():
    x = inputs(1, 5, 1, 0)
    with pytest.raises(ValueError, match="x1"):
        FAM.forms["fft"](**(x | {"x1": x["x1"][:, :4]}))
    with pytest.raises(ValueError, match="initial_state"):
        FAM.forms["fft"](**x, initial_state=torch.zeros(1, 2, 3, 3, dtype=torch.float64))
