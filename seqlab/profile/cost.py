"""Analytic cost of mixers, channel mixers and whole models: parameters, FLOPs, state bytes.

    cost = model_cost(ModelConfig(vocab_size=256, d_model=512, n_layers=8, pattern="gdn*3,attn"),
                      seq_len=8192, dtype=torch.bfloat16)
    cost.params, cost.prefill.total / 8192, cost.decode.total, cost.state_bytes

Every number is for one sequence (multiply FLOPs and state by the batch size). `prefill` is the
forward pass over `seq_len` tokens in the form the mixers use for it (the chunk form, the
recurrent step for a single token, SDPA);
`decode` is one more token with `seq_len` tokens of context (the recurrent step, the KV cache).
Parameters come from a formula per layer type (the tests hold them to `num_params`); state bytes
are what each mixer reports from the tensors it holds (`state_bytes_for`); FLOPs follow
seqlab.profile.flops, whose `matmul` part is what torch's FlopCounterMode counts.
A model given as a config is built on the meta device: no memory, any size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from seqlab.channel import MLP, MoE, SwiGLU
from seqlab.mixers.attention import Attention
from seqlab.mixers.base import TokenMixer
from seqlab.mixers.deltanet import DeltaNet
from seqlab.mixers.gated_deltanet import GatedDeltaNet
from seqlab.mixers.gla import GLA
from seqlab.mixers.linear_attention import LinearAttention
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.retnet import RetNet
from seqlab.model.lm import Block, CausalLM, ModelConfig
from seqlab.profile.flops import (
    Flops,
    attention_flops,
    delta_rule_flops,
    gated_linear_flops,
    linear_flops,
)


@dataclass(frozen=True)
class Cost:
    """Cost of one sequence of `seq_len` tokens."""

    seq_len: int
    params: int
    prefill: Flops  # forward over the seq_len tokens
    decode: Flops  # one more token, seq_len tokens of context
    state_bytes: int  # state / KV cache after seq_len tokens

    @property
    def prefill_per_token(self) -> float:
        return self.prefill.total / self.seq_len

    @property
    def train(self) -> Flops:
        """Forward + backward ≈ 3 × forward (MATH.md §6): an estimate, not a count."""
        return self.prefill * 3

    def __add__(self, other: Cost) -> Cost:
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot add costs at seq_len {self.seq_len} and {other.seq_len}")
        return Cost(
            self.seq_len,
            self.params + other.params,
            self.prefill + other.prefill,
            self.decode + other.decode,
            self.state_bytes + other.state_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "params": self.params,
            "prefill_flops": self.prefill.total,
            "prefill_matmul_flops": self.prefill.matmul,
            "prefill_flops_per_token": self.prefill_per_token,
            "decode_flops": self.decode.total,
            "decode_matmul_flops": self.decode.matmul,
            "state_bytes": self.state_bytes,
        }


class _Layer(NamedTuple):
    params: int
    per_token: Flops  # projections, convs, feature maps: the same for every token
    prefill: Flops  # the core op over T tokens
    decode: Flops  # the core op's step at context T


_MIXER_COSTS: dict[type, Callable[[Any, int], _Layer]] = {}


def _mixer(cls: type) -> Callable:
    def register(fn: Callable[[Any, int], _Layer]) -> Callable[[Any, int], _Layer]:
        _MIXER_COSTS[cls] = fn
        return fn

    return register


@_mixer(Attention)
def _attention(m: Attention, T: int) -> _Layer:
    D, H, d = m.d_model, m.num_heads, m.head_dim
    kv = m.num_kv_heads * d
    params = 2 * D * D + 2 * D * kv
    w = m.config.window
    cached = T if w is None else min(T, w - 1)
    return _Layer(
        params,
        linear_flops(D, D) * 2 + linear_flops(D, kv) * 2,
        attention_flops(T, H, d, d, window=w),
        attention_flops(1, H, d, d, cached=cached, window=w),
    )


def _gated_linear_layer(m, T: int, K: int, V: int, gate: str) -> tuple[Flops, Flops]:
    H, C = m.num_heads, m.config.chunk_size
    return (
        gated_linear_flops(T, H, K, V, gate, m.form(T), C),
        gated_linear_flops(1, H, K, V, gate, "recurrent"),
    )


@_mixer(LinearAttention)
def _linear_attention(m: LinearAttention, T: int) -> _Layer:
    D, H, K, V = m.d_model, m.num_heads, m.head_k, m.head_v
    params = 2 * D * H * K + 2 * D * H * V
    per_token = linear_flops(D, H * K) * 2 + linear_flops(D, H * V) + linear_flops(H * V, D)
    if m.config.feature_map == "hedgehog":
        hm = m.config.hedgehog_dim or K
        params += 2 * (H * K * hm + H * hm)
        per_token += Flops(2 * 2 * H * K * hm)  # q and k through their [H, K, m] maps
    V_core = V + 1 if m.config.normalize else V  # the denominator rides as a column of ones
    return _Layer(params, per_token, *_gated_linear_layer(m, T, m.head_f, V_core, "none"))


@_mixer(RetNet)
def _retnet(m: RetNet, T: int) -> _Layer:
    D, H, K, V = m.d_model, m.num_heads, m.head_k, m.head_v
    matrices = 2 * D * H * K + 3 * D * H * V
    params = matrices + 2 * H * V  # GroupNorm weight and bias
    return _Layer(params, Flops(2 * matrices), *_gated_linear_layer(m, T, K, V, "head"))


@_mixer(GLA)
def _gla(m: GLA, T: int) -> _Layer:
    D, H, K, V = m.d_model, m.num_heads, m.head_k, m.head_v
    r = m.config.gate_low_rank_dim
    matrices = 2 * D * H * K + 3 * D * H * V + D * r + r * H * K
    params = matrices + H * K + V  # gate bias, per-head norm weight
    return _Layer(params, Flops(2 * matrices), *_gated_linear_layer(m, T, K, V, "channel"))


@_mixer(Mamba2)
def _mamba2(m: Mamba2, T: int) -> _Layer:
    c = m.config
    D, E, H, N = m.d_model, m.d_inner, m.num_heads, c.d_state
    conv = E + 2 * N  # x, B, C go through the short conv
    matrices = D * (E + conv + H) + E * D
    params = matrices + conv * (c.d_conv + 1) + 3 * H + E  # conv weight + bias; dt, A, D; norm
    per_token = Flops(2 * matrices + 2 * conv * c.d_conv)
    return _Layer(params, per_token, *_gated_linear_layer(m, T, N, c.head_dim, "head"))


def _delta_rule_layer(m: DeltaNet | GatedDeltaNet, T: int, extra_matrices: int) -> _Layer:
    c = m.config
    D, H, K, V = m.d_model, m.num_heads, m.head_k, m.head_v
    width = H * (2 * K + V)
    matrices = D * width + D * H + H * V * D + extra_matrices
    if c.use_output_gate:
        matrices += D * H * V
    params = matrices + width * c.conv_size + V  # depthwise conv, per-head norm weight
    per_token = Flops(2 * matrices + 2 * width * c.conv_size)
    return _Layer(
        params,
        per_token,
        delta_rule_flops(T, H, K, V, m.form(T), c.chunk_size, gated=isinstance(m, GatedDeltaNet)),
        delta_rule_flops(1, H, K, V, "recurrent"),
    )


@_mixer(DeltaNet)
def _deltanet(m: DeltaNet, T: int) -> _Layer:
    return _delta_rule_layer(m, T, 0)


@_mixer(GatedDeltaNet)
def _gated_deltanet(m: GatedDeltaNet, T: int) -> _Layer:
    layer = _delta_rule_layer(m, T, m.d_model * m.num_heads)  # a_proj
    return layer._replace(params=layer.params + 2 * m.num_heads)  # A_log, dt_bias


def mixer_cost(mixer: TokenMixer, seq_len: int) -> Cost:
    """Cost of one token mixer on one sequence of `seq_len` tokens."""
    if type(mixer) not in _MIXER_COSTS:
        raise TypeError(
            f"no cost formula for {type(mixer).__name__}; seqlab.profile.cost knows "
            f"{', '.join(c.__name__ for c in _MIXER_COSTS)}"
        )
    _check_seq_len(seq_len)
    layer = _MIXER_COSTS[type(mixer)](mixer, seq_len)
    return Cost(
        seq_len,
        layer.params,
        layer.per_token * seq_len + layer.prefill,
        layer.per_token + layer.decode,
        mixer.state_bytes_for(1, seq_len),
    )


def channel_cost(channel: torch.nn.Module) -> tuple[int, Flops]:
    """(params, FLOPs per token) of a channel mixer.

    MoE counts every token's top_k slots as FFN experts: exact without zero-computation experts,
    an upper bound with them (a token sent to a zero, copy or constant slot skips its FFN).
    """
    D = channel.d_model
    if isinstance(channel, MLP):
        h, bias = channel.hidden, channel.config.bias
        return 2 * D * h + (h + D if bias else 0), Flops(4 * D * h)
    if isinstance(channel, SwiGLU):
        h, bias = channel.hidden, channel.config.bias
        return 3 * D * h + (2 * h + D if bias else 0), Flops(6 * D * h)
    if isinstance(channel, MoE):
        c, h = channel.config, channel.expert_hidden
        expert = 3 * D * h if c.expert_type == "swiglu" else 2 * D * h
        params = D * channel.num_slots + (c.num_experts + int(c.shared_expert)) * expert
        params += 3 * D * c.num_constant  # gate [2, D] and value [D] per constant expert
        flops = 2 * D * channel.num_slots + 2 * expert * (c.top_k + int(c.shared_expert))
        flops += 2 * 3 * D * c.num_constant  # α for every token, then the routed values
        return params, Flops(flops)
    raise TypeError(f"no cost formula for channel mixer {type(channel).__name__}")


def block_cost(block: Block, seq_len: int) -> Cost:
    """A residual block: its norms, token mixer and channel mixer."""
    D = block.mixer.d_model
    cost = mixer_cost(block.mixer, seq_len)
    params = D  # mixer_norm
    per_token = Flops()
    if block.channel is not None:
        channel_params, per_token = channel_cost(block.channel)
        params += D + channel_params
    return cost + Cost(seq_len, params, per_token * seq_len, per_token, 0)


def meta_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model of `config` on the meta device: shapes and dtypes without memory."""
    with torch.device("meta"):
        return CausalLM(config).to(dtype)


