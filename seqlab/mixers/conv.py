"""Causal depthwise short convolution over time, with SiLU, that streams through its state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Module):
    """y_t = silu(Σ_i w_i x_{t−W+1+i} + b) per channel; the state is the last W − 1 inputs.

    The same code runs a whole sequence and a single decode step: the state is prepended to x.
    """

    def __init__(self, channels: int, width: int = 4, bias: bool = False):
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, bias=bias)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, C], state [B, W − 1, C] (zeros when None) → y [B, T, C], state after x.

        The state returned is a copy, not a view of [state | x]: a view would keep the whole
        input alive (O(T) memory) for as long as the state is held."""
        B, T, C = x.shape
        if T == 0:
            raise ValueError("the sequence is empty: x has T = 0 time steps")
        expected = (B, self.width - 1, C)
        if state is None:
            state = x.new_zeros(expected)
        elif tuple(state.shape) != expected:
            raise ValueError(
                f"the conv state has shape {tuple(state.shape)}, expected [B, W − 1, C] = "
                f"{list(expected)} (batch size {B}, conv width {self.width}, {C} channels)"
            )
        xs = torch.cat([state, x], dim=1)  # [B, W − 1 + T, C]
        y = self.conv(xs.transpose(1, 2)).transpose(1, 2)
        return F.silu(y), xs[:, xs.shape[1] - (self.width - 1) :].clone()
