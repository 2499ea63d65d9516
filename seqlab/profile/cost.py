"""Analytic cost of mixers, channel mixers and whole models: parameters, FLOPs, state bytes.

    cost = model_cost(ModelConfig(vocab_size=256, d_model=512, n_layers=8, pattern="gdn*3,attn"),
                      seq_len=8192, dtype=torch.bfloat16)
    cost.params, cost.prefill.total / 8192, cost.decode.total, cost.state_bytes

Every number is for one sequence (multiply FLOPs and state by the batch size). `prefill` is the
forward pass over `seq_len` tokens in the form the mixers use for it (the chunk form, the
recurrent step for a single token, SDPA);
`decode` is one more token with `seq_len` tokens of context (the recurrent step, the KV cache).
Parameters are counted from the modules; state bytes
are what each mixer reports from the tensors it holds (`state_bytes_for`); FLOPs follow
seqlab.profile.flops, whose `matmul` part is what torch's FlopCounterMode counts.
A model given as a config is built on the meta device: no memory, any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqlab.channel import MLP, MoE, SwiGLU
from seqlab.mixers.base import TokenMixer
from seqlab.model.lm import Block, CausalLM, ModelConfig
from seqlab.profile.flops import (
    Flops,
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


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mixer_cost(mixer: TokenMixer, seq_len: int) -> Cost:
    """Cost of one token mixer on one sequence of `seq_len` tokens: its parameters counted from
    the module, its FLOPs from `mixer.flops` (seqlab.mixers.base), its state from the tensors
    it would hold (`state_bytes_for`)."""
    if not isinstance(mixer, TokenMixer):
        raise TypeError(f"{type(mixer).__name__} is not a TokenMixer (seqlab.mixers.base)")
    _check_seq_len(seq_len)
    layer = mixer.flops(seq_len)
    return Cost(
        seq_len,
        _params(mixer),
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
        return _params(channel), Flops(4 * D * channel.hidden)
    if isinstance(channel, SwiGLU):
        return _params(channel), Flops(6 * D * channel.hidden)
    if isinstance(channel, MoE):
        c, h = channel.config, channel.expert_hidden
        expert = 3 * D * h if c.expert_type == "swiglu" else 2 * D * h
        flops = 2 * D * channel.num_slots + 2 * expert * (c.top_k + int(c.shared_expert))
        flops += 2 * 3 * D * c.num_constant  # α for every token, then the routed values
        return _params(channel), Flops(flops)
    raise TypeError(f"no cost formula for channel mixer {type(channel).__name__}")


def block_cost(block: Block, seq_len: int) -> Cost:
    """A residual block: its norms, token mixer and channel mixer."""
    cost = mixer_cost(block.mixer, seq_len)
    per_token = Flops()
    if block.channel is not None:
        per_token = channel_cost(block.channel)[1]
    rest = _params(block) - cost.params  # norms and the channel mixer
    return cost + Cost(seq_len, rest, per_token * seq_len, per_token, 0)


def meta_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model of `config` on the meta device: shapes and dtypes without memory. A ValueError
    naming the sizes where a weight's element count overflows int64 (torch's RuntimeError)."""
    try:
        with torch.device("meta"):
            return CausalLM(config).to(dtype)
    except RuntimeError as e:
        if "overflow" not in str(e).lower():
            raise
        sizes = f"d_model {config.d_model}, n_layers {config.n_layers}, vocab_size "
        raise ValueError(
            f"the model is too large to build: a weight's size overflows 64-bit indexing "
            f"({sizes}{config.vocab_size}, pattern {config.pattern!r}): {e}"
        ) from None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied ones once), e.g. of one on the meta
    device: what building it for real allocates."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


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


def memory_bytes(model: CausalLM | ModelConfig, seq_len: int, batch_size: int = 1) -> dict:
    """Predicted peak memory above the weights, in bytes, of what `seqlab bench` runs on a batch:
    "forward" (no autograd), "forward_backward" (with the weights' gradients) and "decode"
    (a prefill, then steps). A coarse estimate from the layers' widths, meant to bound a
    measurement before it runs (within a small factor of the measured peak), not to report it."""
    if isinstance(model, ModelConfig):
        model = meta_model(model)
    _check_seq_len(seq_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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
        widest = max(widest, T * (2 * outs + 6 * D) * e + block.mixer.core_bytes(T, False))
        saved += T * (2 * (outs + ins) + 8 * D) * e + block.mixer.core_bytes(T, True)
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