def model_cost(
    model: CausalLM | ModelConfig, seq_len: int, dtype: torch.dtype | None = None
) -> Cost:
    """Cost of a causal LM on one sequence; a config is built on the meta device in `dtype`
    (float32 by default), which sets the KV cache's bytes per element."""
    if isinstance(model, ModelConfig):
        model = meta_model(model, dtype or torch.float32)
    elif dtype is not None:
        raise ValueError("dtype applies to a ModelConfig; a built model has its own")
    _check_seq_len(seq_len)
    c = model.config
    embed = c.vocab_size * c.d_model
    head = linear_flops(c.d_model, c.vocab_size)
    cost = Cost(
        seq_len,
        embed * (1 if c.tie_embeddings else 2) + c.d_model,  # embedding, head, final norm
        head * seq_len,
        head,
        0,
    )
    for block in model.blocks:
        cost = cost + block_cost(block, seq_len)
    return cost


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")


def _core_bytes(mixer: TokenMixer, T: int, grad: bool) -> int:
    """Bytes the core op of `mixer` holds at once beyond its inputs, on one sequence: the
    [C, C] blocks of a chunk form in float32 (kept for the backward pass with `grad`, else
    formed a slice at a time), or attention's T × T scores where a mask is built (a window)."""
    if isinstance(mixer, Attention):
        if mixer.config.window is None:
            return 0  # causal SDPA: a fused kernel, no T × T tensor
        return T * T * (1 + 2 * mixer.num_heads)  # the bool mask, the scores (measured)
    H, C = mixer.num_heads, mixer.config.chunk_size
    per_token = 6 * H * C * 4  # A, decays, the solve's blocks, their float32 copies
    if isinstance(mixer, GLA):
        per_token += 2 * H * 16 * mixer.head_k * 4  # [c, c, K] sub-chunk blocks, c = 16
    return per_token * (T if grad else min(T, 8192))


