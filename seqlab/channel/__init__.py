"""Channel mixers (per-token feed-forward layers) and the registry that builds them by name.

mixer = build_channel_mixer("moe", d_model=256, num_experts=8, top_k=2)
y, aux_loss = mixer(x)   # x [B, T, D]; add aux_loss to the training loss
"""

from __future__ import annotations

from typing import Any

from seqlab.channel.base import ChannelConfig, ChannelMixer
from seqlab.channel.mlp import MLP, MLPConfig, SwiGLU, SwiGLUConfig
from seqlab.channel.moe import MoE, MoEConfig

CHANNEL_MIXERS: dict[str, type[ChannelMixer]] = {"mlp": MLP, "swiglu": SwiGLU, "moe": MoE}


def build_channel_mixer(name: str, d_model: int, **options: Any) -> ChannelMixer:
    """The channel mixer registered as `name`, its config built from `options`."""
    if name not in CHANNEL_MIXERS:
        raise ValueError(
            f"unknown channel mixer {name!r}; valid names are: {', '.join(CHANNEL_MIXERS)}"
        )
    cls = CHANNEL_MIXERS[name]
    return cls(d_model, cls.Config.make(**options))


__all__ = [
    "CHANNEL_MIXERS",
    "MLP",
    "ChannelConfig",
    "ChannelMixer",
    "MLPConfig",
    "MoE",
    "MoEConfig",
    "SwiGLU",
    "SwiGLUConfig",
    "build_channel_mixer",
]
