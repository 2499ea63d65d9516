"""Edge cases of the recurrent mixers (lstm, gru, slstm, mlstm, rwkv7, mom) that the family tests
do not reach: extreme router logits, states held after a long prefill, mismatched states, empty
inputs and one-memory MoM patterns."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import build_mixer
from seqlab.mixers.base import TokenMixer
from seqlab.mixers.mom import MoMConfig
from seqlab.model.lm import CausalLM, ModelConfig

# a conv tail and every kind of recurrent state: slstm's stacked (h, c, n, m), mlstm's packed
# (C, n, m), rwkv7's token shift, mom's delta-rule memories
STATEFUL = {
    "slstm": {"num_heads": 2},
    "mlstm": {"num_heads": 2, "chunk_size": 16},
    "rwkv7": {"head_dim": 8, "chunk_size": 16},
    "mom": {"num_memories": 2, "top_k": 1, "num_heads": 2, "chunk_size": 16},
}


def test_mom_writes_each_top_k_memory_even_where_its_probability_underflows():
    """Router logits 800 apart: the second choice's probability is exactly 0 in float64, yet
    the token is routed to it (top-k), so that memory takes the token; the third does not."""
    d = 8
    mixer = build_mixer(
        "mom", d, num_memories=3, top_k=2, num_heads=1, shared_memory=False, chunk_size=4
    ).double()
    with torch.no_grad():
        mixer.router.weight.copy_(torch.tensor([[100.0], [0.0], [-100.0]]).expand(3, d))
    x = torch.ones(1, 1, d, dtype=torch.float64)
    probs = mixer.router(x).softmax(-1)[0, 0]
    assert probs[1] == 0 and probs[2] == 0  # the premise: memory 1's probability underflows
    _, state = mixer(x)
    moved = state["S"].flatten(2).abs().sum(-1)[0]  # [G·H]
    assert moved[0] > 0 and moved[1] > 0
    assert moved[2] == 0


def test_mom_with_one_memory_builds_from_a_pattern():
    assert MoMConfig.make(num_memories=1).top_k == 1
    assert MoMConfig.make().top_k == 2
    with pytest.raises(ValueError, match=r"top_k \(2\) must be at most num_memories \(1\)"):
        MoMConfig.make(num_memories=1, top_k=2)
    model = CausalLM(
        ModelConfig(vocab_size=11, d_model=12, n_layers=1, pattern="mom(num_memories=1)")
    )
    assert model(torch.randint(0, 11, (2, 5))).logits.shape == (2, 5, 11)


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_after_a_long_prefill_pins_no_memory_of_the_input(name):
    """The state's tensors are no views into O(T) buffers (the conv's [state | x], the input x,
    the chunk form's per-chunk states): what they keep alive is about what they hold."""
    mixer = build_mixer(name, 16, **STATEFUL[name])
    with torch.no_grad():
        _, state = mixer(torch.randn(1, 1024, 16))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()
    }
    assert sum(storages.values()) <= 2 * TokenMixer.state_bytes(state)


@pytest.mark.parametrize("name", list(STATEFUL))
@pytest.mark.parametrize("T", [1, 4])
def test_a_state_of_another_batch_size_is_a_clear_error(name, T):
    mixer = build_mixer(name, 16, **STATEFUL[name])
    with pytest.raises(ValueError, match=r"state.* has shape \(3, .*expected"):
        mixer(torch.randn(2, T, 16), mixer.init_state(3))


@pytest.mark.parametrize("name", list(STATEFUL))
def test_an_empty_sequence_is_a_clear_error(name):
    mixer = build_mixer(name, 16, **STATEFUL[name])
    with pytest.raises(ValueError, match="the sequence is empty"):
        mixer(torch.randn(2, 0, 16))
