"""Dense channel mixers: the GELU MLP of GPT-2 and the SwiGLU of LLaMA (Shazeer 2020).

    mlp:    y = W_out · GELU(W_in · x)              hidden H = expand · D
    swiglu: y = W_out · (SiLU(W_g · x) ⊙ (W_u · x))  hidden H = ⌈round(8/3 · D)⌉ to multiple_of

SwiGLU's 8/3 keeps its three matrices at the parameter count of a 4·D GELU MLP's two. W_g and W_u
are one fused [2H, D] matrix, gate rows first. Both return a zero aux loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from seqlab.channel.base import ChannelConfig, ChannelMixer
from seqlab.init_policy import init_linear


def swiglu_hidden(d_model: int, multiple_of: int) -> int:
    """round(8/3 · d_model) rounded up to a multiple of `multiple_of` (matmul-friendly widths)."""
    return multiple_of * math.ceil(round(8 * d_model / 3) / multiple_of)


class MLPConfig(ChannelConfig):
    expand: PositiveInt = 4
    bias: bool = False


class MLP(ChannelMixer):
    Config = MLPConfig
    config: MLPConfig

    def __init__(self, d_model: int, config: MLPConfig | None = None):
        super().__init__(d_model, config)
        self.hidden = self.config.expand * d_model
        self.w_in = nn.Linear(d_model, self.hidden, bias=self.config.bias)
        self.w_out = nn.Linear(self.hidden, d_model, bias=self.config.bias)
        init_linear(self.w_in, self.config.init_std)
        init_linear(self.w_out, self.config.output_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_out(F.gelu(self.w_in(x))), x.new_zeros(())


class SwiGLUConfig(ChannelConfig):
    # An explicit hidden is used as given; multiple_of only shapes the default.
    hidden: PositiveInt | None = None
    multiple_of: PositiveInt = 16
    bias: bool = False


class SwiGLU(ChannelMixer):
    Config = SwiGLUConfig
    config: SwiGLUConfig

    def __init__(self, d_model: int, config: SwiGLUConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.hidden = c.hidden or swiglu_hidden(d_model, c.multiple_of)
        self.w_in = nn.Linear(d_model, 2 * self.hidden, bias=c.bias)  # gate and up, fused
        self.w_out = nn.Linear(self.hidden, d_model, bias=c.bias)
        init_linear(self.w_in, c.init_std)
        init_linear(self.w_out, c.output_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.w_in(x).chunk(2, dim=-1)  # each [B, T, H]
        return self.w_out(F.silu(gate) * up), x.new_zeros(())
