"""A CausalLM over a sequence split across 2 gloo processes equals the single-process model:
logits, loss, every parameter's gradient (summed over ranks) and the last rank's states.

Patterns: a GLA/attention hybrid (per-channel gates, LASP-2H with RoPE offsets), Gated
DeltaNet and Mamba-2 (delta rule, per-head gates, short-conv tails from the previous rank),
DeltaNet and windowed grouped-query attention. float64 throughout, so agreement is round-off.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqlab.mixers.base import state_tensors
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.parallel import local_slice, run_group, split_sequence

F64 = {"rtol": 1e-10, "atol": 1e-10}
B, T, VOCAB = 2, 24, 50
# name: (pattern, n_layers)
PATTERNS = {
    "gla*2,attn": ("gla(num_heads=2, chunk_size=8)*2,attn(num_heads=4)", 3),
    "gdn,mamba2": (
        "gdn(num_heads=2, head_dim=8, chunk_size=8),mamba2(head_dim=16, d_state=8, chunk_size=8)",
        2,
    ),
    "deltanet,attn(window)": (
        "deltanet(num_heads=2, chunk_size=8),attn(num_heads=4, num_kv_heads=2, window=5)",
        2,
    ),
}


def _model(pattern: str, n_layers: int = 1) -> CausalLM:
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, pattern=pattern)
    torch.manual_seed(0)
    return CausalLM(config).double()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _states(state) -> dict[str, torch.Tensor]:
    """Every layer's state tensors (matrices, conv tails, KV caches, positions), by layer."""
    return {
        f"{i}.{n}": t.detach() for i, s in enumerate(state) for n, t in state_tensors(s).items()
    }


def single_process(pattern: str, n_layers: int):
    model = _model(pattern, n_layers)
    ids, targets = _batch()
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.logits.detach(), loss.detach(), grads, _states(out.state), model.state_dict()


def sharded_worker(rank: int, N: int, pattern: str, n_layers: int, weights: dict):
    model = _model(pattern, n_layers)
    model.load_state_dict(weights)
    split_sequence(model, None)  # the default group
    split_sequence(model, dist.group.WORLD)
    ids, targets = (local_slice(x, None) for x in _batch())
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), reduction="sum") / (B * T)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = p.grad
    return out.logits.detach(), total, grads, _states(out.state)


@pytest.mark.parametrize(
    ("name", "N"), [(name, 2) for name in PATTERNS] + [("gla*2,attn", 4), ("gdn,mamba2", 4)]
)
def test_model_matches_single_process(name, N):
    """Logits, loss and every parameter's gradient; the last rank's state is the model's state
    after the whole sequence (a decode can go on from it)."""
    pattern, n_layers = PATTERNS[name]
    logits, loss, grads, states, weights = single_process(pattern, n_layers)
    results = run_group(sharded_worker, N, pattern, n_layers, weights, timeout=300)
    torch.testing.assert_close(torch.cat([r[0] for r in results], 1), logits, **F64)
    for r, (_, loss_r, grads_r, _) in enumerate(results):
        torch.testing.assert_close(loss_r, loss, **F64)
        assert grads_r.keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(
                grads_r[n], grads[n], **F64, msg=lambda m, n=n, r=r: f"rank {r} d/d{n}: {m}"
            )
    last = results[-1][3]
    assert last.keys() == states.keys()
    for n in states:
        torch.testing.assert_close(last[n], states[n], **F64, msg=lambda m, n=n: f"{n}: {m}")


def test_split_sequence_names_the_mixers_it_cannot_split():
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, pattern="gla,lstm")
    with pytest.raises(ValueError, match="LSTM.*covers attn, gla, mamba2, deltanet, gdn"):
        split_sequence(CausalLM(config), object())


def test_a_split_mixer_takes_no_state():
    model = _model("gla(num_heads=2)")
    mixer = model.blocks[0].mixer
    mixer.sequence_group = object()  # refused before any communication
    with pytest.raises(ValueError, match="takes no state"):
        mixer(torch.zeros(1, 4, 32, dtype=torch.float64), mixer.init_state(1))
