"""Hyena (Poli et al. 2023), order 2: projections, a short conv, implicit long filters, gates.

    v, x1, x2 = shortconv(in_proj(x)).split(D)          # plain causal depthwise conv, no SiLU
    h1, h2   = MLP(pos_emb(t)) ⊙ exp(−α_d t/ℓ)           # implicit filters, [T, D] each
    y        = out_proj(hyena(v, x1, x2, h1, h2, bias1, bias2))

pos_emb(t) = [t/ℓ, cos(2π f_k t/ℓ), sin(2π f_k t/ℓ)] (emb_dim = 1 + 2·bands, f_k = 1..bands),
ℓ = `filter_scale` (a fixed normalizing length, not a limit: the filters are defined at every
position). The MLP is Linear → Sin → Linear → Sin → Linear with Sin(x) = sin(w ⊙ x), w learnable
per unit; the window's per-channel decay α runs from fast to slow as in the paper's
ExponentialModulation (reaching `target` at fraction fast_decay_pct … slow_decay_pct of ℓ).

The filters depend only on positions, so a decode step at position p computes the p + 1 taps it
needs. State: "conv" [B, W − 1, 3D] (the short conv's tail) and "cache" [B, Tc, 2, D] (the op's
inputs of each order so far; grows with T). The position is the cache's length Tc.
"""

from __future__ import annotations

import math

import torch
from pydantic import PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State, TokenMixer
from seqlab.ops.hyena import ORDER, hyena
from seqlab.ops.hyena import flops as op_flops
from seqlab.ops.registry import Flops


class HyenaConfig(MixerConfig):
    """filter_order: hidden width of the filter MLP; emb_dim: positional features (odd, ≥ 3);
    short_conv: width of the causal depthwise conv over the 3D projected channels;
    filter_scale: the length ℓ positions are normalized by; form: fft (train, prefill) or
    direct (the reference)."""

    filter_order: PositiveInt = 64
    emb_dim: PositiveInt = 3
    short_conv: PositiveInt = 3
    sin_freq: PositiveFloat = 1.0
    filter_scale: PositiveInt = 2048
    fast_decay_pct: PositiveFloat = 0.3
    slow_decay_pct: PositiveFloat = 1.5
    target: PositiveFloat = 1e-2
    form: str = "fft"

    @model_validator(mode="after")
    def _valid(self):
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and ≥ 3 (t, cos, sin), got {self.emb_dim}")
        if self.form not in ("fft", "direct"):
            raise ValueError(f"form must be fft or direct, got {self.form!r}")
        if self.target >= 1:
            raise ValueError(
                f"target must be < 1 (the window's value at the decay), got {self.target}"
            )
        return self


