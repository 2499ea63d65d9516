"""The one interface every token mixer implements.

    y, state = mixer(x, state=None)      # x [B, T, D] → y [B, T, D]
    state = mixer.init_state(batch_size) # what a stream starts from
    mixer.state_bytes(state)             # bytes of the tensors the state really holds

A state is a dict of tensors. `forward` with T > 1 runs the parallel/chunk form (training, prefill);
with T = 1 and a state it runs the recurrent step (decode). Both return the state after x.

What the shared suites (tests/mixers, seqlab.profile) read from a mixer, declared on its class:
`core_op` (the op family in seqlab.ops.registry that forward runs), `state_grows` (its state
grows with T: a KV cache, a cache of inputs), `examples` (small option sets, by id, that the
conformance suite builds at d_model 32), `flops(T)` (its FLOPs per token and in the core op) and
`op_call()` (how the op level of `seqlab bench` calls its core op). Parameters are counted from
the module itself.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from seqlab.config import Config, check_positive_int
from seqlab.ops.registry import Flops

State = dict[str, torch.Tensor]


class LayerFlops(NamedTuple):
    """FLOPs of one mixer on one sequence (seqlab.ops.registry.Flops)."""

    per_token: Flops  # projections, short convs, feature maps: the same for every token
    prefill: Flops  # the core op over T tokens, in the form forward runs for them
    decode: Flops  # the core op's step for one more token at context T


class OpCall(NamedTuple):
    """The core op as this mixer calls it: family variant, heads, per-head dims, and options
    passed to the forms (chunk_size, window, scale, ...)."""

    variant: str
    H: int
    dims: dict[str, int]
    options: dict[str, Any]


class MixerConfig(Config):
    """Options shared by every token mixer's config (each mixer subclasses it)."""


class TokenMixer(nn.Module):
    """Subclasses set `Config`, take (d_model, config) and implement the three calls."""

    Config: ClassVar[type[MixerConfig]] = MixerConfig
    core_op: ClassVar[str]
    state_grows: ClassVar[bool] = False
    examples: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, d_model: int, config: MixerConfig | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.config = self.Config.for_component(type(self), config)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def init_state(self, batch_size: int) -> State:
        raise NotImplementedError

    @staticmethod
    def state_bytes(state: State) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    def state_bytes_for(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the state after `seq_len` tokens. Mixers whose state grows override this."""
        return self.state_bytes(self.init_state(batch_size))

    def flops(self, T: int) -> LayerFlops:
        raise NotImplementedError(f"{type(self).__name__} declares no flops(T)")

    def projection_flops(self) -> Flops:
        """Per token: 2 FLOPs per weight of every Linear and Conv1d in the mixer (a projection,
        a depthwise short conv); bias adds are not counted."""
        kinds = (nn.Linear, nn.Conv1d)
        return Flops(2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, kinds)))

    def op_call(self) -> OpCall:
        raise NotImplementedError(f"{type(self).__name__} declares no op_call()")

    def core_bytes(self, T: int, grad: bool) -> int:
        """Bytes the core op holds at once beyond its inputs on one sequence of T tokens (kept
        for the backward pass with `grad`): a coarse bound for `seqlab bench`'s memory guard."""
        return 0
