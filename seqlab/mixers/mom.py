"""Mixture-of-Memories (Du et al. 2025): a router sends each token to the top-k of M gated
delta-rule memories; a shared memory sees every token.

For each memory m (with its own key, value, β and decay projections) and the shared memory s:

    S^m_t = α^m_t (I − β^m_t k^m_t k^mᵀ_t) S^m_{t−1} + β^m_t k^m_t v^mᵀ_t   if t is routed to m
    S^m_t = S^m_{t−1}                                                     otherwise
    o_t = Σ_{m ∈ topk(t)} w_{t,m} · S^mᵀ_t q_t + S^sᵀ_t q_t,   w_t,m = router probabilities
renormalised over the top-k

with one query projection for all memories. A memory that a token is not routed to takes β = 0
and log-decay 0 for it, which leaves its state exactly unchanged (I − 0·kkᵀ = I, exp(0) = 1), so
all M + 1 memories run as M + 1 groups of heads of one `delta_rule` call, over every token,
with no gather, no scatter and no host read of the routing (a reference test runs each memory
over only its own tokens and finds the same outputs and states). The price is work for M + 1
memories per token instead of k + 1 (a gathering implementation, as in the paper's kernels,
saves it at the cost of variable-length batches); the FLOPs below count what runs.

The router has no load-balancing loss: a token mixer returns (y, state), no auxiliary loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.dims import per_head
from seqlab.mixers.norm import GatedRMSNorm
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer, init_a_log, init_dt_bias
from seqlab.ops import delta_rule
from seqlab.ops.delta_rule import delta_rule_flops
from seqlab.ops.registry import Flops


class MoMConfig(RecurrentConfig):
    """num_memories M routed memories, top_k of them per token, plus a shared one when
    `shared_memory`; heads of head_dim keys (d_model / num_heads unset) and head_dim · expand_v
    values per memory; conv_size: the short causal conv on q and every memory's k, v;
    use_output_gate: o ⊙ swish(W_g x) after the per-head norm. top_k unset: 2, or num_memories
    where that is 1 (so that "mom(num_memories=1)" builds)."""

    num_memories: PositiveInt = 4
    top_k: PositiveInt = 2
    shared_memory: bool = True
    num_heads: PositiveInt = 4
    head_dim: PositiveInt | None = None
    expand_v: PositiveFloat = 1.0
    conv_size: PositiveInt = 4
    use_output_gate: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_top_k(cls, data: Any) -> Any:
        """One memory and no top_k: top_k = 1 (the default 2 would exceed it)."""
        if isinstance(data, dict) and "top_k" not in data and data.get("num_memories") == 1:
            return {**data, "top_k": 1}
        return data

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.top_k > self.num_memories:
            raise ValueError(
                f"top_k ({self.top_k}) must be at most num_memories ({self.num_memories})"
            )
        return self


class MoM(RecurrentMixer):
    """State: S [B, G·H, K, V] with G = M (+ 1 shared) memories of H heads (memory-major), and
    conv [B, conv_size − 1, H·K + G·H·(K + V)]."""

    Config = MoMConfig
    core_op = "delta_rule"
    examples = {
        "mom": {"num_memories": 3, "top_k": 2, "num_heads": 2, "head_dim": 8, "chunk_size": 16},
        "mom_top1_unshared": {
            "num_memories": 2,
            "top_k": 1,
            "shared_memory": False,
            "num_heads": 2,
            "chunk_size": 16,
            "use_output_gate": False,
        },
    }

    def __init__(self, d_model: int, config: MoMConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        H = self.num_heads = c.num_heads
        K = self.head_k = c.head_dim or per_head(d_model, H, "d_model")
        V = c.head_dim * c.expand_v if c.head_dim else d_model * c.expand_v / H
        if V != int(V):
            raise ValueError(f"head_dim * expand_v = {V:g} must be a whole number")
        V = self.head_v = int(V)
        G = self.groups = c.num_memories + int(c.shared_memory)
        self.widths = [H * K, G * H * K, G * H * V]
        self.qkv_proj = nn.Linear(d_model, sum(self.widths), bias=False)
        self.conv = ShortConv(sum(self.widths), c.conv_size)
        self.router = nn.Linear(d_model, c.num_memories, bias=False)
        self.b_proj = nn.Linear(d_model, G * H, bias=False)
        self.a_proj = nn.Linear(d_model, G * H, bias=False)
        self.A_log = nn.Parameter(init_a_log(G * H, 0.0, 16.0))
        self.dt_bias = nn.Parameter(init_dt_bias(G * H))
        if c.use_output_gate:
            self.g_proj = nn.Linear(d_model, H * V, bias=False)
            self.o_norm = GatedRMSNorm(V, c.norm_eps)
        else:
            self.o_norm = nn.RMSNorm(V, eps=c.norm_eps)
        self.o_proj = nn.Linear(H * V, d_model, bias=False)

    def route(self, x: Tensor) -> Tensor:
        """Weights [B, T, G] of each memory for each token: the router's softmax probabilities at
        the top-k memories, renormalised to sum to 1 when k > 1 (with k = 1 the probability
        itself, so that the router learns), 0 elsewhere, and 1 for the shared memory (last)."""
        return self._route(x)[0]

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(`route`'s weights, the chosen memories [B, T, G] as a bool mask). The mask is the
        top-k choice of the logits itself, not `weights > 0`: a chosen memory whose probability
        underflows to 0 (router logits far apart) still takes the token."""
        logits = self.router(x)
        probs = logits.softmax(-1)
        # chosen by the logits: probabilities that underflow to 0 tie, their logits do not
        idx = logits.topk(self.config.top_k, dim=-1).indices
        top = probs.gather(-1, idx)
        if self.config.top_k > 1:  # renormalised over the chosen (one would be 1: no gradient)
            top = top / top.sum(-1, keepdim=True)
        w = torch.zeros_like(probs).scatter(-1, idx, top)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)
        if self.config.shared_memory:
            w = torch.cat([w, w.new_ones(*w.shape[:-1], 1)], -1)
            chosen = torch.cat([chosen, chosen.new_ones(*chosen.shape[:-1], 1)], -1)
        return w, chosen

    def op_call(self) -> OpCall:
        dims = {"K": self.head_k, "V": self.head_v}
        return OpCall(
            "gated", self.groups * self.num_heads, dims, {"chunk_size": self.config.chunk_size}
        )

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {
            "S": (batch_size, self.groups * self.num_heads, self.head_k, self.head_v),
            "conv": (batch_size, self.config.conv_size - 1, sum(self.widths)),
        }

    def flops(self, T: int) -> LayerFlops:
        GH, K, V, C = self.groups * self.num_heads, self.head_k, self.head_v, self.config.chunk_size
        mix = Flops(2 * GH * V)  # the weighted sum of the memories' outputs (an einsum: a bmm)
        return LayerFlops(
            self.projection_flops() + mix,
            delta_rule_flops(T, GH, K, V, self.form(T), C, gated=True),
            delta_rule_flops(1, GH, K, V, "recurrent", gated=True),
        )

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        H, G = self.num_heads, self.groups
        qkv, conv_state = self.conv(self.qkv_proj(x), None if state is None else state["conv"])
        q, k, v = qkv.split(self.widths, dim=-1)
        q = rearrange(q, "b t (h d) -> b t h d", h=H).repeat(1, 1, G, 1)  # one query, G groups
        k, v = (rearrange(t, "b t (gh d) -> b t gh d", gh=G * H) for t in (k, v))
        w, chosen = self._route(x)  # [B, T, G]
        routed = chosen.repeat_interleave(H, dim=-1)  # [B, T, G·H]: memory-major heads
        beta = self.b_proj(x).sigmoid() * routed  # β = 0 and decay 1: an untouched memory
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias) * routed
        o, S = delta_rule(
            F.normalize(q, dim=-1),
            F.normalize(k, dim=-1),
            v,
            beta,
            g,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            check_values=False,  # valid by construction; a check would sync
            form=self.form(x.shape[1]),
            chunk_size=self.config.chunk_size,
        )
        o = torch.einsum("btghd,btg->bthd", rearrange(o, "b t (g h) d -> b t g h d", g=G), w)
        if self.config.use_output_gate:
            o = self.o_norm(o, rearrange(self.g_proj(x), "b t (h d) -> b t h d", h=H))
        else:
            o = self.o_norm(o)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)")), {"S": S, "conv": conv_state}
