"""The DPLR delta rule (RWKV-7's recurrence): chunk against recurrent in float64 forward and
backward over shapes, chunk sizes, decay strengths and initial states; both against
flash-linear-attention's naive DPLR loop and naive chunkwise form; the gated delta rule as a
special case; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.ops.delta_rule import recurrent_delta_rule
from seqlab.ops.dplr import chunk_dplr, dplr, fla_naive_dplr, recurrent_dplr
from seqlab.ops.registry import family
from tests.ops.conftest import assert_same_run, run_grads

F64 = {"rtol": 1e-9, "atol": 1e-9}


def rwkv7_inputs(B, T, H, K, V, seed=0, decay="mix", dtype=torch.float64, initial_state=True):
    """RWKV-7's inputs (a = −κ̂, b = κ̂ ⊙ α) with per-channel log-decays by `decay`: "rwkv7"
    (RWKV-7's range (−0.61, 0)), "mix" (logsigmoid(2z)), or a float: that value per step on a
    random half of the entries, the others mild."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    kappa = F.normalize(randn(B, T, H, K), dim=-1)
    if decay == "rwkv7":
        gk = -0.6065306597126334 * randn(B, T, H, K).sigmoid()
    elif decay == "mix":
        gk = F.logsigmoid(2 * randn(B, T, H, K))
    else:
        strong = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) < 0.5
        gk = torch.where(strong, torch.full_like(kappa, decay), F.logsigmoid(randn(B, T, H, K)))
    x = {
        "q": randn(B, T, H, K),
        "k": randn(B, T, H, K),
        "v": randn(B, T, H, V),
        "a": -kappa,
        "b": kappa * randn(B, T, H, K).sigmoid(),
        "gk": gk,
    }
    if initial_state:
        x["initial_state"] = randn(B, H, K, V)
    return {n: t.to(dtype) for n, t in x.items()}


