"""States are explicit objects: a long decode equals one pass, a growing cache reallocates a
logarithmic number of times and stores nothing on tensors, and a copied state is independent."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import MIXERS, copy_state, state_tensors
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.model.pattern import LayerSpec
from seqlab.ops.attention import GROWTH, MIN_ROOM, KVCache
from tests.mixers.conftest import CASES, make_mixer, make_x

GROWING = [c for c in CASES if MIXERS[CASES[c][0]].state_grows]
STEPS = 300
TOL = dict(rtol=1e-4, atol=1e-5)


def assert_no_tensor_attributes(state) -> None:
    tensors = list(state_tensors(state).values())
    tensors += [
        t for x in state.values() if isinstance(x, KVCache) for t in (x.k_buffer, x.v_buffer)
    ]
    for t in tensors:
        assert t.__dict__ == {}, f"attributes set on a state tensor: {list(t.__dict__)}"


@pytest.mark.parametrize("case", GROWING)
def test_a_long_decode_equals_one_pass(case):
    mixer = make_mixer(case)
    x = make_x(T=STEPS + 5)
    with torch.no_grad():
        y, _ = mixer(x)
        ys, state = [], None
        y0, state = mixer(x[:, :5])
        ys.append(y0)
        for t in range(5, x.shape[1]):
            y_t, state = mixer(x[:, t : t + 1], state)
            ys.append(y_t)
            assert_no_tensor_attributes(state)
    torch.testing.assert_close(torch.cat(ys, dim=1), y, **TOL)


def test_the_kv_cache_grows_by_doubling():
    mixer = make_mixer("attn")
    x = make_x(T=STEPS)
    capacities = []
    with torch.no_grad():
        _, state = mixer(x[:, :1])
        for t in range(1, STEPS):
            _, state = mixer(x[:, t : t + 1], state)
            cache = state["kv"]
            assert cache.length == t + 1 and cache.capacity >= cache.length
            if not capacities or cache.capacity != capacities[-1]:
                capacities.append(cache.capacity)
    # each reallocation holds GROWTH times the tokens it copies (at least MIN_ROOM more)
    assert capacities[0] == 2 + MIN_ROOM
    for before, after in zip(capacities, capacities[1:], strict=False):
        assert after == max(GROWTH * (before + 1), before + 1 + MIN_ROOM)
    assert len(capacities) <= 4  # 66, 134, 270, 542 for 300 tokens
    assert mixer.state_bytes(state) == state["kv"].nbytes + state["pos"].nbytes
    assert state["kv"].allocated_bytes >= state["kv"].nbytes


def test_windowed_cache_holds_the_window():
    mixer = make_mixer("attn_window")
    x = make_x(T=60)
    with torch.no_grad():
        _, state = mixer(x[:, :3])
        for t in range(3, 60):
            _, state = mixer(x[:, t : t + 1], state)
    window = mixer.config.window
    assert state["kv"].length == state["kv"].capacity == window - 1
    assert_no_tensor_attributes(state)


def all_mixers_model() -> CausalLM:
    """One layer of every registered mixer (its first example), so a new mixer is covered."""
    specs = [LayerSpec(name, next(iter(cls.examples.values()))) for name, cls in MIXERS.items()]
    pattern = ",".join(str(s) for s in specs)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=len(specs), pattern=pattern)
    return CausalLM(config).eval()


@pytest.mark.parametrize("copy", [True, False])
def test_two_continuations_of_one_prefix_are_independent(copy):
    """Branches from one prefix state (beam search, several samples of one prompt) give what
    independent runs give, whether the state is copied first or continued twice as it is."""
    model = all_mixers_model()
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(50, (2, 8), generator=gen)
    a, b = torch.randint(50, (2, 2, 6), generator=gen)
    with torch.no_grad():
        want_a = model(torch.cat([prefix, a], 1)).logits[:, 8:]
        want_b = model(torch.cat([prefix, b], 1)).logits[:, 8:]
        state = model(prefix[:, :7]).state
        state = model(prefix[:, 7:], state).state  # a decode step: the KV cache has room now
        assert state[0]["kv"].capacity > state[0]["kv"].length
        states = {"a": state, "b": CausalLM.copy_state(state) if copy else state}
        got = {"a": [], "b": []}
        for t in range(a.shape[1]):  # interleaved: a write of one branch lands before the other's
            for name, tokens in (("a", a), ("b", b)):
                out = model(tokens[:, t : t + 1], states[name])
                states[name] = out.state
                got[name].append(out.logits)
        got = {name: torch.cat(logits, 1) for name, logits in got.items()}
    torch.testing.assert_close(got["a"], want_a, **TOL)
    torch.testing.assert_close(got["b"], want_b, **TOL)


def test_a_copied_state_shares_no_memory():
    mixer = make_mixer("attn")
    with torch.no_grad():
        _, state = mixer(make_x(T=9))
        _, state = mixer(make_x(T=1, seed=1), state)  # a buffer with room
    copied = copy_state(state)
    ptrs = {t.untyped_storage().data_ptr() for t in state_tensors(state).values()}
    for t in state_tensors(copied).values():
        assert t.untyped_storage().data_ptr() not in ptrs
    for name, t in state_tensors(state).items():
        assert torch.equal(state_tensors(copied)[name], t)
    assert copied["kv"].capacity == state["kv"].capacity
