"""LASP-2 ops on 2 and 4 gloo processes equal the single-process ops, forward and backward.

Every case is drawn in float64 from a seed; the parent runs the op on the whole sequence (and
on each rank's prefix, for the state after that rank's slice), the children run the LASP-2 op
on their slices of T (unequal slices, none a multiple of the chunk size), and each rank's
outputs, final state and gradients must equal the matching slice of the single-process ones to
float64 round-off. One spawn runs every case of a test (a spawn costs seconds of imports).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.ops.attention import attention
from seqlab.ops.delta_rule import delta_rule
from seqlab.ops.gated_linear import gated_linear
from seqlab.parallel import (
    CommLog,
    lasp2_attention,
    lasp2_delta_rule,
    lasp2_gated_linear,
    previous_tail,
    run_group,
)

F64 = {"rtol": 1e-10, "atol": 1e-10}
B, H, K, V, CHUNK = 2, 2, 8, 6, 8
SPLITS = {2: [13, 7], 4: [5, 9, 8, 11]}  # tokens per rank: unequal, none a multiple of CHUNK


def make_case(case: dict, T: int) -> dict[str, torch.Tensor]:
    """The whole sequence's inputs of `case` in float64: gate "none", "head" or "channel"
    (log-decays logsigmoid(z), or around −5 with `strong`), β for the delta rule, an initial
    state with `init`."""
    gen = torch.Generator().manual_seed(case["seed"])

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    Hkv = case.get("Hkv", H)
    x = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, Hkv, K), dim=-1)}
    x["v"] = randn(B, T, Hkv, V)
    if case["op"] == "delta_rule":
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        if case.get("neg"):
            x["beta"] = 2 * x["beta"]
    gate = case.get("gate", "none")
    if gate != "none":
        shape = (B, T, H) if gate == "head" else (B, T, H, K)
        x["g"] = F.logsigmoid(randn(*shape) - (5.0 if case.get("strong") else 0.0))
    if case.get("init"):
        x["initial_state"] = randn(B, H, K, V)
    return x


def _options(case: dict) -> dict:
    if case["op"] == "attention":
        return {"window": case.get("window")}
    opts = {"chunk_size": CHUNK}
    if case.get("neg"):
        opts["allow_neg_eigval"] = True
    return opts


SINGLE = {"gated_linear": gated_linear, "delta_rule": delta_rule, "attention": attention}
SHARDED = {
    "gated_linear": lasp2_gated_linear,
    "delta_rule": lasp2_delta_rule,
    "attention": lasp2_attention,
}


def _weights(case: dict, T: int, N: int):
    """Loss weights: for o [B, T, H, V] and for the state after each rank's slice."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    wo = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ws = torch.randn(N, B, H, K, V, generator=gen, dtype=torch.float64)
    return wo, ws


def _state_tensor(S):
    """A recurrent state, or a KV cache's keys and values side by side."""
    return S if isinstance(S, torch.Tensor) else torch.cat([S.k, S.v], -1)


def single_process(case: dict, splits: list[int]):
    """o, the state after each rank's end, and the gradients of every input, on one process."""
    T, N = sum(splits), len(splits)
    leaves = {n: t.requires_grad_() for n, t in make_case(case, T).items()}
    op, opts = SINGLE[case["op"]], _options(case)
    o, _ = op(**leaves, **opts)
    wo, ws = _weights(case, T, N)
    loss = (o * wo).sum()
    states, end = [], 0
    for r, n in enumerate(splits):
        end += n
        prefix = {k: t if k == "initial_state" else t[:, :end] for k, t in leaves.items()}
        _, S = op(**prefix, output_final_state=True, **opts)
        if case["op"] != "attention":
            loss = loss + (S * ws[r]).sum()
        states.append(_state_tensor(S).detach())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), states, dict(zip(leaves, grads, strict=True))


def sharded_worker(rank: int, N: int, cases: list[dict], splits: list[int]):
    """Each case on this rank's slice: (o, the state after the slice, the input gradients)."""
    out = []
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    for case in cases:
        T = sum(splits)
        full = make_case(case, T)
        mine = {n: t[:, lo:hi].clone() for n, t in full.items() if n != "initial_state"}
        if rank == 0 and "initial_state" in full:
            mine["initial_state"] = full["initial_state"]
        leaves = {n: t.requires_grad_() for n, t in mine.items()}
        log = CommLog()
        o, S = SHARDED[case["op"]](**leaves, output_final_state=True, log=log, **_options(case))
        wo, ws = _weights(case, T, N)
        loss = (o * wo[:, lo:hi]).sum()
        if case["op"] != "attention":
            loss = loss + (S * ws[rank]).sum()
        loss.backward()
        grads = {n: t.grad for n, t in leaves.items()}
        out.append((o.detach(), _state_tensor(S).detach(), grads, log.rows))
    return out


RECURRENCES = [
    {"op": "gated_linear", "gate": "none", "seed": 1},
    {"op": "gated_linear", "gate": "head", "seed": 2, "init": True},
    {"op": "gated_linear", "gate": "head", "seed": 3, "strong": True},
    {"op": "gated_linear", "gate": "channel", "seed": 4, "init": True},
    {"op": "gated_linear", "gate": "channel", "seed": 5, "strong": True},
    {"op": "delta_rule", "seed": 6, "init": True},
    {"op": "delta_rule", "gate": "head", "seed": 7, "init": True},
    {"op": "delta_rule", "gate": "head", "seed": 8, "strong": True, "neg": True},
]


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, **F64, msg=lambda m: f"{what}: {m}")


