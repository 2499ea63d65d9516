"""Bad arguments to the recurrence ops get an error that names the argument and what was expected.

Run: .venv/bin/python -m pytest tests/ops/test_op_errors.py -q

Every case runs through every entry point of its family: recurrent_*, chunk_*, parallel_* and the
dispatcher. Nothing is broadcast silently: a size-1 dim where B, T, H or K is expected is an error.
Valid inputs: B = 2, T = 5, H = 2, K = 8, V = 12, float32.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from seqlab.ops.delta_rule import (
    chunk_delta_rule,
    delta_rule,
    parallel_delta_rule,
    recurrent_delta_rule,
)
from seqlab.ops.gated_linear import (
    chunk_gated_linear,
    gated_linear,
    parallel_gated_linear,
    recurrent_gated_linear,
)
from tests.host_reads import HostReads

B, T, H, K, V = 2, 5, 2, 8, 12

GATED_LINEAR = {
    "recurrent": recurrent_gated_linear,
    "chunk": chunk_gated_linear,
    "parallel": parallel_gated_linear,
    "dispatch": gated_linear,
}
DELTA_RULE = {
    "recurrent": recurrent_delta_rule,
    "chunk": chunk_delta_rule,
    "parallel": parallel_delta_rule,
    "dispatch": delta_rule,
}


GEN = torch.Generator().manual_seed(0)  # the values never matter, but keep them reproducible


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN, dtype=dtype)


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape, generator=GEN, dtype=dtype)


def valid(beta: bool = False) -> dict:
    x = {
        "q": randn(B, T, H, K),
        "k": torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "g": -rand(B, T, H),
    }
    if beta:
        x["beta"] = rand(B, T, H)
    return x


def shape_msg(name: str, shape, letters: str, expected) -> str:
    """The check_shape message, as a regex."""
    return re.escape(
        f"{name} has shape {tuple(shape)}, expected [{', '.join(letters)}] = "
        f"[{', '.join(map(str, expected))}]"
    )


def packed(**x):  # the same inputs, packed as one batch of ΣT = 2 T tokens
    return {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in x.items()}


# (id, changes to the valid inputs, exception, regex the message must match). Shared by both
# families: q, k, v, g (scalar), initial_state and cu_seqlens mean the same thing in each.
COMMON = [
    (
        "q-rank",
        {"q": randn(B, T, K)},
        ValueError,
        re.escape("q must have rank 4 [B, T, H, D], got shape (2, 5, 8)"),
    ),
    (
        "k-rank",
        {"k": randn(B, T, H, K, 1)},
        ValueError,
        re.escape("k must have rank 4 [B, T, H, D], got shape (2, 5, 2, 8, 1)"),
    ),
    (
        "v-rank",
        {"v": randn(B, T, V)},
        ValueError,
        re.escape("v must have rank 4 [B, T, H, D], got shape (2, 5, 12)"),
    ),
    (
        "k-length",
        {"k": randn(B, T + 1, H, K)},
        ValueError,
        shape_msg("k", (B, T + 1, H, K), "BTHK", (B, T, H, K)),
    ),
    (
        "k-K-differs-from-q",
        {"k": randn(B, T, H, K - 2)},
        ValueError,
        shape_msg("k", (B, T, H, K - 2), "BTHK", (B, T, H, K)),
    ),
    (
        "k-heads",
        {"k": randn(B, T, H + 1, K)},
        ValueError,
        shape_msg("k", (B, T, H + 1, K), "BTHK", (B, T, H, K)),
    ),
    (
        "k-batch-1",
        {"k": randn(1, T, H, K)},
        ValueError,
        shape_msg("k", (1, T, H, K), "BTHK", (B, T, H, K)),
    ),
    (
        "v-heads",
        {"v": randn(B, T, H + 1, V)},
        ValueError,
        shape_msg("v", (B, T, H + 1, V), "BTHV", (B, T, H, "V")),
    ),
    (
        "v-length-1",
        {"v": randn(B, 1, H, V)},
        ValueError,
        shape_msg("v", (B, 1, H, V), "BTHV", (B, T, H, "V")),
    ),
    (
        "empty",
        {
            "q": randn(B, 0, H, K),
            "k": randn(B, 0, H, K),
            "v": randn(B, 0, H, V),
            "g": -rand(B, 0, H),
        },
        ValueError,
        "the sequence is empty: q has T = 0",
    ),
    (
        "q-not-tensor",
        {"q": randn(B, T, H, K).tolist()},
        TypeError,
        "q must be a torch.Tensor, got list",
    ),
    (
        "q-int",
        {"q": torch.zeros(B, T, H, K, dtype=torch.int64)},
        TypeError,
        "q must be a floating-point tensor .* got dtype torch.int64",
    ),
    (
        "k-int",
        {"k": torch.zeros(B, T, H, K, dtype=torch.int32)},
        TypeError,
        "k must be a floating-point tensor .* got dtype torch.int32",
    ),
    (
        "v-bool",
        {"v": torch.zeros(B, T, H, V, dtype=torch.bool)},
        TypeError,
        "v must be a floating-point tensor .* got dtype torch.bool",
    ),
    (
        "mixed-dtypes",
        {"k": randn(B, T, H, K, dtype=torch.float64)},
        TypeError,
        re.escape("q, k, v must share one dtype, got torch.float32, torch.float64, torch.float32"),
    ),
    ("v-half", {"v": randn(B, T, H, V).half()}, TypeError, "q, k, v must share one dtype"),
    ("g-rank-2", {"g": -rand(B, T)}, ValueError, re.escape("g must have rank")),
    ("g-heads-1", {"g": -rand(B, T, 1)}, ValueError, shape_msg("g", (B, T, 1), "BTH", (B, T, H))),
    ("g-batch-1", {"g": -rand(1, T, H)}, ValueError, shape_msg("g", (1, T, H), "BTH", (B, T, H))),
    (
        "g-length",
        {"g": -rand(B, T - 1, H)},
        ValueError,
        shape_msg("g", (B, T - 1, H), "BTH", (B, T, H)),
    ),
    (
        "g-positive",
        {"g": torch.full((B, T, H), 0.5)},
        ValueError,
        "g is a log-space decay and must be finite and ≤ 0 .*got min 0.5, max 0.5",
    ),
    (
        "g-one-positive",
        {"g": (-rand(B, T, H)).index_put_((torch.tensor(1),) * 3, torch.tensor(1e-3))},
        ValueError,
        "g is a log-space decay and must be finite and ≤ 0",
    ),
    (
        "g-minus-inf",
        {"g": torch.full((B, T, H), -float("inf"))},
        ValueError,
        "g is a log-space decay and must be finite and ≤ 0",
    ),
    (
        "g-nan",
        {"g": torch.full((B, T, H), float("nan"))},
        ValueError,
        "g is a log-space decay and must be finite and ≤ 0",
    ),
    (
        "g-float64",
        {"g": -rand(B, T, H, dtype=torch.float64)},
        TypeError,
        r"g must have q's dtype \(torch.float32\) or float32 .* got torch.float64",
    ),
    (
        "g-int",
        {"g": torch.zeros(B, T, H, dtype=torch.int64)},
        TypeError,
        "g must be a floating-point tensor",
    ),
    (
        "state-batch-1",
        {"initial_state": randn(1, H, K, V)},
        ValueError,
        shape_msg("initial_state", (1, H, K, V), "BHKV", (B, H, K, V)),
    ),
    (
        "state-K-V-swapped",
        {"initial_state": randn(B, H, V, K)},
        ValueError,
        shape_msg("initial_state", (B, H, V, K), "BHKV", (B, H, K, V)),
    ),
    (
        "state-rank",
        {"initial_state": randn(B, K, V)},
        ValueError,
        re.escape("initial_state must have rank 4"),
    ),
    (
        "state-int",
        {"initial_state": torch.zeros(B, H, K, V, dtype=torch.int64)},
        TypeError,
        "initial_state must be a floating-point tensor",
    ),
    ("scale-str", {"scale": "0.5"}, TypeError, "scale must be a float or None, got str"),
    (
        "cu-batch-2",
        {"cu_seqlens": torch.tensor([0, 2, T])},
        ValueError,
        re.escape("packed sequences (cu_seqlens) need batch size 1, got B = 2"),
    ),
    (
        "cu-float",
        {"pack": True, "cu_seqlens": torch.tensor([0.0, 4.0, 10.0])},
        TypeError,
        re.escape("cu_seqlens must be a 1-D int32/int64 tensor, got dtype torch.float32"),
    ),
    (
        "cu-2d",
        {"pack": True, "cu_seqlens": torch.tensor([[0, 4, 10]])},
        TypeError,
        re.escape("cu_seqlens must be a 1-D int32/int64 tensor"),
    ),
    (
        "cu-not-a-tensor",
        {"pack": True, "cu_seqlens": range(0, 11, 5)},
        TypeError,
        "cu_seqlens must be a 1-D integer tensor, got range",
    ),
    (
        "cu-start",
        {"pack": True, "cu_seqlens": [1, 4, 10]},
        ValueError,
        re.escape("cu_seqlens must start at 0 and hold at least 2 offsets, got [1, 4, 10]"),
    ),
    (
        "cu-single",
        {"pack": True, "cu_seqlens": [0]},
        ValueError,
        re.escape("cu_seqlens must start at 0 and hold at least 2 offsets, got [0]"),
    ),
    (
        "cu-repeat",
        {"pack": True, "cu_seqlens": [0, 4, 4, 10]},
        ValueError,
        re.escape("cu_seqlens must be strictly increasing, got [0, 4, 4, 10]"),
    ),
    (
        "cu-decrease",
        {"pack": True, "cu_seqlens": torch.tensor([0, 6, 3, 10])},
        ValueError,
        re.escape("cu_seqlens must be strictly increasing, got [0, 6, 3, 10]"),
    ),
    (
        "cu-short",
        {"pack": True, "cu_seqlens": [0, 4, 9]},
        ValueError,
        re.escape("cu_seqlens must end at T = 10, got last offset 9"),
    ),
    (
        "cu-long",
        {"pack": True, "cu_seqlens": torch.tensor([0, 4, 11], dtype=torch.int32)},
        ValueError,
        re.escape("cu_seqlens must end at T = 10, got last offset 11"),
    ),
    (
        "cu-state-count",
        {"pack": True, "cu_seqlens": [0, 4, 10], "initial_state": randn(3, H, K, V)},
        ValueError,
        shape_msg("initial_state", (3, H, K, V), "NHKV", (2, H, K, V)),
    ),
    (
        "cu-state-batch",
        {"pack": True, "cu_seqlens": [0, 4, 10], "initial_state": randn(1, H, K, V)},
        ValueError,
        shape_msg("initial_state", (1, H, K, V), "NHKV", (2, H, K, V)),
    ),
]

GATED_LINEAR_ONLY = [
    (
        "g-channel-1",
        {"g": -rand(B, T, H, 1)},
        ValueError,
        shape_msg("g", (B, T, H, 1), "BTHK", (B, T, H, K)),
    ),
    (
        "g-channel-V",
        {"g": -rand(B, T, H, V)},
        ValueError,
        shape_msg("g", (B, T, H, V), "BTHK", (B, T, H, K)),
    ),
    (
        "g-channel-batch-1",
        {"g": -rand(1, T, H, K)},
        ValueError,
        shape_msg("g", (1, T, H, K), "BTHK", (B, T, H, K)),
    ),
    (
        "g-channel-positive",
        {"g": rand(B, T, H, K)},
        ValueError,
        "g is a log-space decay and must be finite and ≤ 0",
    ),
    ("g-rank-5", {"g": -rand(B, T, H, K, 1)}, ValueError, re.escape("g must have rank")),
]

DELTA_RULE_ONLY = [
    (
        "g-per-channel",
        {"g": -rand(B, T, H, K)},
        ValueError,
        re.escape("g must have rank 3 [B, T, H], got shape (2, 5, 2, 8)"),
    ),
    (
        "beta-missing-heads",
        {"beta": rand(B, T)},
        ValueError,
        re.escape("beta must have rank 3 [B, T, H], got shape (2, 5)"),
    ),
    (
        "beta-heads-1",
        {"beta": rand(B, T, 1)},
        ValueError,
        shape_msg("beta", (B, T, 1), "BTH", (B, T, H)),
    ),
    (
        "beta-batch-1",
        {"beta": rand(1, T, H)},
        ValueError,
        shape_msg("beta", (1, T, H), "BTH", (B, T, H)),
    ),
    (
        "beta-trailing-1",
        {"beta": rand(B, T, H, 1)},
        ValueError,
        re.escape("beta must have rank 3 [B, T, H], got shape (2, 5, 2, 1)"),
    ),
    (
        "beta-float64",
        {"beta": rand(B, T, H, dtype=torch.float64)},
        TypeError,
        r"beta must have q's dtype \(torch.float32\) or float32 .* got torch.float64",
    ),
    (
        "beta-int",
        {"beta": torch.ones(B, T, H, dtype=torch.int64)},
        TypeError,
        "beta must be a floating-point tensor",
    ),
    ("beta-not-tensor", {"beta": 0.5}, TypeError, "beta must be a torch.Tensor, got float"),
    (
        "beta-negative",
        {"beta": torch.full((B, T, H), -0.1)},
        ValueError,
        re.escape(
            "beta must lie in [0, 1] (values up to 2 need allow_neg_eigval=True); got min -0.1"
        ),
    ),
    (
        "beta-above-1",
        {"beta": rand(B, T, H).index_put_((torch.tensor(0),) * 3, torch.tensor(1.5))},
        ValueError,
        re.escape("beta must lie in [0, 1] (values up to 2 need allow_neg_eigval=True)"),
    ),
    (
        "beta-nan",
        {"beta": torch.full((B, T, H), float("nan"))},
        ValueError,
        re.escape("beta must lie in [0, 1]"),
    ),
    (
        "neg-beta-above-2",
        {"allow_neg_eigval": True, "beta": torch.full((B, T, H), 2.5)},
        ValueError,
        re.escape("beta must lie in [0, 2]; got min 2.5, max 2.5"),
    ),
    (
        "neg-beta-negative",
        {"allow_neg_eigval": True, "beta": torch.full((B, T, H), -1e-3)},
        ValueError,
        re.escape("beta must lie in [0, 2]; got min -0.001"),
    ),
]


def call(fn, changes: dict, beta: bool):
    """fn on the valid inputs (with β for the delta rule), after applying `changes`."""
    changes = dict(changes)
    x = valid(beta)
    if changes.pop("pack", False):
        x = packed(**x)
    x.update(changes)
    return fn(**x)


def cases(family: dict, rows: list):
    return [
        pytest.param(fn, changes, exc, match, family is DELTA_RULE, id=f"{fn.__name__}-{row_id}")
        for row_id, changes, exc, match in rows
        for fn in family.values()
    ]


@pytest.mark.parametrize(
    "fn,changes,exc,match,beta",
    cases(GATED_LINEAR, COMMON + GATED_LINEAR_ONLY) + cases(DELTA_RULE, COMMON + DELTA_RULE_ONLY),
)
def test_bad_argument_is_named(fn, changes, exc, match, beta):
    with pytest.raises(exc, match=match):
        call(fn, changes, beta)


@pytest.mark.parametrize("family", [GATED_LINEAR, DELTA_RULE], ids=["gated_linear", "delta_rule"])
def test_valid_inputs_pass(family):
    """The baseline every error case departs from is accepted, unpacked and packed, so each error
    above is caused by its one change."""
    beta = family is DELTA_RULE
    for fn in family.values():
        o, _ = call(fn, {}, beta)
        assert o.shape == (B, T, H, V)
        changes = {"pack": True, "cu_seqlens": [0, 4, 10], "output_final_state": True}
        o, s = call(fn, changes, beta)
        assert o.shape == (1, B * T, H, V) and s.shape == (2, H, K, V)


@pytest.mark.parametrize("dispatch", [gated_linear, delta_rule])
@pytest.mark.parametrize("form", ["fast", "Chunk", "", None])
def test_unknown_form(dispatch, form):
    with pytest.raises(
        ValueError,
        match=re.escape(f"form must be one of 'recurrent', 'chunk', 'parallel', got {form!r}"),
    ):
        call(functools.partial(dispatch, form=form), {}, beta=dispatch is delta_rule)


DELTA_CHUNK = (chunk_delta_rule, delta_rule)


@pytest.mark.parametrize(
    "fn",
    [chunk_gated_linear, gated_linear, chunk_delta_rule, delta_rule],
    ids=lambda fn: fn.__name__,
)
@pytest.mark.parametrize("chunk_size", [0, -16, 16.0, True, "64", None])
def test_bad_chunk_size(fn, chunk_size):
    with pytest.raises(
        ValueError, match=re.escape(f"chunk_size must be a positive int, got {chunk_size!r}")
    ):
        call(functools.partial(fn, chunk_size=chunk_size), {}, beta=fn in DELTA_CHUNK)


@pytest.mark.parametrize("form", list(DELTA_RULE))
@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, 2.0])
def test_beta_up_to_two_needs_allow_neg_eigval(form, value):
    """β in (1, 2] is rejected by default, accepted with allow_neg_eigval; 0 and 1 always pass."""
    fn = DELTA_RULE[form]
    beta = torch.full((B, T, H), value)
    if value > 1:
        with pytest.raises(ValueError, match=re.escape("need allow_neg_eigval=True")):
            call(fn, {"beta": beta}, True)
    else:
        assert torch.isfinite(call(fn, {"beta": beta}, True)[0]).all()
    o, _ = call(fn, {"beta": beta, "allow_neg_eigval": True}, True)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("form", list(GATED_LINEAR))
def test_gate_may_be_absent_zero_or_per_channel(form):
    """The accepted gate shapes: None, [B, T, H] (also all-zero: no decay) and [B, T, H, K]."""
    fn = GATED_LINEAR[form]
    for g in [None, torch.zeros(B, T, H), -rand(B, T, H, K)]:
        o, _ = call(fn, {"g": g}, False)
        assert o.shape == (B, T, H, V) and torch.isfinite(o).all()


def test_half_inputs_take_float32_gates_and_beta():
    """A bf16 model may keep its log-decays and β in float32 (not an error)."""
    from seqlab.ops import delta_rule, gated_linear

    q = randn(B, T, H, K).bfloat16()
    v = randn(B, T, H, V).bfloat16()
    g = -rand(B, T, H)
    o, s = gated_linear(q, q, v, g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    beta = rand(B, T, H)
    o, s = delta_rule(
        q, torch.nn.functional.normalize(q, dim=-1), v, beta, g, output_final_state=True
    )
    assert o.dtype == torch.bfloat16 and torch.isfinite(o.float()).all()


def value_cases():
    """The rows above whose error is about a gate's or β's values, not their shapes or types."""
    families = ((GATED_LINEAR, COMMON + GATED_LINEAR_ONLY), (DELTA_RULE, COMMON + DELTA_RULE_ONLY))
    return [
        pytest.param(fn, changes, family is DELTA_RULE, id=f"{fn.__name__}-{row_id}")
        for family, rows in families
        for row_id, changes, _, match in rows
        if "finite and ≤ 0" in match or "must lie in" in match.replace("\\", "")
        for fn in family.values()
    ]


@pytest.mark.parametrize("fn,changes,beta", value_cases())
def test_check_values_false_skips_only_the_value_checks(fn, changes, beta):
    """The rows above that raise for a bad gate or β value run with check_values=False, reading
    nothing back to the host; a bad shape is still an error."""
    with pytest.raises(ValueError):
        call(fn, changes, beta)
    with HostReads() as spy:
        o, _ = call(fn, {**changes, "check_values": False}, beta)
    assert o.shape == (B, T, H, V)
    assert spy.reads == []
    with pytest.raises(ValueError, match="g has shape"):
        call(fn, {**changes, "check_values": False, "g": -rand(B, T, 1)}, beta)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "arg,bad,match",
    [
        ("beta", float("nan"), "beta must lie in"),
        ("beta", 1.0001, "beta must lie in"),
        ("beta", -1e-6, "beta must lie in"),
        ("g", float("nan"), "g is a log-space decay"),
        ("g", 1e-6, "g is a log-space decay"),
        ("g", -float("inf"), "g is a log-space decay"),
        ("g", float("inf"), "g is a log-space decay"),
        ("i", float("nan"), "i holds gate pre-activations"),
        ("f", -float("inf"), "f holds gate pre-activations"),
        ("i", float("inf"), "i holds gate pre-activations"),
    ],
)
def test_one_bad_value_among_many_is_found(arg, bad, match, seed):
    """The value checks (one min/max pass) see a single bad value anywhere in a long input,
    not only an input made of bad values."""
    from seqlab.ops.delta_rule import delta_rule
    from seqlab.ops.mlstm import mlstm

    gen = torch.Generator().manual_seed(seed)
    Bn, Tn, Hn = 2, 3000, 4  # 24,000 gate values: the vectorised min/max paths
    q, k = torch.randn(Bn, Tn, Hn, 8, generator=gen), torch.randn(Bn, Tn, Hn, 8, generator=gen)
    v = torch.randn(Bn, Tn, Hn, 8, generator=gen)
    gates = {
        "beta": torch.rand(Bn, Tn, Hn, generator=gen),
        "g": -torch.rand(Bn, Tn, Hn, generator=gen),
        "i": torch.randn(Bn, Tn, Hn, generator=gen),
        "f": torch.randn(Bn, Tn, Hn, generator=gen),
    }
    where = torch.randint(0, Bn * Tn * Hn, (), generator=gen)
    gates[arg].view(-1)[where] = bad
    with pytest.raises(ValueError, match=match):
        if arg in ("beta", "g"):
            delta_rule(q, k, v, gates["beta"], gates["g"], form="recurrent")
        else:
            mlstm(q, k, v, gates["i"], gates["f"], form="recurrent")
