"""Pure tensor ops: each recurrence family in equivalent forms that are tested to agree.

Shapes: q/k [B, T, H, K], v [B, T, H, V], state [B, H, K, V] (float32; float64 for float64 inputs).
Every op returns (o, final_state); final_state is None unless output_final_state=True.
"""

from seqlab.ops.delta_rule import (
    chunk_delta_rule,
    delta_rule,
    parallel_delta_rule,
    recurrent_delta_rule,
)
from seqlab.ops.gated_linear import (
    chunk_gated_linear,
    gated_linear,
    parallel_gated_linear,
    recurrent_gated_linear,
)
from seqlab.ops.triton import default_backend

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_linear",
    "default_backend",
    "delta_rule",
    "gated_linear",
    "parallel_delta_rule",
    "parallel_gated_linear",
    "recurrent_delta_rule",
    "recurrent_gated_linear",
]
