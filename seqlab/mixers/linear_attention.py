"""Linear attention (Katharopoulos et al. 2020) with a feature map chosen by name.

    S_t = S_{t−1} + φ(k_t) v_tᵀ,   o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ Σ_{s≤t} φ(k_s)   (normalize=True)

The denominator comes out of the same recurrence as an extra value column of ones.
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.dims import per_head
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.ops import gated_linear
from seqlab.ops.feature_maps import feature_dim, get_feature_map
from seqlab.ops.registry import Flops

# φ(q)·Σφ(k) is ≥ 0 but may be 0 (relu, where the numerator is 0 too); a floor, not an offset,
# keeps the ratio exact elsewhere.
DENOMINATOR_MIN = 1e-6


class LinearAttentionConfig(RecurrentConfig):
    """feature_map: identity, elu (elu + 1), relu, taylor (BASED) or hedgehog (learned);
    hedgehog_dim: the m of hedgehog's per-head map [d, m] (None: the head dim d)."""

    num_heads: PositiveInt = 8
    expand_k: PositiveFloat = 1.0
    expand_v: PositiveFloat = 1.0
    feature_map: str = "elu"
    normalize: bool = True
    hedgehog_dim: PositiveInt | None = None

    @field_validator("feature_map")
    @classmethod
    def _known_feature_map(cls, name: str) -> str:
        get_feature_map(name)
        return name

    @model_validator(mode="after")
    def _positive_denominator(self):
        if self.normalize and self.feature_map == "identity":
            raise ValueError(
                "normalize=True needs a non-negative feature map: with identity the denominator "
                "φ(q)·Σφ(k) can be zero or negative"
            )
        return self


class FeatureMap(nn.Module):
    """φ by name on [B, T, H, d]; hedgehog owns its per-head weight [H, d, m] (identity init)
    and bias [H, m]."""

    def __init__(self, name: str, num_heads: int, dim: int, hedgehog_dim: int):
        super().__init__()
        self.name = name
        self.fn = get_feature_map(name)
        if name == "hedgehog":
            self.weight = nn.Parameter(torch.eye(dim, hedgehog_dim).repeat(num_heads, 1, 1))
            self.bias = nn.Parameter(torch.zeros(num_heads, hedgehog_dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.name == "hedgehog":
            return self.fn(x, self.weight, self.bias)
        return self.fn(x)


class LinearAttention(RecurrentMixer):
    """State: S [B, H, F, V (+ 1 with normalize)], F = feature dim; the last column is Σφ(k)."""

    Config = LinearAttentionConfig
    core_op = "gated_linear"
    examples = {
        "linear_attn": {"num_heads": 2, "chunk_size": 16},
        "linear_attn_hedgehog": {
            "num_heads": 2,
            "feature_map": "hedgehog",
            "hedgehog_dim": 8,
            "chunk_size": 16,
        },
        "linear_attn_taylor": {
            "num_heads": 4,
            "expand_k": 0.5,
            "feature_map": "taylor",
            "chunk_size": 16,
        },
        "linear_attn_taylor_unnormalized": {
            "num_heads": 4,
            "expand_k": 0.5,
            "feature_map": "taylor",
            "normalize": False,
        },
    }

    def __init__(self, d_model: int, config: LinearAttentionConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.num_heads = H = c.num_heads
        self.head_k = per_head(d_model * c.expand_k, H, "d_model * expand_k")
        self.head_v = per_head(d_model * c.expand_v, H, "d_model * expand_v")
        m = c.hedgehog_dim or self.head_k
        self.head_f = feature_dim(c.feature_map, self.head_k, m)
        self.q_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.head_k, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.head_v, bias=False)
        self.q_map = FeatureMap(c.feature_map, H, self.head_k, m)
        self.k_map = FeatureMap(c.feature_map, H, self.head_k, m)
        self.o_proj = nn.Linear(H * self.head_v, d_model, bias=False)

    def flops(self, T: int) -> LayerFlops:
        H, K = self.num_heads, self.head_k
        per_token = self.projection_flops()
        if self.config.feature_map == "hedgehog":
            m = self.config.hedgehog_dim or K
            per_token += Flops(2 * 2 * H * K * m)  # q and k through their [H, K, m] maps
        V = self.head_v + 1 if self.config.normalize else self.head_v  # Σφ(k) rides along
        return LayerFlops(per_token, *self.gated_linear_flops(T, self.head_f, V, "none"))

    def op_call(self) -> OpCall:
        V = self.head_v + 1 if self.config.normalize else self.head_v
        dims = {"K": self.head_f, "V": V}
        return OpCall("none", self.num_heads, dims, {"chunk_size": self.config.chunk_size})

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        V = self.head_v + 1 if self.config.normalize else self.head_v
        return {"S": (batch_size, self.num_heads, self.head_f, V)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        q = self.q_map(rearrange(self.q_proj(x), "b t (h d) -> b t h d", h=self.num_heads))
        k = self.k_map(rearrange(self.k_proj(x), "b t (h d) -> b t h d", h=self.num_heads))
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", h=self.num_heads)
        if self.config.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o, S = gated_linear(
            q,
            k,
            v,
            initial_state=None if state is None else state["S"],
            output_final_state=True,
            form=self.form(x.shape[1]),
            chunk_size=self.config.chunk_size,
        )
        if self.config.normalize:
            o = o[..., :-1] / o[..., -1:].clamp_min(DENOMINATOR_MIN)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)")), {"S": S}
