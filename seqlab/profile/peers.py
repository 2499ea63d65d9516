"""Op-level cases: the core op of each mixer at its shapes, and the peers it is timed against.

    spec = op_spec(mixer)                          # e.g. gdn H=6 K=256 V=512 C=64
    impls = implementations(spec, peers_available(device))
    inputs = make_inputs(spec, B, T, dtype, device, generator)
    o = impls["seqlab"](inputs)                    # and impls["sdpa"], impls["fla"] where present

Every op takes [B, T, H, ·] tensors. Peers: a bare causal `scaled_dot_product_attention` on the
same B, T, H and head dims (always; q/k head dim K, v head dim V), and, on CUDA with fla-core
installed (flash-linear-attention's ops, `pip install seqlab[peers]`), fla's `chunk_gla`,
`chunk_simple_gla` and `chunk_gated_delta_rule` for the matching ops. fla's kernels are Triton
GPU kernels, so on CPU it is reported as unavailable, never imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from seqlab.mixers.attention import Attention
from seqlab.mixers.base import TokenMixer
from seqlab.mixers.deltanet import DeltaNet
from seqlab.mixers.gated_deltanet import GatedDeltaNet
from seqlab.mixers.gla import GLA
from seqlab.mixers.linear_attention import LinearAttention
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.retnet import RetNet
from seqlab.ops import delta_rule, gated_linear
from seqlab.ops.attention import attention
from seqlab.ops.triton import describe_backend
from seqlab.profile.flops import Flops, attention_flops, delta_rule_flops, gated_linear_flops

# op kind → the fla function that computes the same recurrence
FLA_OPS = {
    "gla": ("fla.ops.gla", "chunk_gla"),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gdn": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}


@dataclass(frozen=True)
class OpSpec:
    """kind: attn, linear_attn, simple_gla (per-head gate), gla (per-channel gate), deltanet or
    gdn; chunk_size 0 for attention."""

    kind: str
    heads: int
    kv_heads: int
    head_k: int
    head_v: int
    chunk_size: int

    @property
    def name(self) -> str:
        heads = f"H={self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "")
        chunk = f" C={self.chunk_size}" if self.chunk_size else ""
        return f"{self.kind} {heads} K={self.head_k} V={self.head_v}{chunk}"

    def flops(self, T: int) -> Flops:
        """Forward FLOPs of the seqlab op on one sequence of T tokens."""
        H, K, V, C = self.heads, self.head_k, self.head_v, self.chunk_size
        if self.kind == "attn":
            return attention_flops(T, H, K, V)
        if self.kind in ("deltanet", "gdn"):
            return delta_rule_flops(T, H, K, V, "chunk", C, gated=self.kind == "gdn")
        gate = {"linear_attn": "none", "simple_gla": "head", "gla": "channel"}[self.kind]
        return gated_linear_flops(T, H, K, V, gate, "chunk", C)

    def memory_bytes(
        self, T: int, batch_size: int, element_size: int, impl: str = "seqlab"
    ) -> dict[str, int]:
        """Predicted peak bytes of the op's inputs (made in float32, then cast) and of each
        pass of `impl` on a batch, "forward" and "forward_backward": a coarse bound, like
        seqlab.profile.cost.memory_bytes, to skip a length before its inputs are made.
        Measured on CPU at T = 8192: within 1.5x above the peak, the inputs included."""
        H, Hkv, K, V, C = self.heads, self.kv_heads, self.head_k, self.head_v, self.chunk_size
        gates = {"simple_gla": H, "gla": H * K, "gdn": 2 * H, "deltanet": H}.get(self.kind, 0)
        width = (H + Hkv) * K + Hkv * V
        made = batch_size * T * (width * (4 + element_size) + gates * 4)
        out = batch_size * T * H * V * element_size
        if impl == "sdpa" or self.kind == "attn":
            # a fused causal kernel where q/k and v share a head dim; else (on a CPU) the math
            # path, with T × T scores and weights in float32
            square = 0 if K == V else 12 * batch_size * H * T * T
            forward = made + out + square
            backward = 2 * (made + out) + square
        else:  # [C, C] blocks in float32 (GLA: [c, c, K]; delta rule: [K, K] per chunk)
            per_token = 6 * H * C * 4
            if self.kind == "gla":
                per_token += 6 * H * 16 * K * 4
            if self.kind in ("gdn", "deltanet"):  # W, U', U and the [K, K] maps per chunk
                per_token += 4 * H * (K + V) * 4 + 2 * H * K * K * 4 // C
            copies = batch_size * T * (width + gates + H * V) * 4  # float32 copies of inputs
            sliced = batch_size * min(T, 8192) * per_token  # no autograd: a slice at a time
            forward = made + out + copies + sliced
            backward = 2 * (made + out) + 3 * copies + batch_size * T * per_token
        return {"forward": int(1.25 * forward), "forward_backward": int(1.25 * backward)}


def op_spec(mixer: TokenMixer) -> OpSpec | None:
    """The core op a mixer runs, at the mixer's head shapes; None for a core op this
    comparison has no peers for (its family's own benchmark times it)."""
    if isinstance(mixer, Attention):
        d = mixer.head_dim
        return OpSpec("attn", mixer.num_heads, mixer.num_kv_heads, d, d, 0)
    if mixer.core_op not in ("gated_linear", "delta_rule"):
        return None
    C = mixer.config.chunk_size
    H = mixer.num_heads
    if isinstance(mixer, LinearAttention):
        V = mixer.head_v + 1 if mixer.config.normalize else mixer.head_v
        return OpSpec("linear_attn", H, H, mixer.head_f, V, C)
    if isinstance(mixer, RetNet):
        return OpSpec("simple_gla", H, H, mixer.head_k, mixer.head_v, C)
    if isinstance(mixer, Mamba2):
        return OpSpec("simple_gla", H, H, mixer.config.d_state, mixer.config.head_dim, C)
    if isinstance(mixer, GLA):
        return OpSpec("gla", H, H, mixer.head_k, mixer.head_v, C)
    if isinstance(mixer, GatedDeltaNet):
        return OpSpec("gdn", H, H, mixer.head_k, mixer.head_v, C)
    if isinstance(mixer, DeltaNet):
        return OpSpec("deltanet", H, H, mixer.head_k, mixer.head_v, C)
    raise TypeError(f"no op-level case for mixer {type(mixer).__name__}")


def peers_available(device: torch.device) -> dict[str, str]:
    """Each peer → what it is, or why it is not in this run (the text starts 'unavailable')."""
    peers = {"sdpa": f"torch {torch.__version__} F.scaled_dot_product_attention, causal"}
    if importlib.util.find_spec("fla") is None:
        peers["fla"] = "unavailable: fla-core is not installed (pip install seqlab[peers])"
    elif device.type != "cuda":
        peers["fla"] = "unavailable: fla's Triton kernels need a CUDA device"
    else:
        peers["fla"] = f"fla-core {importlib.import_module('fla').__version__}"
    return peers


Inputs = dict[str, Tensor]


def make_inputs(
    spec: OpSpec, B: int, T: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> Inputs:
    """q, k, v [B, T, H, ·] in `dtype`; log-gates g (float32, ≤ 0) and β in (0, 1) where the op
    has them; keys L2-normalised for the delta rule."""
    H, Hkv, K, V = spec.heads, spec.kv_heads, spec.head_k, spec.head_v

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    x = {"q": rand(B, T, H, K), "k": rand(B, T, Hkv, K), "v": rand(B, T, Hkv, V)}
    if spec.kind in ("deltanet", "gdn"):
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.sigmoid(rand(B, T, H))
    if spec.kind in ("simple_gla", "gdn"):
        x["g"] = F.logsigmoid(rand(B, T, H) + 3)
    elif spec.kind == "gla":
        x["g"] = F.logsigmoid(rand(B, T, H, K)) / 16
    return {n: t if n == "g" else t.to(dtype) for n, t in x.items()}


def _sdpa(x: Inputs) -> Tensor:
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)


def _seqlab(spec: OpSpec) -> Callable[[Inputs], Tensor]:
    def run(x: Inputs) -> Tensor:
        if spec.kind == "attn":
            return attention(x["q"], x["k"], x["v"])[0]
        q, k, v, g, C = x["q"], x["k"], x["v"], x.get("g"), spec.chunk_size
        # as the mixers call it: no value checks (they read g and β back to the host)
        opts = {"form": "chunk", "chunk_size": C, "check_values": False}
        if spec.kind in ("deltanet", "gdn"):
            return delta_rule(q, k, v, x["beta"], g, **opts)[0]
        return gated_linear(q, k, v, g, **opts)[0]

    return run


def seqlab_backend(spec: OpSpec, x: Inputs) -> str:
    """What seqlab's op runs these inputs on (its backend="auto" choice): "sdpa" for attention,
    else "triton" or "torch", with the reason where a GPU call falls back to PyTorch."""
    if spec.kind == "attn":
        return "sdpa"
    tensors = (x["q"], x["k"], x["v"], x.get("beta"), x.get("g"))
    return describe_backend("chunk", spec.chunk_size, tensors)


def _fla(kind: str) -> Callable[[Inputs], Tensor]:
    module, name = FLA_OPS[kind]
    fn = getattr(importlib.import_module(module), name)
    if kind == "gdn":
        return lambda x: fn(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"])[0]
    return lambda x: fn(x["q"], x["k"], x["v"], g=x["g"])[0]


def implementations(spec: OpSpec, peers: dict[str, str]) -> dict[str, Callable[[Inputs], Tensor]]:
    """ "seqlab" and each available peer for this op, all on the same inputs; the SDPA peer reads
    the [B, T, H, ·] inputs through a transposed view, as the seqlab attention op does."""
    impls = {"seqlab": _seqlab(spec), "sdpa": _sdpa}
    if spec.kind in FLA_OPS and not peers["fla"].startswith("unavailable"):
        impls["fla"] = _fla(spec.kind)
    return impls
