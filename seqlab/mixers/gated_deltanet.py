"""Gated DeltaNet (Yang et al. 2025): DeltaNet with a Mamba-2-style decay per head.

S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
log α_t = −exp(A_log) · softplus(W_a x_t + dt_bias)
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.deltanet import DeltaRuleConfig, DeltaRuleMixer
from seqlab.mixers.recurrent import init_a_log, init_dt_bias


class GatedDeltaNetConfig(DeltaRuleConfig):
    """head_dim: key dim per head; the value dim per head is head_dim · expand_v.

    Unset, the sizes derive from d_model as in the paper's 1.3B model (d_model 2048: 6 heads of
    256, keys 0.75·d_model wide): num_heads = max(1, round(0.75·d_model / 256)), head_dim =
    0.75·d_model / num_heads.
    """

    num_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    expand_v: PositiveFloat = 2.0
    use_output_gate: bool = True

    def head_dims(self, d_model: int) -> tuple[int, int, int]:
        H = self.num_heads or max(1, round(0.75 * d_model / 256))
        K = self.head_dim or max(1, round(0.75 * d_model / H))
        V = K * self.expand_v
        if V != int(V):
            raise ValueError(f"head_dim * expand_v = {V:g} must be a whole number")
        return H, K, int(V)


class GatedDeltaNet(DeltaRuleMixer):
    Config = GatedDeltaNetConfig
    gated = True
    examples = {
        "gdn": {"num_heads": 2, "head_dim": 16, "chunk_size": 16},
        "gdn_neg_eigval": {
            "num_heads": 2,
            "head_dim": 16,
            "allow_neg_eigval": True,
            "chunk_size": 16,
        },
        "gdn_sized_by_d_model": {"chunk_size": 16},
    }

    def __init__(self, d_model: int, config: GatedDeltaNetConfig | None = None):
        super().__init__(d_model, config)
        H = self.num_heads
        self.a_proj = nn.Linear(d_model, H, bias=False)
        self.A_log = nn.Parameter(init_a_log(H, 0.0, 16.0))
        self.dt_bias = nn.Parameter(init_dt_bias(H))

    def log_decay(self, x: Tensor) -> Tensor:
        return -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
