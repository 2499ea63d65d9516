"""Mixture of experts: a top-k softmax router over FFN experts and MoE++'s zero-computation experts.

    p = softmax(W_r · x)                          router probabilities over E slots
    y = Σ_{i ∈ top-k(p)} w_i · E_i(x) (+ S(x))    w = top-k of p, renormalised if normalize_topk

Slots are ordered [FFN experts | zero | copy | constant] (MoE++, Jin et al. 2024): a zero expert
outputs 0, a copy expert outputs x, a constant expert outputs α₁·x + α₂·v with
[α₁, α₂] = softmax(W_c · x) and v learned. The optional shared expert S sees every token.

Dropless: every token-slot is computed. FFN experts keep stacked weights; their token-slots are
sorted by expert and each expert runs one matmul pair on its contiguous slice.

Load balancing (Switch / GShard): aux = coef · E · Σ_i η_i f_i P_i, with f_i the fraction of
token-slots routed to slot i, P_i its mean router probability, η_i = 1 for FFN experts and
zero_compute_balance (MoE++'s τ) for zero-computation ones. Uniform probabilities give aux = coef.

Not here: MoE++'s gating residuals (they pass router logits between layers, outside this interface).
"""

from __future__ import annotations

from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from seqlab.channel.base import ChannelConfig, ChannelMixer
from seqlab.channel.mlp import swiglu_hidden
from seqlab.init_policy import init_linear


