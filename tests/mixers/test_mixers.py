"""Every registered mixer: shapes, gradients, determinism, pass = decode = chunks, state size."""

from __future__ import annotations

import importlib

import pytest
import torch

from seqlab.mixers import MIXERS, state_tensors
from seqlab.mixers.recurrent import RecurrentMixer
from tests.host_reads import HostReads
from tests.mixers.conftest import CASES, B, D, T, make_mixer, make_x

F64 = {"rtol": 1e-8, "atol": 1e-10}
ALL = list(CASES)
# mixers whose state does not grow with T; of those, the ones whose state holds float32 matrices
RECURRENT = [c for c in CASES if not MIXERS[CASES[c][0]].state_grows]
MATRICES = [c for c in RECURRENT if issubclass(MIXERS[CASES[c][0]], RecurrentMixer)]
# mixers on the chunked recurrences, whose chunk and recurrent forms the spies below record
CHUNKED = [c for c in MATRICES if MIXERS[CASES[c][0]].core_op in ("gated_linear", "delta_rule")]


def stream(mixer, x, cuts):
    """Run x in pieces split at `cuts`, carrying the state; returns (y, final state)."""
    ys, state = [], None
    for lo, hi in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        y, state = mixer(x[:, lo:hi], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def assert_same_state(actual, expected):
    actual, expected = state_tensors(actual), state_tensors(expected)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], **F64, msg=lambda m, n=name: f"state[{n!r}]: {m}"
        )


def test_every_registered_mixer_declares_an_example():
    assert {name for name, _ in CASES.values()} == set(MIXERS)


@pytest.mark.parametrize("case", ALL)
def test_shapes_and_state_layout(case):
    mixer = make_mixer(case)
    y, state = mixer(make_x())
    assert y.shape == (B, T, D) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    init = state_tensors(mixer.init_state(B))
    state = state_tensors(state)
    assert state.keys() == init.keys()
    for name, t in state.items():
        assert t.dtype == init[name].dtype, name
        if isinstance(mixer, RecurrentMixer) or name == "pos":
            assert t.shape == init[name].shape, name
    if isinstance(mixer, RecurrentMixer):
        assert mixer.matrices and all(state[m].dtype == torch.float32 for m in mixer.matrices)


@pytest.mark.parametrize("case", ALL)
def test_gradients_reach_every_parameter(case):
    mixer = make_mixer(case)
    x = make_x().requires_grad_(True)
    y, _ = mixer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad.abs().max() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None, f"{name} is not used"
        assert p.grad.abs().max() > 0, f"{name} has a zero gradient"


@pytest.mark.parametrize("case", ALL)
def test_seeded_determinism(case):
    y1, s1 = make_mixer(case, seed=3)(make_x(seed=3))
    y2, s2 = make_mixer(case, seed=3)(make_x(seed=3))
    y3, _ = make_mixer(case, seed=4)(make_x(seed=3))
    assert torch.equal(y1, y2)
    s1, s2 = state_tensors(s1), state_tensors(s2)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("case", ALL)
def test_one_pass_equals_prefill_then_decode_steps(case):
    mixer = make_mixer(case, dtype=torch.float64)
    x = make_x(dtype=torch.float64)
    y, state = mixer(x)
    y_dec, state_dec = stream(mixer, x, list(range(25, T)))
    torch.testing.assert_close(y_dec, y, **F64)
    assert_same_state(state_dec, state)


@pytest.mark.parametrize("split", [1, 17])
@pytest.mark.parametrize("case", ALL)
def test_one_pass_equals_two_chunks(case, split):
    mixer = make_mixer(case, dtype=torch.float64)
    x = make_x(dtype=torch.float64)
    y, state = mixer(x)
    y_two, state_two = stream(mixer, x, [split])
    torch.testing.assert_close(y_two, y, **F64)
    assert_same_state(state_two, state)


@pytest.mark.parametrize("case", ALL)
def test_init_state_is_the_empty_history(case):
    mixer = make_mixer(case, dtype=torch.float64)
    x = make_x(dtype=torch.float64)
    y, state = mixer(x)
    y0, state0 = mixer(x, mixer.init_state(B))
    torch.testing.assert_close(y0, y, **F64)
    assert_same_state(state0, state)


@pytest.mark.parametrize("case", ALL)
def test_outputs_do_not_see_the_future(case):
    mixer = make_mixer(case, dtype=torch.float64)
    x = make_x(dtype=torch.float64)
    x2 = x.clone()
    x2[:, 20:] = torch.randn_like(x2[:, 20:])
    y, _ = mixer(x)
    y2, _ = mixer(x2)
    torch.testing.assert_close(y2[:, :20], y[:, :20], **F64)
    assert not torch.allclose(y2[:, 20:], y[:, 20:])


def nbytes(state):
    return sum(t.numel() * t.element_size() for t in state_tensors(state).values())


@pytest.mark.parametrize("case", RECURRENT)
def test_recurrent_state_bytes_do_not_grow_with_T(case):
    mixer = make_mixer(case)
    sizes = {mixer.state_bytes(mixer(make_x(T=t))[1]) for t in (1, 9, 40)}
    assert sizes == {nbytes(mixer.init_state(B))}
    for t in mixer.init_state(B).values():
        assert t.shape[0] == B


@pytest.mark.parametrize("case", ALL)
def test_state_bytes_for_predicts_the_real_state(case):
    mixer = make_mixer(case)
    for t in (1, 4, 40):
        assert mixer.state_bytes_for(B, t) == nbytes(mixer(make_x(T=t))[1])


