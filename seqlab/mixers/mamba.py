"""Mamba-1 (Gu & Dao 2023): a selective state space (S6) on a gated, convolved expansion of x.

    x, z = in_proj(u);  x = silu(conv(x));  dt, B, C = x_proj(x)
    Δ = softplus(dt_proj(dt)),  y = selective_scan(x, Δ, A = −exp(A_log), B, C, D)
    out = out_proj(y ⊙ silu(z))

Every channel of d_inner = expand · d_model keeps d_state states with its own decays (S4D-real
init A = −(1, ..., N)); B, C and Δ are functions of the input.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer, init_dt_bias
from seqlab.ops.registry import Flops
from seqlab.ops.selective_scan import selective_scan, selective_scan_flops


class MambaConfig(RecurrentConfig):
    """d_inner = expand · d_model channels of d_state states; d_conv: width of the short conv on
    x; dt_rank: rank of the Δ projection ("auto": ⌈d_model / 16⌉); dt_min, dt_max, dt_init_floor:
    the range of the initial time steps (the paper's init)."""

    expand: PositiveInt = 2
    d_state: PositiveInt = 16
    d_conv: PositiveInt = 4
    dt_rank: PositiveInt | Literal["auto"] = "auto"
    dt_min: PositiveFloat = 1e-3
    dt_max: PositiveFloat = 1e-1
    dt_init_floor: PositiveFloat = 1e-4


class Mamba(RecurrentMixer):
    """State: h [B, d_inner, d_state] (float32) and conv [B, d_conv − 1, d_inner]."""

    Config = MambaConfig
    core_op: ClassVar[str] = "selective_scan"
    matrices: ClassVar[tuple[str, ...]] = ("h",)
    examples: ClassVar[dict] = {
        "mamba": {"d_state": 8, "chunk_size": 16},
        "mamba_rank4": {"d_state": 4, "dt_rank": 4, "expand": 1, "chunk_size": 8},
    }

    output_proj = "out_proj"
    paper_init = ("dt_proj",)  # Δ: uniform ±dt_rank^-1/2 weights, log-uniform Δ bias

    def __init__(self, d_model: int, config: MambaConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.d_inner = E = c.expand * d_model
        self.dt_rank = R = math.ceil(d_model / 16) if c.dt_rank == "auto" else c.dt_rank
        N = c.d_state
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)  # x, z
        self.conv = ShortConv(E, c.d_conv, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # dt, B, C
        self.dt_proj = nn.Linear(R, E, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(E, c.dt_min, c.dt_max, c.dt_init_floor))
        self.A_log = nn.Parameter(torch.arange(1, N + 1, dtype=torch.float32).log().repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

    @staticmethod
    def form(T: int) -> str:
        """One token is a decode step (the recurrent form); longer inputs run the fused scan."""
        return "recurrent" if T == 1 else "scan"

    def core_bytes(self, T: int, grad: bool) -> int:
        """The scan form's decay factors and states, [T, d_inner, d_state] each in float32 (kept
        for backward with `grad`, formed whole without it too)."""
        return 2 * T * self.d_inner * self.config.d_state * 4

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {
            "h": (batch_size, self.d_inner, c.d_state),
            "conv": (batch_size, c.d_conv - 1, self.d_inner),
        }

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        T, N, R = x.shape[1], self.config.d_state, self.dt_rank
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = self.conv(xs, None if state is None else state["conv"])
        dt, B, C = self.x_proj(xs).split([R, N, N], dim=-1)
        y, h = selective_scan(
            xs,
            F.linear(dt, self.dt_proj.weight),  # the bias goes in as delta_bias
            -self.A_log.exp(),
            B,
            C,
            self.D,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            initial_state=None if state is None else state["h"],
            output_final_state=True,
            form=self.form(T),
        )
        return self.out_proj(y * F.silu(z)), {"h": h, "conv": conv_state}

    def flops(self, T: int) -> LayerFlops:
        c, E, R = self.config, self.d_inner, self.dt_rank
        proj = 2 * self.d_model * 2 * E + 2 * E * (R + 2 * c.d_state) + 2 * R * E
        proj += 2 * E * self.d_model + 2 * c.d_conv * E  # out_proj, the depthwise conv
        dims = {"D": E, "N": c.d_state}
        prefill = selective_scan_flops("default", self.form(T), T, 1, **dims)
        decode = selective_scan_flops("default", "recurrent", 1, 1, **dims)
        return LayerFlops(Flops(proj, 0), prefill, decode)

    def op_call(self) -> OpCall:
        c = self.config
        return OpCall("default", 1, {"D": self.d_inner, "N": c.d_state}, {})