class MoEConfig(ChannelConfig):
    num_experts: PositiveInt = 8
    top_k: PositiveInt = 2
    expert_type: Literal["swiglu", "mlp"] = "swiglu"
    # None: the dense default of expert_type (swiglu_hidden(D, multiple_of), or 4·D for mlp).
    expert_hidden: PositiveInt | None = None
    multiple_of: PositiveInt = 16
    normalize_topk: bool = True
    # Switch Transformer's multiplicative noise on the router input, training only.
    router_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    aux_loss_coef: NonNegativeFloat = 0.01
    shared_expert: bool = False
    num_zero: NonNegativeInt = 0
    num_copy: NonNegativeInt = 0
    num_constant: NonNegativeInt = 0
    zero_compute_balance: NonNegativeFloat = 1.0

    @property
    def num_slots(self) -> int:
        return self.num_experts + self.num_zero + self.num_copy + self.num_constant

    @model_validator(mode="after")
    def _top_k_fits(self) -> Self:
        if self.top_k > self.num_slots:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.num_slots} router slots "
                f"(num_experts + num_zero + num_copy + num_constant)"
            )
        return self


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights, each run on its own contiguous rows."""

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, kind: str, std: float, out_std: float
    ):
        super().__init__()
        self.kind = kind
        width = 2 * hidden if kind == "swiglu" else hidden  # swiglu: gate and up, gate first
        self.w_in = nn.Parameter(torch.randn(num_experts, d_model, width) * std)  # [E, D, 2H | H]
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, d_model) * out_std)  # [E, H, D]

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [S, D], its rows grouped by expert with counts[e] rows for expert e → [S, D]."""
        # unbind, not w[e]: its backward stacks E slices once instead of summing E full-size zeros.
        pieces = zip(x.split(counts), self.w_in.unbind(0), self.w_out.unbind(0), strict=True)
        return torch.cat([self._act(xe @ w_in) @ w_out for xe, w_in, w_out in pieces])

    def gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [S, D], row s for expert ids[s] → [S, D], each row through its own gathered weights:
        no host sync (the split sizes of `forward` are host ints), and for S ≤ E no more weight
        traffic than `forward`; for the few rows of a decode step."""
        h = self._act(torch.bmm(x.unsqueeze(1), self.w_in[ids]))  # [S, 1, 2H | H]
        return torch.bmm(h, self.w_out[ids]).squeeze(1)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)


class MoE(ChannelMixer):
    Config = MoEConfig
    config: MoEConfig

    def __init__(self, d_model: int, config: MoEConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        default = (
            swiglu_hidden(d_model, c.multiple_of) if c.expert_type == "swiglu" else 4 * d_model
        )
        self.expert_hidden = c.expert_hidden or default
        self.num_slots = c.num_slots
        self.router = nn.Linear(d_model, c.num_slots, bias=False)
        init_linear(self.router, c.init_std)
        args = (d_model, self.expert_hidden, c.expert_type, c.init_std, c.output_std)
        self.experts = GroupedExperts(c.num_experts, *args)
        self.shared = GroupedExperts(1, *args) if c.shared_expert else None
        if c.num_constant:
            # v starts at the scale of the normalised residual input, as the copy expert's x does.
            self.const_gate = nn.Parameter(torch.randn(c.num_constant, 2, d_model) * c.init_std)
            self.const_value = nn.Parameter(torch.randn(c.num_constant, d_model))
        # Token-slots per slot in the last forward, [E] in slot order; detached, for logging.
        self.last_expert_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        xf = x.reshape(-1, self.d_model)  # [N, D], N = B·T
        probs, weights, slots = self._route(xf)  # [N, E], [N, k], [N, k]
        flat = slots.flatten()
        # scatter_add, not bincount: bincount reads the largest id back to the host
        load = torch.zeros(self.num_slots, dtype=torch.long, device=x.device)
        load = load.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
        self.last_expert_load = load.detach()

        fp = load.to(probs.dtype) / slots.numel() * probs.mean(0)  # f_i · P_i, [E]
        balance = fp[: c.num_experts].sum() + c.zero_compute_balance * fp[c.num_experts :].sum()
        aux = c.aux_loss_coef * self.num_slots * balance

        y = self._ffn_experts(xf, weights, slots, load[: c.num_experts])
        if c.num_copy or c.num_constant:
            gates = torch.zeros(xf.shape[0], self.num_slots, dtype=x.dtype, device=x.device)
            gates = gates.scatter(1, slots, weights)  # [N, E], zero off the top-k
            start = c.num_experts + c.num_zero
            if c.num_copy:
                y = y + gates[:, start : start + c.num_copy].sum(-1, keepdim=True) * xf
            if c.num_constant:
                g = gates[:, start + c.num_copy :]  # [N, C]
                # α for every token, not only routed ones: 2·D MACs per constant expert is noise.
                alpha = torch.einsum("nd,ctd->nct", xf, self.const_gate).softmax(-1)  # [N, C, 2]
                y = y + (g * alpha[..., 0]).sum(-1, keepdim=True) * xf
                y = y + (g * alpha[..., 1]) @ self.const_value
        if self.shared is not None:
            y = y + self.shared(xf, [xf.shape[0]])
        return y.reshape(x.shape), aux

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] → probabilities [N, E] (at least float32), top-k weights [N, k] in x's dtype
        and their slot ids [N, k]."""
        c = self.config
        if self.training and c.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - c.router_jitter, 1 + c.router_jitter)
        # Routing decisions in bf16 flip on round-off, so the router runs in float32 (or float64).
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            probs = F.linear(x.to(acc), self.router.weight.to(acc)).softmax(-1)
        weights, slots = probs.topk(c.top_k, dim=-1)
        if c.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights.to(x.dtype), slots

    def _ffn_experts(
        self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, load: torch.Tensor
    ) -> torch.Tensor:
        """Σ over each token's FFN token-slots of w · expert(x): x [N, D], weights, slots [N, k];
        load [E_ffn] the token-slots per FFN expert."""
        N, k = slots.shape
        E = self.config.num_experts
        if N * k <= E:  # a decode step: each token-slot through its expert's gathered weights
            flat = slots.flatten()
            ys = self.experts.gathered(x.repeat_interleave(k, 0), flat.clamp(max=E - 1))
            per_slot = torch.where((flat < E)[:, None], ys, 0)  # zero-compute slots give zero
        else:
            # Token-slots grouped by expert; FFN ids are the smallest, so theirs come first. The
            # split sizes must be host ints: one device sync per forward.
            counts = load.tolist()
            order = slots.flatten().argsort(stable=True)[: sum(counts)]  # [S]
            ys = self.experts(x[order // k], counts)  # [S, D]
            # Back to [N·k, D] by a copy (no atomics, deterministic); zero-compute slots stay 0.
            per_slot = x.new_zeros(N * k, self.d_model).index_copy(0, order, ys)
        return (per_slot.view(N, k, -1) * weights.unsqueeze(-1)).sum(1)
