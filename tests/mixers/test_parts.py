"""The shared pieces (short conv, RoPE, gated norm, decay inits) and mixers against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab.mixers import build_mixer
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.norm import GatedRMSNorm
from seqlab.mixers.recurrent import init_a_log, init_dt_bias
from seqlab.mixers.rope import positions, rotate, start_positions

F64 = {"rtol": 1e-10, "atol": 1e-12}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_short_conv_is_a_causal_depthwise_conv_and_streams():
    conv = ShortConv(6, width=4, bias=True).double()
    x = randn(2, 11, 6)
    y, state = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.conv.weight, conv.conv.bias, groups=6)
    torch.testing.assert_close(y, F.silu(ref.transpose(1, 2)), **F64)
    torch.testing.assert_close(state, x[:, -3:], **F64)
    y1, s1 = conv(x[:, :2])  # shorter than the state: zeros still in front
    torch.testing.assert_close(s1, torch.cat([x.new_zeros(2, 1, 6), x[:, :2]], 1), **F64)
    ys = [y1]
    for t in range(2, 11):
        yt, s1 = conv(x[:, t : t + 1], s1)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)
    torch.testing.assert_close(s1, state, **F64)


def test_rope_keeps_norms_and_scores_depend_on_relative_position():
    q, k = randn(1, 1, 2, 8, seed=1), randn(1, 1, 2, 8, seed=2)

    def score(m, n):
        qm = rotate(q, torch.tensor([[m]]), 10000.0)
        kn = rotate(k, torch.tensor([[n]]), 10000.0)
        return (qm * kn).sum(-1)

    torch.testing.assert_close(rotate(q, torch.tensor([[0]]), 10000.0), q, **F64)
    q37 = rotate(q, torch.tensor([[37]]), 10000.0)
    torch.testing.assert_close(q37.norm(dim=-1), q.norm(dim=-1), **F64)
    torch.testing.assert_close(score(5, 2), score(103, 100), **F64)
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_positions_continue_from_the_start():
    start = start_positions(2, torch.device("cpu")) + torch.tensor([0, 7])
    assert positions(start, 3).tolist() == [[0, 1, 2], [7, 8, 9]]


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm(norm_before_gate):
    norm = GatedRMSNorm(8, 1e-5, norm_before_gate=norm_before_gate).double()
    with torch.no_grad():
        norm.norm.weight.copy_(randn(8, seed=3))
    x, z = randn(3, 8, seed=4), randn(3, 8, seed=5)

    def rms(t):
        return t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.norm.weight

    expected = rms(x) * F.silu(z) if norm_before_gate else rms(x * F.silu(z))
    torch.testing.assert_close(norm(x, z), expected, **F64)


def test_decay_inits_follow_mamba2():
    torch.manual_seed(0)
    dt = F.softplus(init_dt_bias(4096))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    # log-uniform: the median sits at the geometric mean of the bounds
    assert abs(dt.log().median().item() - math.log(1e-2)) < 0.1
    A = init_a_log(4096, 1.0, 16.0).exp()
    assert A.min() >= 1.0 and A.max() <= 16.0


def test_retnet_decays_are_one_minus_powers_of_two():
    mixer = build_mixer("retnet", 32, num_heads=4)
    gamma = mixer.log_decay(torch.float64).exp()
    torch.testing.assert_close(gamma, 1 - 2.0 ** -torch.arange(5.0, 9.0, dtype=torch.float64))


def test_mamba2_matches_a_step_by_step_ssm():
    """h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_tᵀ, y_t = h_tᵀ C_t + D x_t, per head, no scale."""
    torch.manual_seed(0)
    m = build_mixer("mamba2", 16, head_dim=8, d_state=4, chunk_size=4).double()
    x = randn(2, 11, 16)
    y, state = m(x)

    P, N, H = 8, 4, m.num_heads
    z, xBC, dt_raw = m.in_proj(x).split([m.d_inner, m.d_inner + 2 * N, H], -1)
    xBC, _ = m.conv(xBC)
    xs, Bm, Cm = xBC.split([m.d_inner, N, N], -1)
    xs = rearrange(xs, "b t (h p) -> b t h p", p=P)
    dt = F.softplus(dt_raw + m.dt_bias)
    A = -m.A_log.exp()
    h = torch.zeros(2, H, N, P, dtype=torch.float64)
    ys = []
    for t in range(11):
        decay = (A * dt[:, t]).exp()[..., None, None]  # [B, H, 1, 1]
        h = decay * h + Bm[:, t, None, :, None] * (dt[:, t, :, None] * xs[:, t])[:, :, None]
        ys.append(torch.einsum("bhnp,bn->bhp", h, Cm[:, t]) + m.D[:, None] * xs[:, t])
    yr = rearrange(torch.stack(ys, 1), "b t h p -> b t (h p)")
    torch.testing.assert_close(y, m.out_proj(m.norm(yr, z)), **F64)
    torch.testing.assert_close(state["S"], h, **F64)


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog", "taylor"])
def test_normalised_linear_attention_matches_the_quadratic_formula(feature_map):
    """o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)."""
    torch.manual_seed(0)
    m = build_mixer("linear_attn", 16, num_heads=2, feature_map=feature_map, chunk_size=4)
    m = m.double()
    x = randn(2, 9, 16)
    y, _ = m(x)

    def heads(t):
        return rearrange(t, "b t (h d) -> b t h d", h=2)

    q, k, v = m.q_map(heads(m.q_proj(x))), m.k_map(heads(m.k_proj(x))), heads(m.v_proj(x))
    scores = torch.einsum("bthf,bshf->bhts", q, k).tril()
    o = torch.einsum("bhts,bshd->bthd", scores, v) / scores.sum(-1).transpose(1, 2)[..., None]
    torch.testing.assert_close(y, m.o_proj(rearrange(o, "b t h d -> b t (h d)")), **F64)


def test_normalised_linear_attention_survives_a_zero_denominator():
    m = build_mixer("linear_attn", 16, num_heads=2, feature_map="relu")
    x = torch.zeros(1, 5, 16)  # φ = relu(0) = 0 for every query and key
    y, _ = m(x)
    assert torch.equal(y, torch.zeros_like(y))
