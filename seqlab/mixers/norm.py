"""Output norms of the recurrent mixers (per-head RMSNorm is `nn.RMSNorm` over the head dim); eps
is the mixer's `config.norm_eps`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) · silu(z) (GLA, Gated DeltaNet), or RMSNorm(x · silu(z)) with
    `norm_before_gate=False` (Mamba-2); over the last dim."""

    def __init__(self, dim: int, eps: float, norm_before_gate: bool = True):
        super().__init__()
        self.norm_before_gate = norm_before_gate
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if self.norm_before_gate:
            return self.norm(x) * F.silu(z)
        return self.norm(x * F.silu(z))
