"""Mamba-2 (SSD, Dao & Gu 2024) as a scalar-gated linear recurrence, one group of B, C.

h_t = exp(A dt_t) h_{t−1} + B_t (dt_t x_t)ᵀ,   y_t = h_tᵀ C_t + D x_t
i.e. gated_linear with q = C, k = B, v = dt · x, g = A · dt and scale 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.norm import GatedRMSNorm
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer, init_a_log, init_dt_bias
from seqlab.ops import gated_linear
from seqlab.parallel.lasp2 import previous_tail, sequence_op


class Mamba2Config(RecurrentConfig):
    """d_inner = expand · d_model channels in heads of head_dim; d_state: size of B and C;
    d_conv: width of the short conv on x, B, C."""

    expand: PositiveInt = 2
    head_dim: PositiveInt = 64
    d_state: PositiveInt = 128
    d_conv: PositiveInt = 4


class Mamba2(RecurrentMixer):
    """State: S [B, H, N, P] (N = d_state, P = head_dim) and conv [B, d_conv − 1, d_inner + 2N]."""

    Config = Mamba2Config
    core_op = "gated_linear"
    sequence_parallel = True
    examples = {"mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 16}}

    output_proj = "out_proj"

    def __init__(self, d_model: int, config: Mamba2Config | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.d_inner = c.expand * d_model
        if self.d_inner % c.head_dim:
            raise ValueError(
                f"d_model * expand = {self.d_inner} must be a whole multiple of "
                f"head_dim = {c.head_dim}"
            )
        self.num_heads = H = self.d_inner // c.head_dim
        conv_width = self.d_inner + 2 * c.d_state  # x, B, C
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_width + H, bias=False)  # z, xBC, dt
        self.conv = ShortConv(conv_width, c.d_conv, bias=True)
        self.dt_bias = nn.Parameter(init_dt_bias(H))
        self.A_log = nn.Parameter(init_a_log(H, 1.0, 16.0))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_inner, c.norm_eps, norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def flops(self, T: int) -> LayerFlops:
        c = self.config
        core = self.gated_linear_flops(T, c.d_state, c.head_dim, "head")
        return LayerFlops(self.projection_flops(), *core)

    def op_call(self) -> OpCall:
        c = self.config
        dims = {"K": c.d_state, "V": c.head_dim}
        return OpCall("head", self.num_heads, dims, {"scale": 1.0, "chunk_size": c.chunk_size})

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {
            "S": (batch_size, self.num_heads, c.d_state, c.head_dim),
            "conv": (batch_size, c.d_conv - 1, self.d_inner + 2 * c.d_state),
        }

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        T, N, H = x.shape[1], self.config.d_state, self.num_heads
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        group = self.sequence_split(state)
        conv0 = None if state is None else state["conv"]
        if group is not None:  # the conv starts from the previous rank's last inputs
            conv0 = previous_tail(xBC, self.conv.width - 1, group=group)
        xBC, conv_state = self.conv(xBC, conv0)
        xs, B, C = xBC.split([self.d_inner, N, N], dim=-1)
        xs = rearrange(xs, "b t (h p) -> b t h p", h=H)
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        # every head reads the same B and C (one group)
        k, q = (repeat(m, "b t n -> b t h n", h=H) for m in (B, C))
        y, S = sequence_op(gated_linear, group)(
            q,
            k,
            xs * dt[..., None],
            -self.A_log.exp() * dt,
            scale=1.0,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            check_values=False,  # valid by construction; a check would sync
            form=self.form(T),
            chunk_size=self.config.chunk_size,
        )
        y = y + xs * self.D[:, None]
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)
        return self.out_proj(y), {"S": S, "conv": conv_state}
