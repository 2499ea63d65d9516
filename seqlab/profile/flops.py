"""FLOPs of the ops in seqlab.ops, counted for the code as written, for one sequence.

A multiply-add is 2 FLOPs. `Flops.matmul` is the work done in matrix products (mm, bmm, SDPA,
convolution): exactly what `torch.utils.flop_counter.FlopCounterMode` reports for these ops,
padding of the last chunk included, except that attention here counts only the causally visible
query–key pairs, where the counter counts the dense score matrix (`causal=False` gives its count).
Without autograd the chunk forms run a long input in time slices (`seqlab.ops._common.SLICE_ROWS`):
a short last slice is then not padded to a whole chunk, and the count there can be lower.
`Flops.other` is the leading work the counter does not see: triangular solves, the elementwise
work of per-channel gates (the [C, C, K] tensor of the parallel form; the diagonal and the
scaled halves of the chunk form's recursive halving), the elementwise state update of a
recurrent step.
Gates, norms, activations and casts, O(width) per token, are left out of both.

Shape letters: T new tokens, Tc cached tokens, H heads, K key dim, V value dim, C chunk size,
N = ⌈T / C⌉ chunks, P the chunk size rounded up to a power of two (per-channel gates).
"""

from __future__ import annotations

from seqlab.ops.attention import attention_flops
from seqlab.ops.delta_rule import delta_rule_flops, unit_lower_inverse_flops
from seqlab.ops.gated_linear import Gate, gated_linear_flops
from seqlab.ops.registry import Flops

__all__ = [
    "Flops",
    "Gate",
    "attention_flops",
    "delta_rule_flops",
    "gated_linear_flops",
    "linear_flops",
    "unit_lower_inverse_flops",
]


def linear_flops(d_in: int, d_out: int) -> Flops:
    """One token through a [d_in → d_out] linear map (a bias add is not counted)."""
    return Flops(2 * d_in * d_out)
