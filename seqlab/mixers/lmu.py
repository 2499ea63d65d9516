"""LMU (Voelker et al. 2019) in the LMUFormer style (Liu et al. 2024): a linear Legendre memory
over projected inputs, read out together with the input.

u = W_u x [d_u channels];  m_t = Ā m_{t−1} + B̄ u_t (per channel, order d, window θ);
y = GELU(W_o [m, x])
The memory is seqlab.ops.lti's lmu op: the FFT form for a sequence, the recurrent step for one
token. Ā, B̄ are fixed (ZOH of the Legendre delay system, not trained).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State, TokenMixer
from seqlab.ops.lti import lmu_fft, lmu_flops, lmu_matrices, lmu_recurrent
from seqlab.ops.registry import Flops


class LMUConfig(MixerConfig):
    """d_u: memory input channels; order: Legendre order d of each channel's memory; theta: the
    window it remembers, in tokens."""

    d_u: PositiveInt = 16
    order: PositiveInt = 16
    theta: PositiveFloat = 256.0


class LMU(TokenMixer):
    """State: m [B, d_u, order] (float32; float64 with float64 parameters)."""

    Config = LMUConfig
    core_op: ClassVar[str] = "lmu"
    matrices: ClassVar[tuple[str, ...]] = ("m",)
    examples: ClassVar[dict] = {"lmu": {"d_u": 4, "order": 8, "theta": 32.0}}

    output_proj = "out_proj"

    def __init__(self, d_model: int, config: LMUConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self._ab = lmu_matrices(c.order, c.theta)  # float64, cast per call (not a buffer)
        self.in_proj = nn.Linear(d_model, c.d_u)
        self.out_proj = nn.Linear(c.d_u * c.order + d_model, d_model)

    def matrices_for(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Ā, B̄ on `like`'s device in float64 for float64 parameters, else float32: formed in
        float64 once, so a model cast to bfloat16 keeps them exact to float32."""
        dtype = torch.float64 if self.in_proj.weight.dtype == torch.float64 else torch.float32
        return tuple(t.to(like.device, dtype) for t in self._ab)

    def init_state(self, batch_size: int) -> State:
        p = self.in_proj.weight
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        c = self.config
        return {"m": torch.zeros(batch_size, c.d_u, c.order, dtype=dtype, device=p.device)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        form = lmu_recurrent if x.shape[1] == 1 else lmu_fft
        u = self.in_proj(x)
        Abar, Bbar = self.matrices_for(u)
        m, S = form(
            u,
            Abar,
            Bbar,
            initial_state=None if state is None else state["m"],
            output_final_state=True,
        )
        y = F.gelu(self.out_proj(torch.cat([m.flatten(2), x], dim=-1)))
        return y, {"m": S}

    def flops(self, T: int) -> LayerFlops:
        c, D = self.config, self.d_model
        matmul = 2 * D * c.d_u + 2 * (c.d_u * c.order + D) * D
        per_token = Flops(matmul, 8 * D)  # projections; GELU
        form = "recurrent" if T == 1 else "fft"
        prefill = lmu_flops("default", form, T, c.d_u, d=c.order)
        decode = lmu_flops("default", "recurrent", 1, c.d_u, d=c.order)
        return LayerFlops(per_token, prefill, decode)

    def op_call(self) -> OpCall:
        c = self.config
        return OpCall("default", c.d_u, {"d": c.order}, {})
