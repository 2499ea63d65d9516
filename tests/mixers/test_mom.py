"""Mixture-of-Memories: the masked all-memories form against each memory run over only the
tokens routed to it, routing, and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab.mixers import build_mixer
from seqlab.ops.delta_rule import recurrent_delta_rule

F64 = {"rtol": 1e-9, "atol": 1e-11}


def gathered_reference(mixer, x, S0=None):
    """o [B, T, G, H, V] and final S [B, G·H, K, V]: each memory's gated delta rule run by the
    recurrent form over only the tokens routed to it (and the shared one over all)."""
    H, G, K, V = mixer.num_heads, mixer.groups, mixer.head_k, mixer.head_v
    B, T, _ = x.shape
    qkv, _ = mixer.conv(mixer.qkv_proj(x), None)
    q, k, v = qkv.split(mixer.widths, dim=-1)
    q = F.normalize(rearrange(q, "b t (h d) -> b t h d", h=H), dim=-1)
    k = F.normalize(rearrange(k, "b t (g h d) -> b t g h d", g=G, h=H), dim=-1)
    v = rearrange(v, "b t (g h d) -> b t g h d", g=G, h=H)
    beta = rearrange(mixer.b_proj(x).sigmoid(), "b t (g h) -> b t g h", g=G)
    a = F.softplus(mixer.a_proj(x) + mixer.dt_bias) * -mixer.A_log.exp()
    g = rearrange(a, "b t (g h) -> b t g h", g=G)
    logits = mixer.router(x)
    chosen = logits.topk(mixer.config.top_k, dim=-1).indices  # [B, T, k]
    o = x.new_zeros(B, T, G, H, V)
    S0 = x.new_zeros(B, G, H, K, V) if S0 is None else S0.view(B, G, H, K, V)
    S = [[S0[b, m] for m in range(G)] for b in range(B)]
    for b in range(B):
        for m in range(G):
            shared = m == mixer.config.num_memories
            tok = [t for t in range(T) if shared or m in chosen[b, t].tolist()]
            if not tok:
                continue
            ob, Sb = recurrent_delta_rule(
                q[b : b + 1, tok],
                k[b : b + 1, tok, m],
                v[b : b + 1, tok, m],
                beta[b : b + 1, tok, m],
                g[b : b + 1, tok, m],
                initial_state=S[b][m][None],
                output_final_state=True,
            )
            o = o.index_put((torch.tensor([b]), torch.tensor(tok), torch.tensor([m])), ob[0])
            S[b][m] = Sb[0]
    return o, torch.stack([torch.stack(row) for row in S]).view(B, G * H, K, V)


def mixed(mixer, x, o):
    """The routed, weighted sum of memory outputs, normed and projected as the mixer does."""
    w = mixer.route(x)
    y = torch.einsum("btghd,btg->bthd", o, w)
    if mixer.config.use_output_gate:
        y = mixer.o_norm(y, rearrange(mixer.g_proj(x), "b t (h d) -> b t h d", h=mixer.num_heads))
    else:
        y = mixer.o_norm(y)
    return mixer.o_proj(rearrange(y, "b t h d -> b t (h d)"))


@pytest.mark.parametrize(
    "options",
    [
        {"num_memories": 3, "top_k": 2, "num_heads": 2, "head_dim": 4},
        {"num_memories": 4, "top_k": 1, "num_heads": 1, "shared_memory": False},
        {"num_memories": 2, "top_k": 2, "num_heads": 3, "head_dim": 5, "expand_v": 2.0},
    ],
)
@pytest.mark.parametrize("T", [1, 7, 37])
def test_masked_memories_equal_each_memory_over_its_own_tokens(options, T):
    torch.manual_seed(T)
    mixer = build_mixer("mom", 12, chunk_size=8, **options).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    y, state = mixer(x)
    o_ref, S_ref = gathered_reference(mixer, x)
    torch.testing.assert_close(state["S"], S_ref, **F64)
    torch.testing.assert_close(y, mixed(mixer, x, o_ref), **F64)


def test_gradients_match_the_gathered_reference():
    torch.manual_seed(1)
    mixer = build_mixer("mom", 8, num_memories=3, top_k=2, num_heads=2, chunk_size=4).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    y, state = mixer(x)
    gen = torch.Generator().manual_seed(2)
    wy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    wS = torch.randn(state["S"].shape, generator=gen, dtype=y.dtype)
    params = [x, *mixer.parameters()]
    got = torch.autograd.grad((y * wy).sum() + (state["S"] * wS).sum(), params)
    o_ref, S_ref = gathered_reference(mixer, x)
    y_ref = mixed(mixer, x, o_ref)
    want = torch.autograd.grad((y_ref * wy).sum() + (S_ref * wS).sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, **F64)


def test_each_token_updates_only_its_memories():
    torch.manual_seed(3)
    mixer = build_mixer("mom", 8, num_memories=4, top_k=1, num_heads=1, shared_memory=False)
    x = torch.randn(1, 1, 8)
    _, state = mixer(x)
    chosen = mixer.router(x)[0, 0].argmax().item()
    moved = state["S"].flatten(2).abs().sum(-1)[0]  # [G·H]
    assert moved[chosen] > 0
    assert (moved[torch.arange(4) != chosen] == 0).all()


def test_route_weights_sum_to_one_over_routed_memories_plus_the_shared_one():
    mixer = build_mixer("mom", 16, num_memories=5, top_k=3)
    w = mixer.route(torch.randn(2, 9, 16))
    assert w.shape == (2, 9, 6)
    assert ((w[..., :5] > 0).sum(-1) == 3).all()
    torch.testing.assert_close(w[..., :5].sum(-1), torch.ones(2, 9))
    assert (w[..., 5] == 1).all()


def test_top_1_weighs_by_the_router_probability():
    mixer = build_mixer("mom", 16, num_memories=3, top_k=1, shared_memory=False)
    x = torch.randn(2, 5, 16)
    w, probs = mixer.route(x), mixer.router(x).softmax(-1)
    torch.testing.assert_close(w.sum(-1), probs.max(-1).values)


def test_top_k_above_the_memories_is_an_error():
    with pytest.raises(ValueError, match=r"top_k \(3\) must be at most num_memories \(2\)"):
        build_mixer("mom", 16, num_memories=2, top_k=3)


@pytest.mark.parametrize("options", [{}, {"head_dim": 4}])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_expand_v_is_a_config_error(options, value):
    """expand_v = inf overflowed in int(head_dim · expand_v) instead of naming the field."""
    with pytest.raises(ValueError, match="expand_v: Input should be a finite number"):
        build_mixer("mom", 32, expand_v=value, **options)
