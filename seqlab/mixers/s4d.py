"""S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
Models"): the standalone block, one diagonal complex SSM per channel over d_model channels.

y = GLU(W (GELU(SSM(x) + D x)))
The SSM is seqlab.ops.lti's s4d op: the FFT form for a sequence, the recurrent step for one token.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State, TokenMixer
from seqlab.ops.lti import s4d_fft, s4d_flops, s4d_recurrent
from seqlab.ops.registry import Flops


class S4DConfig(MixerConfig):
    """d_state: N (N/2 complex modes per channel); init: "lin" (A_n = −1/2 + iπn) or "inv"
    (A_n = −1/2 + i N/π (N/(2n+1) − 1)); Δ log-uniform in [dt_min, dt_max]."""

    d_state: PositiveInt = 64
    init: Literal["lin", "inv"] = "lin"
    dt_min: PositiveFloat = 1e-3
    dt_max: PositiveFloat = 1e-1


def s4d_a_imag(N: int, init: str) -> Tensor:
    """[N/2] imaginary parts of A for S4D-Lin or S4D-Inv."""
    n = torch.arange(N // 2, dtype=torch.float64)
    if init == "lin":
        return math.pi * n
    return N / math.pi * (N / (2 * n + 1) - 1)


class S4D(TokenMixer):
    """State: h [B, d_model, d_state/2, 2], the complex modes as real pairs (float32; float64
    with float64 parameters)."""

    Config = S4DConfig
    core_op: ClassVar[str] = "s4d"
    matrices: ClassVar[tuple[str, ...]] = ("h",)
    examples: ClassVar[dict] = {
        "s4d": {"d_state": 8},
        "s4d_inv": {"d_state": 8, "init": "inv"},
    }

    output_proj = "out_proj"

    def __init__(self, d_model: int, config: S4DConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        if c.d_state < 2 or c.d_state % 2:
            raise ValueError(f"d_state must be an even number ≥ 2, got {c.d_state}")
        if c.dt_min > c.dt_max:
            raise ValueError(f"dt_min = {c.dt_min} must not exceed dt_max = {c.dt_max}")
        H, N2 = d_model, c.d_state // 2
        lo, hi = math.log(c.dt_min), math.log(c.dt_max)
        self.log_dt = nn.Parameter(torch.rand(H) * (hi - lo) + lo)
        self.A_log_re = nn.Parameter(torch.full((H, N2), math.log(0.5)))  # A_re = −exp(·)
        self.A_im = nn.Parameter(s4d_a_imag(c.d_state, c.init).float().expand(H, N2).clone())
        B = torch.zeros(H, N2, 2)
        B[..., 0] = 1.0
        self.B = nn.Parameter(B)
        self.C = nn.Parameter(torch.randn(H, N2, 2) * 0.5**0.5)
        self.D = nn.Parameter(torch.randn(H))
        self.out_proj = nn.Linear(d_model, 2 * d_model)

    def init_state(self, batch_size: int) -> State:
        p = self.C
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        N2 = self.config.d_state // 2
        return {"h": torch.zeros(batch_size, self.d_model, N2, 2, dtype=dtype, device=p.device)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        form = s4d_recurrent if x.shape[1] == 1 else s4d_fft
        y, h = form(
            x,
            self.log_dt,
            -self.A_log_re.exp(),
            self.A_im,
            self.B,
            self.C,
            self.D,
            initial_state=None if state is None else state["h"],
            output_final_state=True,
        )
        y = F.glu(self.out_proj(F.gelu(y)), dim=-1)
        return y, {"h": h}

    def flops(self, T: int) -> LayerFlops:
        D, N = self.d_model, self.config.d_state
        per_token = Flops(2 * D * 2 * D, 10 * D)  # output Linear; GELU, GLU
        form = "recurrent" if T == 1 else "fft"
        prefill = s4d_flops("default", form, T, D, N=N)
        decode = s4d_flops("default", "recurrent", 1, D, N=N)
        return LayerFlops(per_token, prefill, decode)

    def op_call(self) -> OpCall:
        return OpCall("default", self.d_model, {"N": self.config.d_state}, {})
