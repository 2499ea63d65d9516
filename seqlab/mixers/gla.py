"""Gated Linear Attention (GLA, Yang et al. 2024): a data-dependent decay per key channel.

S_t = diag(α_t) S_{t−1} + k_t v_tᵀ
log α_t = logsigmoid(W_2 W_1 x_t + b) / gate_logit_normalizer
y = W_o (RMSNorm_h(o) ⊙ swish(W_g x))
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.dims import per_head
from seqlab.mixers.norm import GatedRMSNorm
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.ops import gated_linear
from seqlab.parallel.lasp2 import sequence_op


class GLAConfig(RecurrentConfig):
    """gate_low_rank_dim: rank of the gate projection W_2 W_1; gate_logit_normalizer divides
    the log-decay, keeping α near 1 at init."""

    num_heads: PositiveInt = 4
    expand_k: PositiveFloat = 0.5
    expand_v: PositiveFloat = 1.0
    gate_low_rank_dim: PositiveInt = 16
    gate_logit_normalizer: PositiveFloat = 16.0


class GLA(RecurrentMixer):
    """State: S [B, H, K, V]."""

    Config = GLAConfig
    core_op = "gated_linear"
    sequence_parallel = True
    examples = {
        "gla": {"num_heads": 2, "chunk_size": 16},
        "gla_sub_chunks": {"num_heads": 2, "chunk_size": 32},
    }

    def __init__(self, d_model: int, config: GLAConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.num_heads = H = c.num_heads
        self.head_k = per_head(d_model * c.expand_k, H, "d_model * expand_k")
        self.head_v = per_head(d_model * c.expand_v, H, "d_model * expand_v")
        self.q_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.head_v, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, c.gate_low_rank_dim, bias=False),
            nn.Linear(c.gate_low_rank_dim, H * self.head_k, bias=True),
        )
        self.g_proj = nn.Linear(d_model, H * self.head_v, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v, c.norm_eps)
        self.o_proj = nn.Linear(H * self.head_v, d_model, bias=False)

    def flops(self, T: int) -> LayerFlops:
        K, V = self.head_k, self.head_v
        return LayerFlops(self.projection_flops(), *self.gated_linear_flops(T, K, V, "channel"))

    def core_bytes(self, T: int, grad: bool) -> int:
        """The chunk form's blocks, and the [c, c, K] sub-chunk blocks (c = 16) in float32."""
        extra = 2 * self.num_heads * 16 * self.head_k * 4
        return super().core_bytes(T, grad) + extra * (T if grad else min(T, 8192))

    def op_call(self) -> OpCall:
        dims = {"K": self.head_k, "V": self.head_v}
        return OpCall("channel", self.num_heads, dims, {"chunk_size": self.config.chunk_size})

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"S": (batch_size, self.num_heads, self.head_k, self.head_v)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        q, k, v, gk, gate = (
            rearrange(proj(x), "b t (h d) -> b t h d", h=self.num_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.gk_proj, self.g_proj)
        )
        o, S = sequence_op(gated_linear, self.sequence_split(state))(
            q,
            k,
            v,
            F.logsigmoid(gk) / self.config.gate_logit_normalizer,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            check_values=False,  # valid by construction; a check would sync
            form=self.form(x.shape[1]),
            chunk_size=self.config.chunk_size,
        )
        o = rearrange(self.o_norm(o, gate), "b t h d -> b t (h d)")
        return self.o_proj(o), {"S": S}
