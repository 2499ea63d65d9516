"""The one interface every token mixer implements.

    y, state = mixer(x, state=None)      # x [B, T, D] → y [B, T, D]
    state = mixer.init_state(batch_size) # what a stream starts from
    mixer.state_bytes(state)             # bytes of the tensors the state really holds

A state is a dict of tensors. `forward` with T > 1 runs the parallel/chunk form (training, prefill);
with T = 1 and a state it runs the recurrent step (decode). Both return the state after x.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seqlab.config import Config, check_positive_int

State = dict[str, torch.Tensor]


class MixerConfig(Config):
    """Options shared by every token mixer's config (each mixer subclasses it)."""


class TokenMixer(nn.Module):
    """Subclasses set `Config`, take (d_model, config) and implement the three calls."""

    Config: ClassVar[type[MixerConfig]] = MixerConfig

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
