"""The classic gated RNNs as token mixers: LSTM (Hochreiter & Schmidhuber 1997, with a forget
gate) and GRU (Cho et al. 2014), with torch.nn.LSTM's / torch.nn.GRU's equations.

    o = rnn(x; W_ih, W_hh, b_ih, b_hh)     x [B, T, d_model] → o [B, T, H, N]
    y = o_proj(o.flatten(2))                [B, T, H·N] → [B, T, d_model]

The recurrence is seqlab.ops.rnn's op: PyTorch's fused kernel (`torch._VF.lstm` / `gru`, the one
torch.nn.LSTM / GRU run) for a sequence, the recurrent step for one token (cheaper than a fused
call there). `num_heads` H splits `hidden_size` into H independent recurrences of N = hidden_size
/ H units, each over the whole input (a block-diagonal recurrent weight: H times fewer recurrent
weights and FLOPs); H = 1 is exactly torch.nn.LSTM(d_model, hidden_size) followed by a Linear.

Init: the recurrence's weights and biases are parameters of the op (not nn.Linear layers), so the
init policy leaves them as built: torch.nn.LSTM / GRU's own init, every one uniform in ±N^-1/2
(the gates' pre-activations then have unit scale and the recurrence starts neither saturated nor
vanishing; N(0, init_std²) with init_std = 0.02 would leave W_hh h a hundredth of W_ih x). The
output projection `o_proj` follows the policy (N(0, out_init_std²)).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from seqlab.mixers.base import LayerFlops, MixerConfig, OpCall, State, TokenMixer
from seqlab.ops.rnn import GATES, rnn, rnn_flops, rnn_workspace_bytes


class RNNConfig(MixerConfig):
    """hidden_size: units of the recurrence, all heads together (default d_model); num_heads: H
    independent recurrences of hidden_size / H units each; bias: torch's two biases b_ih, b_hh."""

    hidden_size: PositiveInt | None = None
    num_heads: PositiveInt = 1
    bias: bool = True


class GatedRNN(TokenMixer):
    """An LSTM or GRU layer (the subclass names the `cell`). State: h [B, H, N] (and c for the
    LSTM), float32 (float64 with float64 parameters)."""

    Config = RNNConfig
    core_op: ClassVar[str] = "rnn"
    cell: ClassVar[str]
    matrices: ClassVar[tuple[str, ...]]  # the state's tensors, in the op's order
    output_proj = "o_proj"

    def __init__(self, d_model: int, config: RNNConfig | None = None):
        super().__init__(d_model, config)
        c = self.config
        hidden = d_model if c.hidden_size is None else c.hidden_size
        if hidden % c.num_heads:
            raise ValueError(
                f"hidden_size {hidden} must be a multiple of num_heads {c.num_heads}"
                + (" (hidden_size defaults to d_model)" if c.hidden_size is None else "")
            )
        self.num_heads = H = c.num_heads
        self.head_size = N = hidden // H
        G = GATES[self.cell]
        bound = N**-0.5  # torch.nn.LSTM / GRU's init for N units

        def uniform(*shape):
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.W_ih = uniform(H, G * N, d_model)
        self.W_hh = uniform(H, G * N, N)
        self.b_ih = uniform(H, G * N) if c.bias else None
        self.b_hh = uniform(H, G * N) if c.bias else None
        self.o_proj = nn.Linear(H * N, d_model, bias=False)

    @staticmethod
    def form(T: int) -> str:
        """One token is a decode step (the recurrent form); longer inputs run the fused kernel."""
        return "recurrent" if T == 1 else "fused"

    def init_state(self, batch_size: int) -> State:
        p = self.W_hh
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        shape = (batch_size, self.num_heads, self.head_size)
        return {name: torch.zeros(shape, dtype=dtype, device=p.device) for name in self.matrices}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        initial = None
        if state is not None:
            initial = (state["h"], state["c"]) if self.cell == "lstm" else state["h"]
        o, final = rnn(
            x,
            self.W_ih,
            self.W_hh,
            self.b_ih,
            self.b_hh,
            cell=self.cell,
            initial_state=initial,
            output_final_state=True,
            form=self.form(x.shape[1]),
        )
        final = final if self.cell == "lstm" else (final,)
        return self.o_proj(o.flatten(2)), dict(zip(self.matrices, final, strict=True))

    def flops(self, T: int) -> LayerFlops:
        dims = {"D": self.d_model, "N": self.head_size}
        prefill = rnn_flops(self.cell, self.form(T), T, self.num_heads, **dims)
        decode = rnn_flops(self.cell, "recurrent", 1, self.num_heads, **dims)
        return LayerFlops(self.projection_flops(), prefill, decode)

    def op_call(self) -> OpCall:
        return OpCall(self.cell, self.num_heads, {"D": self.d_model, "N": self.head_size}, {})

    def core_bytes(self, T: int, grad: bool) -> int:
        form = self.form(T)
        return rnn_workspace_bytes(self.cell, form, T, self.num_heads, grad, N=self.head_size)


class LSTM(GatedRNN):
    """torch.nn.LSTM's cell (gates i, f, g, o); state h, c [B, H, N]."""

    cell: ClassVar[str] = "lstm"
    matrices: ClassVar[tuple[str, ...]] = ("h", "c")
    examples: ClassVar[dict] = {
        "lstm": {},
        "lstm_heads": {"num_heads": 4, "hidden_size": 48},
    }


class GRU(GatedRNN):
    """torch.nn.GRU's cell (gates r, z, n; r applied to W_hn h + b_hn); state h [B, H, N]."""

    cell: ClassVar[str] = "gru"
    matrices: ClassVar[tuple[str, ...]] = ("h",)
    examples: ClassVar[dict] = {
        "gru": {},
        "gru_heads": {"num_heads": 2, "bias": False},
    }
