"""Token mixers by name: `build_mixer("gdn", 256, num_heads=4)`; `MIXERS` maps names to classes."""

from __future__ import annotations

from typing import Any

from seqlab.mixers.attention import Attention
from seqlab.mixers.base import MixerConfig, State, TokenMixer, copy_state, state_tensors
from seqlab.mixers.deltanet import DeltaNet
from seqlab.mixers.gated_deltanet import GatedDeltaNet
from seqlab.mixers.gla import GLA
from seqlab.mixers.hyena import Hyena
from seqlab.mixers.linear_attention import LinearAttention
from seqlab.mixers.lmu import LMU
from seqlab.mixers.mamba import Mamba
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.mlstm import MLSTM
from seqlab.mixers.mom import MoM
from seqlab.mixers.retnet import RetNet
from seqlab.mixers.rnn import GRU, LSTM
from seqlab.mixers.rwkv7 import RWKV7
from seqlab.mixers.s4d import S4D
from seqlab.mixers.slstm import SLSTM

MIXERS: dict[str, type[TokenMixer]] = {
    "attn": Attention,
    "linear_attn": LinearAttention,
    "retnet": RetNet,
    "gla": GLA,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "deltanet": DeltaNet,
    "gdn": GatedDeltaNet,
    "mom": MoM,
    "s4d": S4D,
    "lmu": LMU,
    "hyena": Hyena,
    "mlstm": MLSTM,
    "slstm": SLSTM,
    "lstm": LSTM,
    "gru": GRU,
    "rwkv7": RWKV7,
}


def build_mixer(name: str, d_model: int, **options: Any) -> TokenMixer:
    """The mixer `name` with its config built from `options`; unknown names and keys fail,
    listing the valid ones."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid names: {', '.join(MIXERS)}")
    cls = MIXERS[name]
    return cls(d_model, cls.Config.make(**options))


__all__ = [
    "MIXERS",
    "MixerConfig",
    "State",
    "TokenMixer",
    "build_mixer",
    "copy_state",
    "state_tensors",
]
