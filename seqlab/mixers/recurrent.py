"""What the recurrent mixers share: the chunk-size option, the state layout, and decay inits.

A recurrent state holds matrices S [B, H, K, V] (float32; float64 with float64 parameters) and
short-conv tails [B, W − 1, C] (the parameters' dtype); its size does not depend on T.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import PositiveInt
from torch import Tensor

from seqlab.mixers.base import MixerConfig, State, TokenMixer
from seqlab.ops.gated_linear import gated_linear_flops
from seqlab.ops.registry import Flops


class RecurrentConfig(MixerConfig):
    """chunk_size: tokens per chunk of the chunkwise-parallel form (speed only, not the result)."""

    chunk_size: PositiveInt = 64


class RecurrentMixer(TokenMixer):
    """Subclasses list their state tensors in `state_shapes`; names in `matrices` are recurrent
    matrices, the others conv tails."""

    Config: ClassVar[type[RecurrentConfig]] = RecurrentConfig
    matrices: ClassVar[tuple[str, ...]] = ("S",)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init_state(self, batch_size: int) -> State:
        p = next(self.parameters())
        matrix_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        return {
            name: torch.zeros(
                shape, dtype=matrix_dtype if name in self.matrices else p.dtype, device=p.device
            )
            for name, shape in self.state_shapes(batch_size).items()
        }

    @staticmethod
    def form(T: int) -> str:
        """One token is a decode step (the recurrent form); longer inputs run chunkwise."""
        return "recurrent" if T == 1 else "chunk"

    def gated_linear_flops(self, T: int, K: int, V: int, gate: str) -> tuple[Flops, Flops]:
        """(prefill over T tokens, one decode step) of the gated_linear core op."""
        H, C = self.num_heads, self.config.chunk_size
        return (
            gated_linear_flops(T, H, K, V, gate, self.form(T), C),
            gated_linear_flops(1, H, K, V, gate, "recurrent"),
        )

    def core_bytes(self, T: int, grad: bool) -> int:
        """The [C, C] blocks of a chunk form in float32: A, decays, the solve's blocks, their
        float32 copies (kept for backward with `grad`, else formed a slice at a time)."""
        per_token = 6 * self.num_heads * self.config.chunk_size * 4
        return per_token * (T if grad else min(T, 8192))


def init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> Tensor:
    """[n] biases b with softplus(b) log-uniform in [dt_min, dt_max] (Mamba-2's time-step init)."""
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)


def init_a_log(n: int, low: float, high: float) -> Tensor:
    """[n] values log(A) with A ~ uniform(low, high); the decay rate is −exp(A_log) · dt."""
    return torch.empty(n).uniform_(low, high).log()
