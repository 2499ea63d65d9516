"""A causal LM built from patterns: embedding, pre-norm residual blocks, final norm, tied head.

config = ModelConfig(vocab_size=256, d_model=128, n_layers=4, pattern="gdn*3,attn")
model = CausalLM(config)
out = model(ids)                        # ids [B, T] → logits [B, T, vocab], state, aux_loss
out = model(next_ids, state=out.state)  # continue from the state (T = 1: the recurrent step)

Weights follow seqlab.init_policy: init_std and norm_eps reach every mixer and channel mixer
through their configs, each block's output projections get init_std / √(2·n_layers); a pattern
option overrides them for one layer ("gdn(init_std=0.01)").

A mixer config that declares `layer_idx`, `num_layers` or `context_index` gets the layer's place
(its index, n_layers, and how many earlier layers take the call's context, TokenMixer.takes_context)
unless the pattern sets them: RWKV-7's init depends on depth and its first layer differs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

from seqlab.channel import build_channel_mixer
from seqlab.config import Config
from seqlab.init_policy import INIT_STD, NORM_EPS, depth_scaled_std
from seqlab.mixers import MIXERS, build_mixer
from seqlab.mixers.base import State, TokenMixer, copy_state
from seqlab.model.pattern import MAX_LAYERS, LayerSpec, expand_pattern


class ModelConfig(Config):
    # Below 2^63: torch takes sizes as 64-bit ints (a larger one failed inside torch.empty).
    vocab_size: int = Field(gt=0, lt=2**63)
    d_model: int = Field(default=128, gt=0, lt=2**63)
    n_layers: int = Field(default=2, gt=0, le=MAX_LAYERS)
    # Token mixers, e.g. "gdn*3,attn" or "gla(expand_k=0.5)*2,attn(window=256)".
    pattern: str = "attn"
    # Channel mixers in the same syntax, e.g. "moe(num_experts=8)"; None: no channel mixer.
    channel: str | None = "swiglu"
    norm_eps: float = Field(default=NORM_EPS, gt=0)
    init_std: float = Field(default=INIT_STD, gt=0)
    tie_embeddings: bool = True

    def mixer_specs(self) -> list[LayerSpec]:
        return expand_pattern(self.pattern, self.n_layers)

    def channel_specs(self) -> list[LayerSpec | None]:
        if self.channel is None:
            return [None] * self.n_layers
        if not self.channel.strip():  # parse_pattern's error would name the token mixers' pattern
            raise ValueError(
                "channel must be a channel mixer pattern like 'swiglu', or None (\"none\" in "
                f"TOML) for no channel mixer, got {self.channel!r}"
            )
        return expand_pattern(self.channel, self.n_layers)

    def layer_options(self, spec: LayerSpec, norm: bool) -> dict:
        """spec's options over the model-wide init options (and norm_eps with `norm`); the output
        std scales the layer's own init_std with depth unless the pattern gives out_init_std."""
        options = {"init_std": self.init_std, **({"norm_eps": self.norm_eps} if norm else {})}
        options |= spec.options
        options.setdefault("out_init_std", depth_scaled_std(options["init_std"], self.n_layers))
        return options


class Block(nn.Module):
    """x + mixer(norm(x)), then x + channel(norm(x))."""

    def __init__(self, d_model: int, mixer: TokenMixer, channel: nn.Module | None, eps: float):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=eps)
        self.mixer = mixer
        self.channel_norm = nn.RMSNorm(d_model, eps=eps) if channel is not None else None
        self.channel = channel

    def forward(self, x: torch.Tensor, state: State | None = None, context: dict | None = None):
        """context: the model's dict for this call, passed to a mixer that `takes_context`."""
        if self.mixer.takes_context:
            h, state = self.mixer(self.mixer_norm(x), state, context=context)
        else:
            h, state = self.mixer(self.mixer_norm(x), state)
        x = x + h
        if self.channel is None:
            return x, state, x.new_zeros(())
        h, aux = self.channel(self.channel_norm(x))
        return x + h, state, aux


class LMOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, vocab]
    state: list[State]  # one state per layer
    aux_loss: torch.Tensor  # 0-dim: the channel mixers' auxiliary losses (MoE load balancing)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"CausalLM takes a ModelConfig, got {type(config).__name__}")
        self.config = config
        D = config.d_model
        self.embed = nn.Embedding(config.vocab_size, D)
        self.blocks = nn.ModuleList()
        context_index = 0
        for i, (m, c) in enumerate(zip(config.mixer_specs(), config.channel_specs(), strict=True)):
            options = config.layer_options(m, norm=True)
            if m.name in MIXERS:  # an unknown name fails in build_mixer, listing the valid ones
                place = {"layer_idx": i, "num_layers": config.n_layers}
                place["context_index"] = context_index
                fields = MIXERS[m.name].Config.model_fields
                options = {k: v for k, v in place.items() if k in fields} | options
                context_index += MIXERS[m.name].takes_context
            try:
                mixer = build_mixer(m.name, D, **options)
                channel = (
                    None
                    if c is None
                    else build_channel_mixer(c.name, D, **config.layer_options(c, norm=False))
                )
            except (ValueError, TypeError) as e:
                # torch's own errors carry a C++ location after the message: the message only
                text = str(e).split("\nException raised from")[0].strip()
                if "overflow" in text.lower():
                    text = f"a size overflows 64-bit indexing (an option too large): {text}"
                raise ValueError(f"layer {i} ({m}): {text}") from None
            self.blocks.append(Block(D, mixer, channel, config.norm_eps))
        self.norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=config.init_std)

    def forward(
        self, input_ids: torch.Tensor, state: list[State] | None = None, *, check_ids: bool = True
    ) -> LMOutput:
        """check_ids=False skips the check that the ids lie in [0, vocab_size), which reads them
        back to the host (a GPU caller waits for its queue): `generate` passes it for the tokens
        it sampled itself, so a decode step never waits."""
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be an int64/int32 tensor [B, T], got dtype {input_ids.dtype} "
                f"and shape {tuple(input_ids.shape)}"
            )
        bad = check_ids and input_ids.numel()
        if bad and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state holds {len(state)} layers, the model has {len(self.blocks)}")
        x = self.embed(input_ids)
        states, aux = [], x.new_zeros(())
        context = {}  # what a layer leaves later ones on these tokens (TokenMixer.takes_context)
        for i, block in enumerate(self.blocks):
            x, s, a = block(x, None if state is None else state[i], context)
            states.append(s)
            aux = aux + a
        return LMOutput(self.head(self.norm(x)), states, aux)

    def init_state(self, batch_size: int) -> list[State]:
        return [block.mixer.init_state(batch_size) for block in self.blocks]

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n if include_embedding else n - self.embed.weight.numel()

    def state_bytes_for(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the state the model holds after `seq_len` tokens of `batch_size` sequences."""
        return sum(block.mixer.state_bytes_for(batch_size, seq_len) for block in self.blocks)

    @staticmethod
    def copy_state(state: list[State]) -> list[State]:
        """A model state that shares no memory with `state`: continue each copy on its own (beam
        search, several continuations of one prompt)."""
        return [copy_state(s) for s in state]

    @staticmethod
    def state_bytes(state: list[State]) -> int:
        """Bytes of the tensors a model state really holds."""
        return sum(TokenMixer.state_bytes(s) for s in state)
