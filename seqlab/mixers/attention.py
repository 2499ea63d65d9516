"""Softmax attention mixer: RoPE, grouped-query heads, optional sliding window, KV-cache state."""

from __future__ import annotations

from einops import rearrange
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State, TokenMixer
from seqlab.mixers.dims import per_head
from seqlab.mixers.rope import positions, rotate, start_positions
from seqlab.ops.attention import KVCache, attention, attention_flops
from seqlab.parallel.lasp2 import sequence_op, slice_start


class AttentionConfig(MixerConfig):
    """num_kv_heads: key/value heads (None: num_heads); window: keys a query sees, itself
    included (None: all earlier tokens)."""

    num_heads: PositiveInt = 8
    num_kv_heads: PositiveInt | None = None
    window: PositiveInt | None = None
    rope_base: PositiveFloat = 10000.0


class Attention(TokenMixer):
    """State: "kv", the KVCache of k, v [B, Tc, Hkv, D] (RoPE already applied; Tc ≤ window − 1
    when windowed), and "pos" [B], the position of the next token. State bytes count the Tc
    tokens held; while decoding, an unwindowed cache's buffers also keep room for as many more
    (at least 64 tokens), so that a step need not copy them (seqlab.ops.attention)."""

    Config = AttentionConfig
    core_op = "attention"
    state_grows = True
    sequence_parallel = True
    examples = {
        "attn": {"num_heads": 4},
        "attn_gqa": {"num_heads": 4, "num_kv_heads": 2},
        "attn_window": {"num_heads": 4, "num_kv_heads": 2, "window": 5},
    }

    def __init__(self, d_model: int, config: AttentionConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads = {self.num_heads} must be a multiple of "
                f"num_kv_heads = {self.num_kv_heads}"
            )
        self.head_dim = per_head(d_model, self.num_heads, "d_model")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, kv_width, bias=False)
        self.v_proj = nn.Linear(d_model, kv_width, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B, T, _ = x.shape
        group = self.sequence_split(state)
        start = start_positions(B, x.device) if state is None else state["pos"]
        start = start + slice_start(T, group)  # a slice of a split sequence starts at r · T
        pos = positions(start, T)
        q, k, v = (
            rearrange(proj(x), "b t (h d) -> b t h d", d=self.head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = rotate(q, pos, self.config.rope_base), rotate(k, pos, self.config.rope_base)
        cache = None if state is None else state["kv"]
        o, cache = sequence_op(attention, group)(
            q, k, v, window=self.config.window, initial_state=cache, output_final_state=True
        )
        y = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
        return y, {"kv": cache, "pos": start + T}

    def state_bytes_for(self, batch_size: int, seq_len: int) -> int:
        """KV cache of min(seq_len, window − 1) tokens, plus the position counter."""
        window = self.config.window
        cached = seq_len if window is None else min(seq_len, window - 1)
        per_token = 2 * self.num_kv_heads * self.head_dim * self.k_proj.weight.element_size()
        return batch_size * (cached * per_token + 8)

    def flops(self, T: int) -> LayerFlops:
        H, d, w = self.num_heads, self.head_dim, self.config.window
        cached = T if w is None else min(T, w - 1)
        return LayerFlops(
            self.projection_flops(),
            attention_flops(T, H, d, d, window=w),
            attention_flops(1, H, d, d, cached=cached, window=w),
        )

    def op_call(self) -> OpCall:
        d = self.head_dim
        dims = {"K": d, "V": d}
        if self.num_kv_heads != self.num_heads:
            dims["Hkv"] = self.num_kv_heads
        options = {} if self.config.window is None else {"window": self.config.window}
        return OpCall("default", self.num_heads, dims, options)

    def core_bytes(self, T: int, grad: bool) -> int:
        """Causal SDPA is a fused kernel (no T × T tensor); a window builds a bool mask and the
        scores (measured)."""
        return 0 if self.config.window is None else T * T * (1 + 2 * self.num_heads)

    def init_state(self, batch_size: int) -> State:
        w = self.k_proj.weight
        empty = w.new_zeros(batch_size, 0, self.num_kv_heads, self.head_dim)
        cache = KVCache(empty, empty.clone())
        return {"kv": cache, "pos": start_positions(batch_size, w.device)}