def _check(cases, results, splits):
    """Each rank's results equal its slice of the single-process ones."""
    for i, case in enumerate(cases):
        o_ref, states_ref, grads_ref = single_process(case, splits)
        lo = 0
        for r, n in enumerate(splits):
            o, S, grads, rows = results[r][i]
            label = f"{case} rank {r}"
            sl = slice(lo, lo + n)
            _close(o, o_ref[:, sl], f"{label} o")
            _close(S, states_ref[r], f"{label} S")
            for name, grad in grads.items():
                want = grads_ref[name] if name == "initial_state" else grads_ref[name][:, sl]
                _close(grad, want, f"{label} d/d{name}")
            assert [row[0] for row in rows] == ["all_gather", "all_to_all"], label
            lo += n


@pytest.mark.parametrize("N", [2, 4])
def test_recurrences_match_single_process(N):
    """Gated linear (no, per-head, per-channel gate) and the (gated) delta rule: o, the state
    after each slice and every gradient, initial state and strong decays included."""
    splits = SPLITS[N]
    results = run_group(sharded_worker, N, RECURRENCES, splits, timeout=300)
    _check(RECURRENCES, results, splits)


ATTENTION = [
    {"op": "attention", "seed": 11},
    {"op": "attention", "seed": 12, "Hkv": 1, "window": 5},
]


@pytest.mark.parametrize("N", [2, 4])
def test_attention_matches_single_process(N):
    """LASP-2H: gathered keys and values, the mask offset by the rank's start; full and
    windowed grouped-query attention, every gradient."""
    splits = [6] * N  # the gathered keys need one slice length
    results = run_group(sharded_worker, N, ATTENTION, splits, timeout=300)
    _check(ATTENTION, results, splits)


def _bytes_worker(rank: int, N: int, Ts: list[int]):
    """The bytes this rank sends for a forward and backward of each op, at each slice length."""
    out = {}
    for T in Ts:
        x = make_case({"op": "delta_rule", "gate": "head", "seed": 0}, T)
        for name, op, args in (
            ("gated_linear", lasp2_gated_linear, (x["q"], x["k"], x["v"], x["g"])),
            ("delta_rule", lasp2_delta_rule, (x["q"], x["k"], x["v"], x["beta"], x["g"])),
        ):
            leaves = [t.clone().requires_grad_() for t in args]
            log = CommLog()
            o, _ = op(*leaves, chunk_size=CHUNK, log=log)
            o.sum().backward()
            out[name, T] = log.bytes
    return out


def test_bytes_do_not_grow_with_T():
    """What a rank sends is the state and its map, twice (all-gather, all-to-all), at any T."""
    Ts = [8, 40]
    results = run_group(_bytes_worker, 2, Ts, timeout=300)
    per_state = B * H * K * V * 8
    want = {
        "gated_linear": 2 * (per_state + B * H * 8),  # F and the per-head decay D
        "delta_rule": 2 * (per_state + B * H * K * K * 8),  # F and the transition M
    }
    for rank_bytes in results:
        for (name, _), nbytes in rank_bytes.items():
            assert nbytes == want[name], (name, nbytes, want[name])


def _errors_worker(rank: int, N: int):
    x = make_case({"op": "gated_linear", "seed": 0, "init": True}, 4)
    messages = []
    if rank > 0:  # rank 0 reads initial_state (and would wait for the others in the gather)
        try:
            lasp2_gated_linear(x["q"], x["k"], x["v"], initial_state=x["initial_state"])
        except ValueError as e:
            messages.append(str(e))
    try:
        previous_tail(x["q"].flatten(2), 5)
    except ValueError as e:
        messages.append(str(e))
    try:  # checked before v is widened by the identity's columns
        lasp2_delta_rule(x["q"], x["k"], x["v"][..., 0], x["q"][..., 0])
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_errors_name_the_argument():
    results = run_group(_errors_worker, 2, timeout=300)
    assert len(results[0]) == 2 and "at least 5 steps" in results[0][0]
    assert "rank 1" in results[1][0] and "initial_state" in results[1][0]
    assert "at least 5 steps" in results[1][1]
    for messages in results:
        assert "v must have rank 4" in messages[-1]


def test_no_group_is_a_clear_error():
    x = make_case({"op": "gated_linear", "seed": 0}, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        lasp2_gated_linear(x["q"], x["k"], x["v"])


def _float32_worker(rank: int, N: int, cases: list[dict], T: int):
    """Each case in float32 on this rank's equal slice: (o, the state after the slice)."""
    out = []
    for case in cases:
        x = {
            n: t[:, rank * (T // N) : (rank + 1) * (T // N)].float()
            for n, t in make_case(case, T).items()
        }
        out.append(SHARDED[case["op"]](**x, output_final_state=True, chunk_size=16))
    return out


def test_float32_stays_close_to_float64():
    """Long slices in float32 (the decay's cumulative sum over a whole slice, the identity's
    columns through the UT transform): within 1e-5 of the float64 single-process result,
    relative to its largest value."""
    T, N = 256, 2
    cases = [
        {"op": "gated_linear", "gate": "channel", "seed": 21},
        {"op": "delta_rule", "gate": "head", "seed": 22},
    ]
    results = run_group(_float32_worker, N, cases, T, timeout=300)
    for i, case in enumerate(cases):
        x = make_case(case, T)
        o_ref, S_ref = SINGLE[case["op"]](**x, output_final_state=True, chunk_size=16)
        o = torch.cat([r[i][0] for r in results], 1).double()
        S = results[-1][i][1].double()
        for got, want, what in ((o, o_ref, "o"), (S, S_ref, "S")):
            err = (got - want).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item(), (case, what, err)
