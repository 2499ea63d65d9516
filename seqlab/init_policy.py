"""The weight initialisation of every model seqlab builds, in one place.

`ModelConfig.init_std` (σ), `norm_eps` and `n_layers` (L) reach every layer through the configs
of its mixers (`MixerConfig`, `ChannelConfig` take `init_std`, `out_init_std`; `MixerConfig` also
`norm_eps`); a pattern option sets them for one layer, e.g. "gdn(init_std=0.01),attn".

Follows the policy:
- the token embedding (and an untied head): N(0, σ²);
- every `nn.Linear` of a token mixer and every weight matrix of a channel mixer (MoE's router,
  experts and constant-expert gates included): N(0, σ²), biases 0;
- each block's output projections, the ones that write into the residual stream (the token
  mixer's `TokenMixer.output_proj`, the channel mixer's `w_out`, MoE's experts' `w_out`):
  N(0, (σ / √(2L))²), GPT-2's residual scaling; `out_init_std` sets it explicitly;
- every norm (the blocks', the final one, the RMSNorm / GroupNorm inside mixers): eps = norm_eps,
  weight 1, bias 0.

Keeps the init its paper prescribes (not σ):
- parameters that are not `nn.Linear` layers: Mamba's A_log (S4D-real) and D; Mamba-2's and
  Gated DeltaNet's A_log and dt_bias (Δ log-uniform); S4D's log_dt, A (S4D-Lin / S4D-Inv), B, C,
  D; Hyena's order biases and Sin frequencies; the Hedgehog feature map (identity); LMU's A, B
  (fixed Legendre matrices, not parameters); the LSTM's and GRU's input and recurrent weights
  and biases (torch.nn.LSTM / GRU's uniform ±N^-1/2: a recurrence at σ would barely mix its
  state); sLSTM's recurrent weights R (zeros, as the xlstm package, or uniform ±d_model^-1/2)
  and forget-gate biases (the xlstm package's power-law ramp from 5 down to −7 per head);
- the `nn.Linear` layers under a mixer's `TokenMixer.paper_init`: Mamba's dt_proj (uniform
  ±dt_rank^-1/2 and the Δ bias), Hyena's implicit-filter MLP (PyTorch's fan-in init, which the
  Sin activations are tuned to), mLSTM's input and forget gates (zero weights, forget bias
  linspace(3, 6), input bias N(0, 0.1²));
- the depthwise short convolutions (`nn.Conv1d`): PyTorch's default, as the reference
  implementations keep it.
"""

from __future__ import annotations

import math

from pydantic import PositiveFloat
from torch import nn

from seqlab.config import Config

INIT_STD = 0.02
NORM_EPS = 1e-5


class InitOptions(Config):
    """The policy's options on a component config: weights N(0, init_std²), its output
    projection N(0, out_init_std²) (init_std when unset)."""

    init_std: PositiveFloat = INIT_STD
    out_init_std: PositiveFloat | None = None

    @property
    def output_std(self) -> float:
        return self.init_std if self.out_init_std is None else self.out_init_std


def depth_scaled_std(init_std: float, n_layers: int) -> float:
    """σ / √(2L): the std of the output projections of a model of L blocks (two residual
    writes per block)."""
    return init_std / math.sqrt(2 * n_layers)


def init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_linears(
    module: nn.Module, std: float, out_std: float, output: str, keep: tuple[str, ...] = ()
) -> None:
    """Every nn.Linear under `module` drawn from N(0, std²), the one named `output` from
    N(0, out_std²); those under a name in `keep` are left as built."""
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if any(name == k or name.startswith(k + ".") for k in keep):
            continue
        init_linear(layer, out_std if name == output else std)
