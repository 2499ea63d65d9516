"""RWKV-7 "Goose" time mixing (Peng et al. 2025), as flash-linear-attention's `RWKV7Attention`.

    δ_t = x_{t−1} − x_t;  x•_t = x_t + μ• ⊙ δ_t  for • in r, w, k, v, a, g     (token shift)
    r, k, v = W_r x^r, W_k x^k, W_v x^v
    gk = −e^{−1/2} · sigmoid(w0 + W_w2 tanh(W_w1 x^w))       (log-decay per key channel)
    α = sigmoid(a0 + W_a2 W_a1 x^a)                            (in-context learning rate)
    g = W_g2 sigmoid(W_g1 x^g)                                 (output gate)
    κ̂ = normalize_h(k ⊙ k_k);  k ← k ⊙ (1 + (α − 1) ⊙ k_a)
    later layers: v ← v + (v_first − v) ⊙ sigmoid(v0 + W_v2 W_v1 x^v)
    S_t = (diag(exp(gk_t)) − (κ̂_t ⊙ α_t) κ̂_tᵀ) S_{t−1} + k_t v_tᵀ,  o_t = S_tᵀ r_t   (dplr)
    y = W_o (g ⊙ (GroupNorm_h(o) + ((r ⊙ k ⊙ r_k)·1) v))

The recurrence is the `dplr` op with a = −κ̂, b = κ̂ ⊙ α, scale 1. v_first (the value residual)
is the first RWKV-7 layer's v: a model passes one context dict per call through its layers
(`TokenMixer.takes_context`); the first rwkv7 layer finds no "v_first" there and stores its v, the
later ones mix it in. A mixer called alone (no context) is a first layer. Only later layers hold
v_lora (as in flash-linear-attention, where layer 0 has none): the model tells each its place,
`context_index` (how many earlier layers of the model take the context; 0: the first).

Init as flash-linear-attention's `_initialize_weights` for what sets the dynamics: the token-shift
mixes μ, k_k, k_a, r_k, the decay, ICLR and value-residual biases w0, a0, v0 and the GroupNorm
weight, from the layer's place in the model (`layer_idx` of `num_layers`); r, k, v projections
orthogonal (k with gain 0.1). The LoRA matrices and o_proj follow the init policy: fla's zeros
there would give the LoRA up-projections and every layer before o_proj no gradient at init.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.ops.dplr import SUB_CHUNK, dplr, dplr_flops
from seqlab.ops.registry import Flops

# The bound of RWKV-7's log-decay: gk ∈ (−e^{−1/2}, 0), a per-step factor in (0.545, 1).
DECAY_BOUND = math.exp(-0.5)


class RWKV7Config(RecurrentConfig):
    """head_dim: channels per head, num_heads = d_model / head_dim (None: 64, or d_model where it
    is smaller); the LoRA ranks of the decay, ICLR, value-residual and gate projections (None:
    flash-linear-attention's defaults from d_model and head_dim). Set by `CausalLM` from the
    layer's place unless the pattern gives them: layer_idx, num_layers (the depth-dependent init)
    and context_index (0: the first rwkv7 layer, which stores v_first; later ones hold v_lora and
    mix v_first in)."""

    head_dim: PositiveInt | None = None
    decay_low_rank_dim: PositiveInt | None = None
    a_low_rank_dim: PositiveInt | None = None
    v_low_rank_dim: PositiveInt | None = None
    gate_low_rank_dim: PositiveInt | None = None
    layer_idx: NonNegativeInt = 0
    num_layers: PositiveInt = 1
    context_index: NonNegativeInt = 0


def default_ranks(d_model: int, head_dim: int) -> dict[str, int]:
    """flash-linear-attention's LoRA ranks: multiples of 32 growing as √d_model (and with the
    head size for decay, ICLR and value residual), at least 32."""

    def rank(c: float, factor: float) -> int:
        return max(32, int(round(c * d_model**0.5 * factor / 32) * 32))

    factor = head_dim / 64
    return {
        "decay": rank(2.5, factor),
        "a": rank(2.5, factor),
        "v": rank(1.7, factor),
        "gate": rank(5.0, 1.0),
    }


class LoRA(nn.Module):
    """x ↦ up(act(down(x))) (+ bias): a low-rank projection; the bias is a parameter of its own,
    not the Linear's (it is the paper's w0, a0, v0, kept by the init policy)."""

    def __init__(self, d_in: int, d_out: int, rank: int, act: nn.Module, bias: bool):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.act = act
        self.up = nn.Linear(rank, d_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(self.act(self.down(x)))
        return y if self.bias is None else y + self.bias


class HeadGroupNorm(nn.GroupNorm):
    """GroupNorm over heads whose variance floor is `eps` per channel of a head: RWKV-7 takes
    eps = head_dim · norm_eps. `eps` stays the norm_eps every norm in a mixer takes."""

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps * (self.num_channels // self.num_groups)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps)


class RWKV7(RecurrentMixer):
    """State: S [B, H, K, K] (float32) and the last input, shift [B, D] (the token shift)."""

    Config = RWKV7Config
    core_op: ClassVar[str] = "dplr"
    takes_context: ClassVar[bool] = True
    examples: ClassVar[dict[str, dict[str, Any]]] = {
        "rwkv7": {"head_dim": 8, "chunk_size": 16, "layer_idx": 1, "num_layers": 3},
        "rwkv7_ranks": {
            "head_dim": 16,
            "chunk_size": 32,
            "decay_low_rank_dim": 4,
            "a_low_rank_dim": 4,
            "v_low_rank_dim": 4,
            "gate_low_rank_dim": 8,
        },
    }
    paper_init: ClassVar[tuple[str, ...]] = ("r_proj", "k_proj", "v_proj")
    # the token-shift mixes μ of r, w, k, v, a, g, in this order in `mix`
    MIXES: ClassVar[tuple[str, ...]] = ("r", "w", "k", "v", "a", "g")

    def __init__(self, d_model: int, config: RWKV7Config | None = None):
        super().__init__(d_model, config)
        c = self.config
        if c.layer_idx >= c.num_layers:
            raise ValueError(
                f"layer_idx must be less than num_layers = {c.num_layers}, got {c.layer_idx}"
            )
        D = d_model
        self.head_dim = K = min(64, D) if c.head_dim is None else c.head_dim
        if D % K:
            raise ValueError(f"d_model = {D} must be a whole multiple of head_dim = {K}")
        if c.chunk_size > SUB_CHUNK and c.chunk_size % SUB_CHUNK:
            raise ValueError(
                f"chunk_size must be at most {SUB_CHUNK} or a multiple of {SUB_CHUNK} (the dplr "
                f"chunk form's sub-chunk), got {c.chunk_size}"
            )
        self.num_heads = H = D // K
        self.value_residual = c.context_index > 0
        ranks = default_ranks(D, K)
        self.ranks = {
            "decay": c.decay_low_rank_dim or ranks["decay"],
            "a": c.a_low_rank_dim or ranks["a"],
            "v": c.v_low_rank_dim or ranks["v"],
            "gate": c.gate_low_rank_dim or ranks["gate"],
        }
        self.mix = nn.Parameter(torch.zeros(len(self.MIXES), D))
        self.k_k = nn.Parameter(torch.zeros(D))
        self.k_a = nn.Parameter(torch.zeros(D))
        self.r_k = nn.Parameter(torch.zeros(H, K))
        self.r_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.w_lora = LoRA(D, D, self.ranks["decay"], nn.Tanh(), bias=True)
        self.a_lora = LoRA(D, D, self.ranks["a"], nn.Identity(), bias=True)
        if self.value_residual:
            self.v_lora = LoRA(D, D, self.ranks["v"], nn.Identity(), bias=True)
        self.g_lora = LoRA(D, D, self.ranks["gate"], nn.Sigmoid(), bias=False)
        self.g_norm = HeadGroupNorm(H, D, eps=c.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)
        self._paper_init()

    @torch.no_grad()
    def _paper_init(self) -> None:
        """flash-linear-attention's `_initialize_weights` (its n-loops as vector formulas)."""
        c, D, K = self.config, self.d_model, self.head_dim
        L, i = c.num_layers, c.layer_idx
        ratio_0_to_1 = i / (L - 1) if L > 1 else 0.0
        ratio_1_to_almost0 = 1.0 - i / L
        n = torch.arange(D, dtype=torch.float64)
        linear = n / (D - 1) - 0.5 if D > 1 else torch.zeros(D, dtype=torch.float64)
        zigzag = ((n % K) - (K - 1) / 2) / ((K - 1) / 2) if K > 1 else torch.zeros_like(n)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(D - 1, 1)) ** (1 + ratio_0_to_1**0.3)
        ddd = n / D
        powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        for row, name in enumerate(self.MIXES):
            self.mix[row] = 1.0 - ddd ** (powers[name] * ratio_1_to_almost0)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.w_lora.bias.copy_(www + 0.5 + zigzag * 2.5)
        self.a_lora.bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if self.value_residual:
            self.v_lora.bias.copy_(0.73 - linear * 0.4)
        self.g_norm.weight.fill_(((i + 1) / L) ** 0.7)
        for proj, gain in ((self.r_proj, 1.0), (self.k_proj, 0.1), (self.v_proj, 1.0)):
            nn.init.orthogonal_(proj.weight, gain=gain)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        H, K = self.num_heads, self.head_dim
        return {"S": (batch_size, H, K, K), "shift": (batch_size, self.d_model)}

    def forward(
        self, x: Tensor, state: State | None = None, context: dict | None = None
    ) -> tuple[Tensor, State]:
        """x [B, T, D] → y [B, T, D] and the state after x. context: the model's per-call dict;
        the first rwkv7 layer stores its v [B, T, D] there as "v_first", later ones read it."""
        B, T, D = x.shape
        H, K = self.num_heads, self.head_dim
        if state is not None and tuple(state["shift"].shape) != (B, D):
            raise ValueError(
                f"the shift state has shape {tuple(state['shift'].shape)}, expected [B, D] = "
                f"{[B, D]}"
            )
        prev = x.new_zeros(B, 1, D) if state is None else state["shift"][:, None].to(x.dtype)
        delta = torch.cat([prev, x[:, :-1]], 1) - x
        xr, xw, xk, xv, xa, xg = (x.addcmul(delta, m) for m in self.mix.unbind(0))
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        gk = -DECAY_BOUND * torch.sigmoid(self.w_lora(xw))
        if context is not None and "v_first" not in context:
            context["v_first"] = v
        elif context is not None and self.value_residual:
            v = torch.lerp(v, context["v_first"], torch.sigmoid(self.v_lora(xv)))
        elif context is not None:
            raise ValueError(
                "the context holds a v_first but this rwkv7 layer has context_index 0 (the "
                "first, which stores v_first): a model gives each layer its context_index"
            )
        alpha = torch.sigmoid(self.a_lora(xa))
        g = self.g_lora(xg)
        kk = F.normalize((k * self.k_k).view(B, T, H, K), dim=-1)
        k = k.addcmul(k * (alpha - 1), self.k_a)
        r, k, alpha, gk = (t.view(B, T, H, K) for t in (r, k, alpha, gk))
        vh = v.view(B, T, H, K)
        o, S = dplr(
            r,
            k,
            vh,
            -kk,
            kk * alpha,
            gk,
            scale=1.0,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            form=self.form(T),
            chunk_size=self.config.chunk_size,
            check_values=False,  # gk ∈ (−e^{−1/2}, 0) by construction
        )
        o = self.g_norm(o.reshape(B * T, D)).view(B, T, D)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * vh  # the current token's own v
        y = self.o_proj((o + bonus.view(B, T, D)) * g)
        # a copy: a view of x would keep the whole input alive as long as the state is held
        return y, {"S": S, "shift": x[:, -1].clone()}

    def flops(self, T: int) -> LayerFlops:
        """Per token: the r, k, v, o projections and the decay, ICLR and gate LoRAs, and a later
        layer's v_lora (a later layer called alone, with no v_first to mix in, skips it); the
        token shift, κ̂, the bonus, GroupNorm and gates elementwise (about 30 D)."""
        D, H, K, C = self.d_model, self.num_heads, self.head_dim, self.config.chunk_size
        r = self.ranks
        lora = r["decay"] + r["a"] + r["gate"] + (r["v"] if self.value_residual else 0)
        proj = 4 * 2 * D * D + 4 * D * lora
        return LayerFlops(
            Flops(proj, 30 * D),
            dplr_flops(T, H, K, K, self.form(T), C),
            dplr_flops(1, H, K, K, "recurrent"),
        )

    def op_call(self) -> OpCall:
        K = self.head_dim
        return OpCall(
            "default", self.num_heads, {"K": K, "V": K}, {"chunk_size": self.config.chunk_size}
        )
