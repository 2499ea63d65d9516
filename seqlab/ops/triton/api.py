"""Entry points called by seqlab.ops after their argument checks: contiguous layouts, chunk
tables, and the choice between the chunk kernels (autograd) and the fused recurrent kernel."""

from __future__ import annotations

import torch

from seqlab.ops.triton._meta import chunks
from seqlab.ops.triton.delta import ChunkDeltaRule
from seqlab.ops.triton.gla import ChunkGatedLinear
from seqlab.ops.triton.recurrent import fused_recurrent


def _contiguous(*xs):
    return [None if x is None else x.contiguous() for x in xs]


def _recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, cu):
    N = q.shape[0] if cu is None else len(cu) - 1
    cu_dev = None if cu is None else cu.to(torch.int32).to(q.device, non_blocking=True)
    return fused_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, cu_dev, N)


def gated_linear(q, k, v, g, scale, initial_state, output_final_state, cu, form, chunk_size):
    """Arguments checked by seqlab.ops.gated_linear; `cu` is its CPU int64 offsets or None."""
    q, k, v, g, h0 = _contiguous(q, k, v, g, initial_state)
    if form == "recurrent":
        return _recurrent(q, k, v, g, None, scale, h0, output_final_state, cu)
    ch = chunks(q.shape[0], q.shape[1], chunk_size, cu, q.device)
    return ChunkGatedLinear.apply(q, k, v, g, h0, scale, ch, output_final_state)


def delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu, form, chunk_size):
    """Arguments checked by seqlab.ops.delta_rule; `cu` is its CPU int64 offsets or None."""
    q, k, v, beta, g, h0 = _contiguous(q, k, v, beta, g, initial_state)
    if form == "recurrent":
        return _recurrent(q, k, v, g, beta, scale, h0, output_final_state, cu)
    ch = chunks(q.shape[0], q.shape[1], chunk_size, cu, q.device)
    return ChunkDeltaRule.apply(q, k, v, beta, g, h0, scale, ch, output_final_state)