def test_attention_state_bytes_grow_linearly_with_T():
    mixer = make_mixer("attn")
    per_token = 2 * B * mixer.num_kv_heads * mixer.head_dim * 4  # k and v, float32
    pos_bytes = B * 8
    for t in (1, 9, 40):
        state = mixer(make_x(T=t))[1]
        assert mixer.state_bytes(state) == nbytes(state) == pos_bytes + t * per_token
    assert mixer.state_bytes(mixer.init_state(B)) == pos_bytes


def test_windowed_attention_state_bytes_are_bounded_by_the_window():
    mixer = make_mixer("attn_window")
    window = mixer.config.window
    per_token = 2 * B * mixer.num_kv_heads * mixer.head_dim * 4
    for t in (2, 9, 40):
        state = mixer(make_x(T=t))[1]
        assert state["kv"].length == min(t, window - 1)
        assert mixer.state_bytes(state) == nbytes(state) == B * 8 + min(t, window - 1) * per_token
    _, state = stream(mixer, make_x(T=12), list(range(1, 12)))
    assert state["kv"].length == window - 1


@pytest.mark.parametrize("case", MATRICES)
def test_low_precision_parameters_keep_a_float32_recurrent_state(case):
    mixer = make_mixer(case, dtype=torch.bfloat16)
    assert all(mixer.init_state(B)[m].dtype == torch.float32 for m in mixer.matrices)
    y, state = stream(mixer, make_x(T=20, dtype=torch.bfloat16), [17])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    for name, t in state_tensors(state).items():
        if t.is_floating_point():  # conv tails in the parameters' dtype; positions are ints
            assert t.dtype == (torch.float32 if name in mixer.matrices else torch.bfloat16), name


@pytest.mark.parametrize("case", ALL)
def test_runs_under_bf16_autocast_with_float32_parameters(case):
    """The trainer's precision="bf16": float32 weights, bf16 autocast (rwkv7 once passed the
    op a float32 k beside a bf16 q, as its LoRA biases are float32)."""
    mixer = make_mixer(case)
    x = make_x().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = stream(mixer, x, [17])
    ref, _ = mixer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


@pytest.mark.parametrize("case", ["attn", "mamba2", "gdn"])
def test_float64_parameters_give_a_float64_state(case):
    mixer = make_mixer(case, dtype=torch.float64)
    _, state = mixer(make_x(dtype=torch.float64))
    floats = [t for t in state_tensors(state).values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)


@pytest.fixture
def op_calls(monkeypatch):
    """[(op name, args, kwargs, op)] of every recurrence op the mixers call, by form."""
    calls = []
    for family in ("gated_linear", "delta_rule"):
        # by import_module: seqlab.ops.gated_linear is the function, which shadows its module
        module = importlib.import_module(f"seqlab.ops.{family}")
        for form in ("recurrent", "chunk"):
            name = f"{form}_{family}"
            monkeypatch.setattr(module, name, recording(name, getattr(module, name), calls))
    return calls


def recording(name, op, calls):
    def spy(*args, **kwargs):
        calls.append((name, args, kwargs, op))
        return op(*args, **kwargs)

    return spy


@pytest.mark.parametrize("case", CHUNKED)
def test_prefill_runs_the_chunk_form_and_a_decode_step_the_recurrent_form(case, op_calls):
    mixer = make_mixer(case)
    x = make_x()
    _, state = mixer(x[:, :8])
    assert [call[0].split("_")[0] for call in op_calls] == ["chunk"]
    mixer(x[:, 8:9], state)
    assert [call[0].split("_")[0] for call in op_calls] == ["chunk", "recurrent"]


@pytest.mark.parametrize("case", ["deltanet", "gdn", "gdn_neg_eigval"])
def test_delta_rule_mixers_write_with_unit_keys_and_bounded_beta(case, op_calls):
    mixer = make_mixer(case)
    mixer(make_x())
    [(_, (q, k, _, beta, g, *_), _, _)] = op_calls
    ones = torch.ones(q.shape[:-1])
    torch.testing.assert_close(q.norm(dim=-1), ones)
    torch.testing.assert_close(k.norm(dim=-1), ones)
    high = 2.0 if mixer.config.allow_neg_eigval else 1.0
    assert beta.min() > 0 and beta.max() < high and beta.max() > high / 2
    assert (g is None) == (case == "deltanet")


@pytest.mark.parametrize("case", CHUNKED)
def test_mixers_pass_values_the_op_checks_would_accept(case, op_calls):
    """The mixers call the ops with check_values=False (a value check reads the gates back to the
    host); the gates and β they pass must still be what the checks accept."""
    mixer = make_mixer(case)
    x = make_x()
    _, state = mixer(x[:, :20])
    mixer(x[:, 20:21], state)
    assert len(op_calls) == 2
    for _, args, kwargs, op in op_calls:
        if mixer.__class__.__name__ != "LinearAttention":
            assert kwargs["check_values"] is False
        op(*args, **{**kwargs, "check_values": True})  # raises on a bad gate or β


@pytest.mark.parametrize("case", ALL)
def test_prefill_and_decode_read_nothing_back_to_the_host(case):
    """On a GPU a host read (`.item()`, `bool(t)`) makes each decode step wait for the device."""
    mixer = make_mixer(case)
    x = make_x()
    with HostReads() as spy:
        _, state = mixer(x[:, :20])
        mixer(x[:, 20:21], state)
        with torch.no_grad():
            mixer(x[:, 21:22], mixer(x[:, :21])[1])
    assert spy.reads == []
