"""The mLSTM layer of xLSTM (Beck et al. 2024; the xlstm package's mLSTMLayer):

    x_m, z = proj_up(x)                            (d_model → 2 E, E = proj_factor · d_model)
    c = silu(causal_conv(x_m))
    q, k = blockwise(c), v = blockwise(x_m)         (block-diagonal, blocks of qkv_blocksize)
    ĩ, f̃ = igate([q, k, v]), fgate([q, k, v])      (one pre-activation per head)
    h = mlstm(q, k, v, ĩ, f̃)                       (seqlab.ops.mlstm, H heads of E / H)
    y = o_proj((MultiHeadLayerNorm(h) + skip ⊙ c) ⊙ silu(z))

Prefill runs the chunk form, a decode step the recurrent form.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, OpCall, State
from seqlab.mixers.conv import ShortConv
from seqlab.mixers.recurrent import RecurrentConfig, RecurrentMixer
from seqlab.ops.mlstm import mlstm, mlstm_flops, mlstm_workspace_bytes, pack_state, unpack_state
from seqlab.ops.registry import Flops


class MLSTMConfig(RecurrentConfig):
    """num_heads: heads of the memory (head dim E / num_heads); proj_factor: the up-projection
    E = proj_factor · d_model; d_conv: width of the causal conv feeding q and k; qkv_blocksize:
    block size of the block-diagonal q, k, v projections."""

    num_heads: PositiveInt = 4
    proj_factor: PositiveFloat = 2.0
    d_conv: PositiveInt = 4
    qkv_blocksize: PositiveInt = 4


class BlockLinear(nn.Module):
    """Block-diagonal linear map (xlstm's LinearHeadwiseExpand): [.., n·b] → [.., n·b], one
    [b, b] matrix per block; the small init N(0, 2 / (5 fan)) of the paper, no bias."""

    def __init__(self, features: int, block: int, fan: int):
        super().__init__()
        if features % block:
            raise ValueError(f"{features} features do not split into blocks of {block}")
        self.block = block
        self.weight = nn.Parameter(torch.empty(features // block, block, block))
        nn.init.normal_(self.weight, std=math.sqrt(2 / (5 * fan)))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("...nd,nod->...no", x.unflatten(-1, (-1, self.block)), self.weight)
        return y.flatten(-2)


class MLSTM(RecurrentMixer):
    """State: C [B, H, K, V], n [B, H, K], m [B, H] (float32) and conv [B, d_conv − 1, E]."""

    Config = MLSTMConfig
    core_op: ClassVar[str] = "mlstm"
    matrices: ClassVar[tuple[str, ...]] = ("C", "n", "m")
    examples: ClassVar[dict] = {
        "mlstm": {"num_heads": 2, "chunk_size": 16},
        "mlstm_proj4": {"num_heads": 4, "proj_factor": 1.0, "qkv_blocksize": 2, "chunk_size": 8},
    }
    # the gates keep the paper's init: zero weights, forget bias linspace(3, 6), input bias
    # N(0, 0.1²)
    paper_init = ("igate", "fgate")

    def __init__(self, d_model: int, config: MLSTMConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        self.num_heads = H = c.num_heads
        self.d_inner = E = round(c.proj_factor * d_model)
        if E < H:  # E = 0 passed the multiple check and failed inside the conv
            raise ValueError(
                f"proj_factor = {c.proj_factor:g} is too small: proj_factor · d_model = "
                f"{c.proj_factor * d_model:g} rounds to {E} < num_heads ({H})"
            )
        if E % H or E % c.qkv_blocksize:
            raise ValueError(
                f"proj_factor · d_model = {E} must be a multiple of num_heads ({H}) and of "
                f"qkv_blocksize ({c.qkv_blocksize})"
            )
        self.head_dim = E // H
        self.proj_up = nn.Linear(d_model, 2 * E, bias=False)
        self.conv = ShortConv(E, c.d_conv, bias=True)
        self.q_proj, self.k_proj, self.v_proj = (
            BlockLinear(E, c.qkv_blocksize, d_model) for _ in range(3)
        )
        self.igate = nn.Linear(3 * E, H)
        self.fgate = nn.Linear(3 * E, H)
        with torch.no_grad():
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, std=0.1)
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, H))
        self.norm_weight = nn.Parameter(torch.ones(E))  # MultiHeadLayerNorm: weight, no bias
        self.skip = nn.Parameter(torch.ones(E))
        self.o_proj = nn.Linear(E, d_model, bias=False)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        H, D = self.num_heads, self.head_dim
        return {
            "C": (batch_size, H, D, D),
            "n": (batch_size, H, D),
            "m": (batch_size, H),
            "conv": (batch_size, self.config.d_conv - 1, self.d_inner),
        }

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        H, D = self.num_heads, self.head_dim
        x_m, z = self.proj_up(x).chunk(2, dim=-1)
        c, conv_state = self.conv(x_m, None if state is None else state["conv"])
        q, k, v = self.q_proj(c), self.k_proj(c), self.v_proj(x_m)
        qkv = torch.cat([q, k, v], -1)
        S0 = None if state is None else pack_state(state["C"], state["n"], state["m"])
        h, S = mlstm(
            q.unflatten(-1, (H, D)),
            k.unflatten(-1, (H, D)),
            v.unflatten(-1, (H, D)),
            self.igate(qkv),
            self.fgate(qkv),
            initial_state=S0,
            output_final_state=True,
            form=self.form(x.shape[1]),
            chunk_size=self.config.chunk_size,
            check_values=False,  # projections of finite activations; a check would sync
        )
        h = F.layer_norm(h, (D,), eps=self.config.norm_eps).flatten(-2) * self.norm_weight
        y = self.o_proj((h + self.skip * c) * F.silu(z))
        C, n, m = unpack_state(S)
        return y, {"C": C, "n": n, "m": m, "conv": conv_state}

    def flops(self, T: int) -> LayerFlops:
        E, H, D, C = self.d_inner, self.num_heads, self.head_dim, self.config.chunk_size
        per_token = self.projection_flops() + Flops(3 * 2 * E * self.config.qkv_blocksize)
        prefill = mlstm_flops(T, H, D, D, self.form(T), C)
        return LayerFlops(per_token, prefill, mlstm_flops(1, H, D, D, "recurrent"))

    def core_bytes(self, T: int, grad: bool) -> int:
        """The op's working memory (`mlstm_workspace_bytes`) in the form the layer runs."""
        D, C = self.head_dim, self.config.chunk_size
        return mlstm_workspace_bytes("default", self.form(T), T, self.num_heads, grad, D, D, C)

    def op_call(self) -> OpCall:
        dims = {"K": self.head_dim, "V": self.head_dim}
        return OpCall("default", self.num_heads, dims, {"chunk_size": self.config.chunk_size})