class Sin(nn.Module):
    """sin(w ⊙ x) with a learnable frequency per unit."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Positions → filters [L, channels]: MLP of positional features times a decay window."""

    def __init__(self, channels: int, d_model: int, c: HyenaConfig):
        super().__init__()
        self.scale = c.filter_scale
        bands = (c.emb_dim - 1) // 2
        self.register_buffer("freqs", torch.arange(1, bands + 1, dtype=torch.float32), False)
        self.mlp = nn.Sequential(
            nn.Linear(c.emb_dim, c.filter_order),
            Sin(c.filter_order, c.sin_freq),
            nn.Linear(c.filter_order, c.filter_order),
            Sin(c.filter_order, c.sin_freq),
            nn.Linear(c.filter_order, channels, bias=False),
        )
        fast = math.log(c.target) / c.fast_decay_pct  # negative: fast decay
        slow = math.log(c.target) / c.slow_decay_pct
        alpha = torch.linspace(abs(slow), abs(fast), d_model).repeat(channels // d_model)
        self.register_buffer("alpha", alpha, False)

    def forward(self, L: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        t = torch.arange(L, device=device, dtype=torch.float32)[:, None] / self.scale  # [L, 1]
        w = 2 * math.pi * t * self.freqs
        z = torch.cat([t, torch.cos(w), torch.sin(w)], dim=-1)
        h = self.mlp(z.to(self.mlp[0].weight.dtype))
        return (h * torch.exp(-t.to(h.dtype) * self.alpha.to(h.dtype))).to(dtype)


class Hyena(TokenMixer):
    """Order-2 Hyena; the state grows with T (a cache of the op's inputs)."""

    Config = HyenaConfig
    core_op = "hyena"
    state_grows = True
    examples = {
        "default": {},
        "small": {"filter_order": 16, "emb_dim": 5, "short_conv": 2},
        "direct": {"filter_order": 16, "form": "direct"},
    }

    output_proj = "out_proj"
    paper_init = ("filter",)  # the implicit filter's MLP keeps its fan-in init

    def __init__(self, d_model: int, config: HyenaConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        D = d_model
        self.width = c.short_conv
        self.in_proj = nn.Linear(D, (ORDER + 1) * D)
        self.short = nn.Conv1d((ORDER + 1) * D, (ORDER + 1) * D, c.short_conv, groups=3 * D)
        self.filter = ImplicitFilter(ORDER * D, D, c)
        self.bias = nn.Parameter(torch.randn(ORDER, D))
        self.out_proj = nn.Linear(D, D)

    def init_state(self, batch_size: int) -> State:
        p = self.in_proj.weight
        D = self.d_model
        return {
            "conv": p.new_zeros(batch_size, self.width - 1, (ORDER + 1) * D),
            "cache": p.new_zeros(batch_size, 0, ORDER, D),
        }

    def state_bytes_for(self, batch_size: int, seq_len: int) -> int:
        size = self.in_proj.weight.element_size()
        D = self.d_model
        conv = batch_size * (self.width - 1) * (ORDER + 1) * D
        return size * (conv + batch_size * seq_len * ORDER * D)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B, T, D = x.shape
        if state is None:
            state = self.init_state(B)
        u = self.in_proj(x)
        us = torch.cat([state["conv"].to(u.dtype), u], dim=1)  # [B, W − 1 + T, 3D]
        c = self.short(us.transpose(1, 2)).transpose(1, 2)
        tail = us[:, us.shape[1] - (self.width - 1) :]
        v, x1, x2 = c.split(D, dim=-1)
        cache = state["cache"]
        Tc = cache.shape[1]
        h = self.filter(Tc + T, c.dtype, c.device)  # [Tc + T, 2D]
        h1, h2 = h.split(D, dim=-1)
        form = "recurrent" if T == 1 and Tc > 0 else self.config.form
        y, cache = hyena(
            v,
            x1,
            x2,
            h1,
            h2,
            self.bias[0],
            self.bias[1],
            initial_state=cache if Tc else None,
            output_final_state=True,
            form=form,
        )
        return self.out_proj(y), {"conv": tail, "cache": cache}

    def _filter_flops(self, L: int) -> int:
        c = self.config
        D = self.d_model
        mlp = 2 * (c.emb_dim * c.filter_order + c.filter_order**2 + c.filter_order * ORDER * D)
        return L * mlp

    def flops(self, T: int) -> LayerFlops:
        D = self.d_model
        proj = 2 * D * 3 * D + 2 * D * D  # in_proj, out_proj
        conv = 2 * self.width * 3 * D  # counted by torch as a convolution
        # the filter MLP runs once per position: its matmuls count per token
        per_token = Flops(proj + conv + self._filter_flops(1), 0)
        prefill = op_flops("default", self.config.form, T, 1, D=D)
        # a decode step recomputes the filter taps at all T + 1 positions (the new one is in
        # per_token)
        decode = op_flops("default", "recurrent", 1, 1, D=D, Tc=T) + Flops(self._filter_flops(T), 0)
        return LayerFlops(per_token, prefill, decode)

    def op_call(self) -> OpCall:
        return OpCall("default", 1, {"D": self.d_model}, {})

    def core_bytes(self, T: int, grad: bool) -> int:
        # FFT buffers of the padded length per order (complex), float32
        n = 2 * T
        return ORDER * self.d_model * n * 8 * (2 if grad else 1)
