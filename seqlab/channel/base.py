"""The one interface every channel mixer implements.

    y, aux_loss = mixer(x)   # x [B, T, D] → y [B, T, D]; aux_loss a 0-dim tensor

A channel mixer acts on each token alone, so it holds no state. `aux_loss` is what the trainer adds
to the task loss: zero for dense mixers, the load-balancing loss already multiplied by its
coefficient for MoE.

Initialisation follows seqlab.init_policy: every weight matrix is drawn from N(0, init_std²),
the output projection from N(0, out_init_std²) (init_std when unset), biases are zero. A mixer
does not know the depth of its model, so the model, which does, passes
out_init_std = init_std / √(2·n_layers) for GPT-2's residual scaling.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seqlab.config import check_positive_int
from seqlab.init_policy import InitOptions


class ChannelConfig(InitOptions):
    """Options shared by every channel mixer's config (each mixer subclasses it)."""


class ChannelMixer(nn.Module):
    """Subclasses set `Config`, take (d_model, config) and implement `forward`."""

    Config: ClassVar[type[ChannelConfig]] = ChannelConfig

    def __init__(self, d_model: int, config: ChannelConfig | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.config = self.Config.for_component(type(self), config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
