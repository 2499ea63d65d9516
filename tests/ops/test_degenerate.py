"""Degenerate but valid inputs: empty batches, zero heads or value width give an empty result,
K = 0 and non-finite scales a clear error, and no scale or gate that passes the checks turns the
output into NaN (issue 14, item 5).

Run: .venv/bin/python -m pytest tests/ops/test_degenerate.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.ops import delta_rule, gated_linear
from seqlab.ops.attention import attention, naive_attention

GEN = torch.Generator().manual_seed(0)
FORMS = ("recurrent", "chunk", "parallel")


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=GEN, dtype=dtype)


def inputs(B, T, H, K, V, gate=None, dtype=torch.float64):
    x = dict(q=randn(B, T, H, K, dtype=dtype), k=randn(B, T, H, K, dtype=dtype))
    x["v"] = randn(B, T, H, V, dtype=dtype)
    x["beta"] = torch.rand(B, T, H, generator=GEN, dtype=dtype)  # delta_rule's
    if gate == "head":
        x["g"] = -randn(B, T, H, dtype=dtype).abs()
    elif gate == "channel":
        x["g"] = -randn(B, T, H, K, dtype=dtype).abs()
    return x


def run(family, form, x, **kw):
    x = dict(x)
    beta = x.pop("beta")
    if family == "delta_rule":
        x["k"] = F.normalize(x["k"], dim=-1)
        return delta_rule(**x, beta=beta, form=form, output_final_state=True, **kw)
    return gated_linear(**x, form=form, output_final_state=True, **kw)


CASES = [
    ("gated_linear", None),
    ("gated_linear", "head"),
    ("gated_linear", "channel"),
    ("delta_rule", None),
    ("delta_rule", "head"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("family", "gate"), CASES)
@pytest.mark.parametrize(("B", "H", "V"), [(0, 2, 3), (2, 0, 3), (2, 2, 0)], ids=["B0", "H0", "V0"])
def test_empty_batch_heads_or_values_give_an_empty_result(family, gate, form, B, H, V):
    T, K = 70, 4  # more than one chunk
    o, S = run(family, form, inputs(B, T, H, K, V, gate), chunk_size=32)
    assert o.shape == (B, T, H, V)
    assert S.shape == (B, H, K, V)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("family", "gate"), [("gated_linear", None), ("delta_rule", None)])
def test_zero_key_width_is_a_clear_error(family, gate, form):
    with pytest.raises(ValueError, match="K = 0"):
        run(family, form, inputs(1, 8, 2, 0, 3, gate))


def test_attention_zero_heads_or_key_width():
    o, _ = attention(randn(1, 8, 0, 4), randn(1, 8, 0, 4), randn(1, 8, 0, 4))
    assert o.shape == (1, 8, 0, 4)
    o, _ = attention(randn(0, 8, 2, 4), randn(0, 8, 2, 4), randn(0, 8, 2, 4))
    assert o.shape == (0, 8, 2, 4)
    with pytest.raises(ValueError, match="K = 0"):
        attention(randn(1, 8, 2, 0), randn(1, 8, 2, 0), randn(1, 8, 2, 4))


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-30])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_any_finite_scale_matches_the_reference(scale, window):
    q, k, v = randn(2, 8, 2, 4), randn(2, 8, 2, 4), randn(2, 8, 2, 4)
    o, _ = attention(q, k, v, scale=scale, window=window)
    assert o.isfinite().all()
    torch.testing.assert_close(o, naive_attention(q, k, v, scale=scale, window=window))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_a_clear_error(scale):
    q, k, v = randn(1, 8, 2, 4), randn(1, 8, 2, 4), randn(1, 8, 2, 4)
    for call in (
        lambda: attention(q, k, v, scale=scale),
        lambda: gated_linear(q, k, v, scale=scale),
        lambda: delta_rule(q, k, v, torch.rand(1, 8, 2, dtype=q.dtype), scale=scale),
    ):
        with pytest.raises(ValueError, match="scale must be finite"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e4, 1e30, 1e37, 3e38, 1.7e308])
@pytest.mark.parametrize(("family", "gate"), [c for c in CASES if c[1]])
def test_huge_finite_gates_give_what_the_recurrent_form_gives(family, gate, magnitude, dtype):
    if magnitude > torch.finfo(dtype).max:
        pytest.skip("not finite in this dtype")
    x = inputs(1, 100, 2, 4, 3, gate, dtype=dtype)
    g = x["g"].clone()
    g[:, 1::3] = -magnitude  # huge decays among mild ones: what lies between must survive
    x["g"] = g
    ref_o, ref_S = run(family, "recurrent", x)
    assert ref_o.isfinite().all()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for form in ("chunk", "parallel"):
                o, S = run(family, form, x, **({"chunk_size": 32} if form == "chunk" else {}))
                tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else {}
                torch.testing.assert_close(o, ref_o, **tol)
                torch.testing.assert_close(S, ref_S, **tol)