@pytest.mark.parametrize(
    ("T", "chunk_size"), [(1, 64), (15, 64), (33, 64), (70, 64), (70, 32), (45, 16), (29, 8)]
)
@pytest.mark.parametrize("decay", ["rwkv7", "mix", -20.0, -100.0, -1e4])
def test_chunk_equals_recurrent_in_float64(T, chunk_size, decay):
    x = rwkv7_inputs(2, T, 2, 8, 5, seed=T, decay=decay)
    got = run_grads(chunk_dplr, x, chunk_size=chunk_size)
    ref = run_grads(recurrent_dplr, x)
    assert_same_run(got, ref, **F64, label=f"T={T} C={chunk_size} decay={decay}")


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 80),
    H=st.integers(1, 3),
    K=st.integers(1, 12),
    V=st.integers(1, 9),
    chunk_size=st.sampled_from([4, 16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_chunk_equals_recurrent_drawn_shapes(B, T, H, K, V, chunk_size, seed):
    x = rwkv7_inputs(B, T, H, K, V, seed=seed)
    got = run_grads(chunk_dplr, x, chunk_size=chunk_size)
    assert_same_run(got, run_grads(recurrent_dplr, x), **F64)


def test_generic_low_rank_terms_and_scale():
    """Not only RWKV-7's a, b: any a, b (here standard normal, small so that the transition
    stays contractive) and a scale."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 50, 2, 6, 4
    x = rwkv7_inputs(B, T, H, K, V, seed=5)
    x["a"] = 0.3 * torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    x["b"] = 0.3 * torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    got = run_grads(chunk_dplr, x, chunk_size=32, scale=0.7)
    assert_same_run(got, run_grads(recurrent_dplr, x, scale=0.7), **F64)


def test_gated_delta_rule_is_a_special_case():
    """a = k, b = −β exp(g) k, key β k and gk = g on every channel: the gated delta rule."""
    gen = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 37, 2, 8, 5
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    ref, S_ref = recurrent_delta_rule(q, k, v, beta, g, output_final_state=True)
    a, gk = k, g[..., None].expand(B, T, H, K)
    b = -(beta * g.exp())[..., None] * k
    for form in ("recurrent", "chunk"):
        o, S = dplr(q, beta[..., None] * k, v, a, b, gk, output_final_state=True, form=form)
        torch.testing.assert_close(o, ref, **F64)
        torch.testing.assert_close(S, S_ref, **F64)


def test_family_inputs_are_rwkv7_shaped():
    x = family("dplr").make_inputs("default", 2, 9, 3, dtype=torch.float64, K=8, V=4)
    kappa = -x["a"]
    torch.testing.assert_close(kappa.norm(dim=-1), torch.ones(2, 9, 3, dtype=torch.float64))
    alpha = x["b"] / kappa
    assert bool(((alpha > 0) & (alpha < 1)).all())
    assert bool((x["gk"] < 0).all()) and x["gk"].min() < -3


def test_strong_decays_stay_finite_in_float32():
    x = rwkv7_inputs(1, 100, 2, 16, 8, decay=-1e30, dtype=torch.float32)
    o, S, grads = run_grads(chunk_dplr, x)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    x64 = {n: t.double() for n, t in x.items()}
    ref = run_grads(recurrent_dplr, x64)
    scale = ref[0].abs().max().item()
    torch.testing.assert_close(o.double(), ref[0], rtol=1e-4, atol=1e-4 * scale)


def _fla_naive():
    naive = fla_naive_dplr()
    if naive is None:
        pytest.skip("fla-core (flash-linear-attention) is not installed")
    return naive


def _to_fla(x):
    """seqlab's [B, T, H, ·] → fla's naive [B, H, T, ·]."""
    return {n: t.transpose(1, 2) for n, t in x.items() if n != "initial_state"}


@pytest.mark.parametrize("naive", ["recurrence", "chunkwise"])
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "seed", "decay"),
    [
        (1, 32, 1, 8, 8, 0, "rwkv7"),
        (2, 64, 2, 16, 8, 1, "mix"),
        (2, 96, 3, 32, 16, 2, "mix"),
        (1, 64, 2, 16, 32, 3, -20.0),
    ],
)
def test_matches_fla_naive_forms(naive, B, T, H, K, V, seed, decay):
    """fla's naive forms compute in float32 (they cast their inputs) and scale q by K^-1/2;
    the naive chunkwise form takes whole chunks of 32. Outputs, final states and the gradients
    of every input, initial state included, against ours in float32 and in float64."""
    recurrence, chunkwise = _fla_naive()
    fn = recurrence if naive == "recurrence" else chunkwise
    x = rwkv7_inputs(B, T, H, K, V, seed=seed, decay=decay, dtype=torch.float32)

    def fla(q, k, v, a, b, gk, initial_state, output_final_state=True):
        o, S = fn(
            **_to_fla(dict(q=q, k=k, v=v, alpha=a, beta=b, gk=gk)), initial_state=initial_state
        )
        return o.transpose(1, 2), S

    peer = run_grads(fla, x)
    x64 = {n: t.double() for n, t in x.items()}
    ref = run_grads(recurrent_dplr, x64)
    ours = run_grads(chunk_dplr, x)
    o_ref = ref[0]
    scale = o_ref.abs().max()
    for run, label in ((peer, "fla"), (ours, "seqlab chunk")):
        o, S, grads = run
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4 * scale, msg=label)
        torch.testing.assert_close(S.double(), ref[1], rtol=1e-4, atol=1e-4, msg=label)
        for name, g in grads.items():
            g_ref = ref[2][name]
            tol = 1e-4 * max(1.0, g_ref.abs().max().item())
            torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=tol, msg=label + name)
    # and ours against fla's directly, in float32
    assert_same_run(ours, peer, rtol=2e-4, atol=2e-4, label="chunk vs fla")


def test_peer_runs_odd_lengths():
    _fla_naive()
    fam = family("dplr")
    peer = fam.peers["fla_naive_chunk"]()
    x = fam.make_inputs("default", 1, 45, 2, K=16, V=8, generator=torch.Generator().manual_seed(0))
    o = peer(**x)
    torch.testing.assert_close(o, chunk_dplr(**x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"a": torch.zeros(1, 5, 2, 3)}, "a has shape"),
        ({"b": torch.zeros(1, 5, 2)}, "b must have rank 4"),
        ({"gk": torch.full((1, 5, 2, 4), 0.5)}, "gk is a log-space decay"),
        ({"gk": torch.full((1, 5, 2, 4), float("nan"))}, "gk is a log-space decay"),
        ({"initial_state": torch.zeros(1, 2, 4, 4)}, "initial_state has shape"),
        ({"scale": float("inf")}, "scale must be finite"),
        ({"chunk_size": 24}, "multiple of 16"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"form": "parallel"}, "form must be"),
    ],
)
def test_bad_arguments_raise(change, match):
    x = {
        "q": torch.zeros(1, 5, 2, 4),
        "k": torch.zeros(1, 5, 2, 4),
        "v": torch.zeros(1, 5, 2, 3),
        "a": torch.zeros(1, 5, 2, 4),
        "b": torch.zeros(1, 5, 2, 4),
        "gk": torch.zeros(1, 5, 2, 4),
    }
    x.update(change)
    with pytest.raises(ValueError, match=match):
        dplr(**x)


def test_gate_dtype_must_match():
    x = rwkv7_inputs(1, 5, 1, 4, 3, initial_state=False)
    x["a"] = x["a"].half()
    with pytest.raises(TypeError, match="a must have q's dtype"):
        dplr(**x)
