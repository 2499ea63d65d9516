"""DeltaNet (Yang et al. 2024): the delta rule with a learned write strength β.

    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,  β_t = sigmoid(W_β x_t)
    q, k, v through a short causal conv + SiLU; q, k L2-normalised; per-head RMSNorm on o.

`DeltaRuleMixer` is the shared body; Gated DeltaNet adds a decay through `log_decay`.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.dims import per_head
from seqlab.mixers.norm import GatedRMSNorm
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.ops import delta_rule
from seqlab.ops.delta_rule import delta_rule_flops
from seqlab.parallel.lasp2 import previous_tail, sequence_op


class DeltaRuleConfig(RecurrentConfig):
    """conv_size: width of the short conv on q, k, v; use_output_gate: o ⊙ swish(W_g x) after the
    norm; allow_neg_eigval: β ∈ (0, 2) instead of (0, 1)."""

    conv_size: PositiveInt = 4
    use_output_gate: bool = False
    allow_neg_eigval: bool = False

    def head_dims(self, d_model: int) -> tuple[int, int, int]:
        """(H, K, V): heads and key / value dims per head."""
        raise NotImplementedError


class DeltaNetConfig(DeltaRuleConfig):
    num_heads: PositiveInt = 4
    expand_k: PositiveFloat = 1.0
    expand_v: PositiveFloat = 1.0

    def head_dims(self, d_model: int) -> tuple[int, int, int]:
        H = self.num_heads
        K = per_head(d_model * self.expand_k, H, "d_model * expand_k")
        return H, K, per_head(d_model * self.expand_v, H, "d_model * expand_v")


class DeltaRuleMixer(RecurrentMixer):
    """State: S [B, H, K, V] and conv [B, conv_size − 1, H (2K + V)]."""

    Config = DeltaRuleConfig
    core_op = "delta_rule"
    sequence_parallel = True
    gated: ClassVar[bool] = False  # a log-decay (`log_decay`) on the state

    def __init__(self, d_model: int, config: DeltaRuleConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        H, self.head_k, self.head_v = c.head_dims(d_model)
        self.num_heads = H
        width = H * (2 * self.head_k + self.head_v)
        self.qkv_proj = nn.Linear(d_model, width, bias=False)
        self.conv = ShortConv(width, c.conv_size)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        if c.use_output_gate:
            self.g_proj = nn.Linear(d_model, H * self.head_v, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v, c.norm_eps)
        else:
            self.o_norm = nn.RMSNorm(self.head_v, eps=c.norm_eps)
        self.o_proj = nn.Linear(H * self.head_v, d_model, bias=False)

    def op_call(self) -> OpCall:
        c = self.config
        options = {"chunk_size": c.chunk_size}
        if c.allow_neg_eigval:
            options["allow_neg_eigval"] = True
        dims = {"K": self.head_k, "V": self.head_v}
        return OpCall("gated" if self.gated else "delta", self.num_heads, dims, options)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        width = self.num_heads * (2 * self.head_k + self.head_v)
        return {
            "S": (batch_size, self.num_heads, self.head_k, self.head_v),
            "conv": (batch_size, self.config.conv_size - 1, width),
        }

    def flops(self, T: int) -> LayerFlops:
        H, K, V, C = self.num_heads, self.head_k, self.head_v, self.config.chunk_size
        return LayerFlops(
            self.projection_flops(),
            delta_rule_flops(T, H, K, V, self.form(T), C, gated=self.gated),
            delta_rule_flops(1, H, K, V, "recurrent"),
        )

    def log_decay(self, x: Tensor) -> Tensor | None:
        """Log-decay g [B, T, H] of the state, or None (no decay)."""
        return None

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        H, K = self.num_heads, self.head_k
        group = self.sequence_split(state)
        qkv = self.qkv_proj(x)
        conv0 = None if state is None else state["conv"]
        if group is not None:  # the conv starts from the previous rank's last inputs
            conv0 = previous_tail(qkv, self.conv.width - 1, group=group)
        qkv, conv_state = self.conv(qkv, conv0)
        q, k, v = qkv.split([H * K, H * K, H * self.head_v], dim=-1)
        q, k, v = (rearrange(t, "b t (h d) -> b t h d", h=H) for t in (q, k, v))
        beta = self.b_proj(x).sigmoid()
        if self.config.allow_neg_eigval:
            beta = 2 * beta
        o, S = sequence_op(delta_rule, group)(
            F.normalize(q, dim=-1),
            F.normalize(k, dim=-1),
            v,
            beta,
            self.log_decay(x),
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            check_values=False,  # valid by construction; a check would sync
            allow_neg_eigval=self.config.allow_neg_eigval,
            form=self.form(x.shape[1]),
            chunk_size=self.config.chunk_size,
        )
        if self.config.use_output_gate:
            gate = rearrange(self.g_proj(x), "b t (h d) -> b t h d", h=H)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)")), {"S": S, "conv": conv_state}


class DeltaNet(DeltaRuleMixer):
    Config = DeltaNetConfig
    examples = {
        "deltanet": {"num_heads": 2, "chunk_size": 16},
        "deltanet_gate": {"num_heads": 2, "use_output_gate": True, "chunk_size": 16},
    }
