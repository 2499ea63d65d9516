"""xLSTM's sLSTM layer (Beck et al. 2024): exponential gating with a stabiliser and a normaliser,
memory mixing by block-diagonal recurrent weights (one block per head).

    u = silu(conv(x))                          (the optional causal conv, as in the paper)
    ĩ, f̃ = if_proj(u),  z̃, õ = zo_proj(x)      (the 4 gate pre-activations W x_t)
    h = slstm(ĩ, f̃, z̃, õ; R, b)                 (seqlab.ops.slstm: + R h_{t−1} + b, per head)
    y = o_proj(GroupNorm_heads(h))

as the xlstm package's sLSTMLayer, with dense gate projections (the package's are block-diagonal,
one block per head: a special case) and an output projection into the residual stream (the
package's sLSTM block has none; its post-up-projection MLP is a channel mixer here). The
recurrence is the "slstm" op family: the fused form for a sequence, the recurrent step for one
token; state h, c, n, m per unit.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.recurrent import RecurrentMixer
from seqlab.ops.registry import Flops
from seqlab.ops.slstm import slstm, slstm_flops, slstm_workspace_bytes


class SLSTMConfig(MixerConfig):
    """num_heads: heads of d_model / num_heads units, each with its own recurrent block;
    conv_width: width of the causal conv feeding the i and f gates (0: none, the gates read x);
    forget: "sigmoid" (the package's) or "exp" (the paper's exponential forget gate);
    recurrent_init: "zeros" (the package's default) or "standard" (uniform ±d_model^-1/2)."""

    num_heads: PositiveInt = 4
    conv_width: NonNegativeInt = 4
    forget: Literal["sigmoid", "exp"] = "sigmoid"
    recurrent_init: Literal["zeros", "standard"] = "zeros"


def forget_bias_init(head_dim: int) -> Tensor:
    """[head_dim] forget-gate biases: the xlstm package's "powerlaw_blockdependent" ramp for its
    first block, 5 − 12 (k / (head_dim − 1))^0.3, from 5 (keep) down to −7 (forget)."""
    ramp = torch.arange(head_dim, dtype=torch.float64) / max(head_dim - 1, 1)
    return (5.0 - 12.0 * ramp**0.3).float()


class SLSTM(RecurrentMixer):
    """State: h, c, n, m [B, H, head_dim] (float32; float64 with float64 parameters) and, with a
    conv, conv [B, conv_width − 1, d_model]. Zeros are the empty history (n = 0)."""

    Config = SLSTMConfig
    core_op: ClassVar[str] = "slstm"
    matrices: ClassVar[tuple[str, ...]] = ("h", "c", "n", "m")
    examples: ClassVar[dict] = {
        "slstm": {"num_heads": 1, "recurrent_init": "standard"},
        "slstm_heads": {"num_heads": 4, "recurrent_init": "standard"},
        "slstm_exp_noconv": {"num_heads": 2, "conv_width": 0, "forget": "exp"},
    }

    def __init__(self, d_model: int, config: SLSTMConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        H = c.num_heads
        if d_model % H:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {H}")
        if c.conv_width == 1:
            raise ValueError("conv_width must be 0 (no conv) or at least 2, got 1")
        self.num_heads, self.head_dim = H, D = H, d_model // H
        self.conv = ShortConv(d_model, c.conv_width, bias=True) if c.conv_width else None
        self.if_proj = nn.Linear(d_model, 2 * d_model, bias=False)  # ĩ, f̃ (from the conv)
        self.zo_proj = nn.Linear(d_model, 2 * d_model, bias=False)  # z̃, õ (from x)
        # R[h, k, g, j]: unit k of h_{t−1} to gate g (i, f, z, o) of unit j, head h
        self.R = nn.Parameter(torch.zeros(H, D, 4, D))
        if c.recurrent_init == "standard":
            nn.init.uniform_(self.R, -(d_model**-0.5), d_model**-0.5)
        self.b = nn.Parameter(torch.zeros(H, 4, D))
        with torch.no_grad():
            self.b[:, 1] = forget_bias_init(D)
        self.norm = nn.GroupNorm(H, d_model, eps=c.norm_eps)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    @staticmethod
    def form(T: int) -> str:
        """One token is a decode step (the recurrent form); longer inputs run the fused loop."""
        return "recurrent" if T == 1 else "fused"

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        shapes = {k: (batch_size, self.num_heads, self.head_dim) for k in self.matrices}
        if self.conv is not None:
            shapes["conv"] = (batch_size, self.config.conv_width - 1, self.d_model)
        return shapes

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        Bsz, T, d = x.shape
        u, conv_state = x, None
        if self.conv is not None:
            u, conv_state = self.conv(x, None if state is None else state["conv"])
        pre = torch.cat([self.if_proj(u), self.zo_proj(x)], dim=-1)
        S0 = None if state is None else torch.stack([state[k] for k in self.matrices], dim=1)
        h, S = slstm(
            pre.view(Bsz, T, 4, self.num_heads, self.head_dim),
            self.R,
            self.b,
            forget=self.config.forget,
            initial_state=S0,
            output_final_state=True,
            form=self.form(T),
        )
        y = self.norm(h.reshape(Bsz * T, d)).view(Bsz, T, d)  # per-head GroupNorm
        new_state = dict(zip(self.matrices, S.unbind(1), strict=True))
        if conv_state is not None:
            new_state["conv"] = conv_state
        return self.o_proj(y), new_state

    def flops(self, T: int) -> LayerFlops:
        """Per token: the projections and the conv (matmul), SiLU and the GroupNorm (about 4 and
        8 per channel); the core op as seqlab.ops.slstm counts it."""
        H, D, d = self.num_heads, self.head_dim, self.d_model
        other = 8 * d + (4 * d if self.conv is not None else 0)
        per_token = self.projection_flops() + Flops(0, other)
        prefill = slstm_flops(self.config.forget, self.form(T), T, H, D=D)
        decode = slstm_flops(self.config.forget, "recurrent", 1, H, D=D)
        return LayerFlops(per_token, prefill, decode)

    def op_call(self) -> OpCall:
        return OpCall(self.config.forget, self.num_heads, {"D": self.head_dim}, {})

    def core_bytes(self, T: int, grad: bool) -> int:
        """The fused form's time-major buffers (seqlab.ops.slstm.slstm_workspace_bytes)."""
        form = self.form(T)
        return slstm_workspace_bytes(
            self.config.forget, form, T, self.num_heads, grad, self.head_dim
        )
