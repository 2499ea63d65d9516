"""Rotary position embedding at absolute positions; a stream keeps the next one in its state."""

from __future__ import annotations

import torch
from torch import Tensor


def start_positions(batch_size: int, device: torch.device) -> Tensor:
    """[B] int64 zeros: the position of each row's next token."""
    return torch.zeros(batch_size, dtype=torch.int64, device=device)


def positions(start: Tensor, T: int) -> Tensor:
    """start [B] → the positions [B, T] of the next T tokens."""
    return start[:, None] + torch.arange(T, device=start.device)


def rotate(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """x [B, T, H, D] with channel pairs (i, i + D/2) rotated by pos · base^(−2i/D), pos [B, T].

    Angles are formed in float32 (float64 for float64 x), so a position gets the same rotation
    whether it comes in a long prefill or a one-token decode step.
    """
    D = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)  # [D/2]
    angles = (pos.to(dtype)[..., None] * inv_freq)[:, :, None]  # [B, T, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
