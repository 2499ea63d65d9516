"""The op FLOP formulas against torch's FlopCounterMode, which counts matmuls, bmm, SDPA and
convolutions: `Flops.matmul` must match it exactly, in every form, for whole and partial chunks.

Shape letters: B batch, T length, H heads, K key dim, V value dim, C chunk size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops import delta_rule, gated_linear
from seqlab.ops.attention import KVCache, _sum_min, attention
from seqlab.profile.flops import (
    Flops,
    attention_flops,
    delta_rule_flops,
    gated_linear_flops,
    linear_flops,
)
from tests.profile.conftest import count_flops

B, H, K, V = 2, 3, 16, 24
# (T, chunk_size): one token, a partial chunk, whole chunks, a ragged tail; for per-channel gates
# C = 64 > K + V: a gated delta rule chunk inverts, an ungated one (and the parallel form) solves
# against [βγK | βV]; T = 50 with C = 64 pads the per-channel halving of one chunk to 64.
LENGTHS = [(1, 16), (11, 16), (40, 16), (40, 32), (64, 32), (50, 64), (128, 64)]


def qkv(T: int, Hk: int = H):
    return torch.randn(B, T, H, K), torch.randn(B, T, Hk, K), torch.randn(B, T, Hk, V)


def gate(kind: str, T: int):
    if kind == "none":
        return None
    shape = (B, T, H) if kind == "head" else (B, T, H, K)
    return F.logsigmoid(torch.randn(shape))


@pytest.mark.parametrize("T,C", LENGTHS)
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_gated_linear_matmuls_match_the_counter(kind, form, T, C):
    q, k, v = qkv(T)
    g = gate(kind, T)
    counted = count_flops(lambda: gated_linear(q, k, v, g, form=form, chunk_size=C))
    assert counted == B * gated_linear_flops(T, H, K, V, kind, form, C).matmul


@pytest.mark.parametrize("T,C", LENGTHS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_delta_rule_matmuls_match_the_counter(gated, form, T, C):
    q, k, v = qkv(T)
    beta = torch.rand(B, T, H)
    g = gate("head", T) if gated else None
    counted = count_flops(
        lambda: delta_rule(q, F.normalize(k, dim=-1), v, beta, g, form=form, chunk_size=C)
    )
    assert counted == B * delta_rule_flops(T, H, K, V, form, C, gated=gated).matmul


@pytest.mark.parametrize("T,C", LENGTHS)
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_training_forward_matches_the_counter(gated, T, C):
    """With autograd on, the chunk form batches each chunk's affine state map instead."""
    q, k, v = qkv(T)
    beta = torch.rand(B, T, H)
    g = gate("head", T) if gated else None
    q.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        delta_rule(q, F.normalize(k, dim=-1), v, beta, g, form="chunk", chunk_size=C)
    counted = counter.get_total_flops()
    flops = delta_rule_flops(T, H, K, V, "chunk", C, autograd=True, gated=gated)
    assert counted == B * flops.matmul
    assert counted != B * delta_rule_flops(T, H, K, V, "chunk", C, gated=gated).matmul


@pytest.mark.parametrize(
    "T,cached,window",
    [(40, 0, None), (1, 40, None), (7, 9, None), (40, 0, 5), (1, 4, 5), (6, 4, 5)],
)
@pytest.mark.parametrize("kv_heads", [H, 1])
def test_attention_dense_count_matches_the_counter(T, cached, window, kv_heads):
    """The counter sees SDPA's dense score matrix; `causal=False` is that count."""
    q, k, v = qkv(T, kv_heads)
    cache = None
    if cached:
        cache = KVCache(torch.randn(B, cached, kv_heads, K), torch.randn(B, cached, kv_heads, V))
    counted = count_flops(lambda: attention(q, k, v, window=window, initial_state=cache))
    assert counted == B * attention_flops(T, H, K, V, cached, window, causal=False).matmul


@pytest.mark.parametrize("T,cached,window", [(40, 0, None), (9, 3, None), (40, 0, 5), (3, 7, 4)])
def test_causal_attention_counts_the_visible_pairs(T, cached, window):
    positions = torch.arange(cached, cached + T)[:, None]
    keys = torch.arange(cached + T)[None, :]
    visible = keys <= positions
    if window is not None:
        visible &= keys > positions - window
    expected = 2 * int(visible.sum()) * (K + V) * H
    assert attention_flops(T, H, K, V, cached, window).matmul == expected


@pytest.mark.parametrize("cap", [None, 1, 5, 12, 30])
def test_sum_min(cap):
    for lo, hi in [(1, 10), (3, 20), (7, 7), (5, 4)]:
        expected = sum(x if cap is None else min(x, cap) for x in range(lo, hi + 1))
        assert _sum_min(lo, hi, cap) == expected


def test_chunk_cost_per_token_is_math_md_formula():
    """MATH.md §6: 2C(K + V) + 4KV per head and token, when T is a multiple of C."""
    C, T = 64, 4096
    per_token = gated_linear_flops(T, 1, K, V, "head", "chunk", C).matmul / T
    assert per_token == 2 * C * (K + V) + 4 * K * V


def test_flops_arithmetic():
    a, b = Flops(3, 1), Flops(10, 20)
    assert a + b == Flops(13, 21)
    assert 2 * a == a * 2 == Flops(6, 2)
    assert (a + b).total == 34
    assert linear_flops(4, 5) == Flops(40)
