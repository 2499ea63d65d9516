"""Multi-scale retention (RetNet, Sun et al. 2023): a fixed decay per head.

    S_t = γ_h S_{t−1} + k_t v_tᵀ,  γ_h = 1 − 2^(−5−h);  y = W_o (swish(W_g x) ⊙ GroupNorm_h(o))

RoPE on q and k stands in for the paper's xPos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.dims import per_head
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.mixers.rope import positions, rotate, start_positions
from seqlab.ops import gated_linear


class RetNetConfig(RecurrentConfig):
    """expand_v = 2: the value heads are twice the key heads, as in the paper."""

    num_heads: PositiveInt = 8
    expand_k: PositiveFloat = 1.0
    expand_v: PositiveFloat = 2.0
    rope: bool = True
    rope_base: PositiveFloat = 10000.0


class RetNet(RecurrentMixer):
    """State: S [B, H, K, V], and pos [B] (the next position) when `rope`."""

    Config = RetNetConfig
    core_op = "gated_linear"
    examples = {"retnet": {"num_heads": 2, "chunk_size": 16}}

    def __init__(self, d_model: int, config: RetNetConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.num_heads = H = c.num_heads
        self.head_k = per_head(d_model * c.expand_k, H, "d_model * expand_k")
        self.head_v = per_head(d_model * c.expand_v, H, "d_model * expand_v")
        if c.rope and self.head_k % 2:
            raise ValueError(f"RoPE needs an even key head dim, got {self.head_k}")
        self.q_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.head_v, bias=False)
        self.g_proj = nn.Linear(d_model, H * self.head_v, bias=False)
        self.group_norm = nn.GroupNorm(H, H * self.head_v, eps=c.norm_eps)
        self.o_proj = nn.Linear(H * self.head_v, d_model, bias=False)

    def flops(self, T: int) -> LayerFlops:
        return LayerFlops(
            self.projection_flops(), *self.gated_linear_flops(T, self.head_k, self.head_v, "head")
        )

    def op_call(self) -> OpCall:
        dims = {"K": self.head_k, "V": self.head_v}
        return OpCall("head", self.num_heads, dims, {"chunk_size": self.config.chunk_size})

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"S": (batch_size, self.num_heads, self.head_k, self.head_v)}

    def init_state(self, batch_size: int) -> State:
        state = super().init_state(batch_size)
        if self.config.rope:
            state["pos"] = start_positions(batch_size, state["S"].device)
        return state

    def log_decay(self, dtype: torch.dtype) -> Tensor:
        """[H] log γ_h = log(1 − 2^(−5−h)), formed in float64: 1 − 2^(−12) is 1 in bfloat16."""
        h = torch.arange(self.num_heads, dtype=torch.float64, device=self.q_proj.weight.device)
        return torch.log1p(-(2.0 ** (-5 - h))).to(dtype)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B, T, _ = x.shape
        q, k = (
            rearrange(proj(x), "b t (h d) -> b t h d", h=self.num_heads)
            for proj in (self.q_proj, self.k_proj)
        )
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", h=self.num_heads)
        new_state = {}
        if self.config.rope:
            start = start_positions(B, x.device) if state is None else state["pos"]
            pos = positions(start, T)
            q, k = rotate(q, pos, self.config.rope_base), rotate(k, pos, self.config.rope_base)
            new_state["pos"] = start + T
        g = self.log_decay(q.dtype).expand(B, T, self.num_heads)
        o, new_state["S"] = gated_linear(
            q,
            k,
            v,
            g,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            check_values=False,  # valid by construction; a check would sync
            form=self.form(T),
            chunk_size=self.config.chunk_size,
        )
        o = self.group_norm(o.flatten(0, 1).flatten(1))  # [B·T, H·V]: per-head GroupNorm
        o = F.silu(self.g_proj(x)) * o.unflatten(0, (B, T))
        return self.o_proj(o), new_state