def memory_bytes(model: CausalLM | ModelConfig, seq_len: int, batch_size: int = 1) -> dict:
    """Predicted peak memory above the weights, in bytes, of what `seqlab bench` runs on a batch:
    "forward" (no autograd), "forward_backward" (with the weights' gradients) and "decode"
    (a prefill, then steps). A coarse estimate from the layers' widths, meant to bound a
    measurement before it runs (within a small factor of the measured peak), not to report it."""
    if isinstance(model, ModelConfig):
        model = meta_model(model)
    _check_seq_len(seq_len)
    T, B, c = seq_len, batch_size, model.config
    e = next(model.parameters()).element_size()
    params = sum(p.numel() for p in model.parameters())
    D, vocab = c.d_model, c.vocab_size
    widest, saved = 0, 0
    for block in model.blocks:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        outs = sum(m.out_features for m in linears)
        ins = sum(m.in_features for m in linears)
        # every projection's output, float32 copies in the op, norms and the residual
        widest = max(widest, T * (2 * outs + 6 * D) * e + _core_bytes(block.mixer, T, False))
        saved += T * (2 * (outs + ins) + 8 * D) * e + _core_bytes(block.mixer, T, True)
    ids = 8 * (T + 1)
    logits = T * vocab * e
    forward = ids + B * (widest + 2 * T * D * e + logits)
    backward = ids + B * (saved + logits * (2 + 8 // e) + widest) + 2 * params * e
    decode = forward + B * model.state_bytes_for(1, T + 64)
    margin = 1.25  # measured peaks on CPU came within 0.8x of the unmargined estimate
    return {
        name: int(margin * n)
        for name, n in (("forward", forward), ("forward_backward", backward), ("decode", decode))
    }
