"""Fused recurrent kernel: one launch steps the state through every token (forward only).

The decode step (T = 1 with a carried state) and the recurrent form of both families. One
program per (sequence, head, V block) keeps its [K, BV] slice of the float32 state in registers,
so decode reads and writes the state once: 8·K·V bytes per head per token (MATH.md §6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton._meta import block, warps


@triton.jit(do_not_specialize=["T"])
def fused_recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = tl.load(cu_seqlens + i_n + 1) - bos
    else:
        bos = (i_n * T).to(tl.int64)
        L = T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_kv, mask=m_kv, other=0).to(tl.float32)
    for t in range(0, L):
        row = bos + t
        b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (row * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (row * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        if GATE == 1:
            S *= tl.exp(tl.load(g + row * H + i_h).to(tl.float32))
        if GATE == 2:
            b_g = tl.load(g + (row * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
            S *= tl.exp(b_g)[:, None]
        if DELTA:
            b_beta = tl.load(beta + row * H + i_h).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_k[:, None] * S, 0))
        S += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(S * b_q[:, None], 0) * scale
        tl.store(o + (row * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + p_kv, S, mask=m_kv)


def fused_recurrent(q, k, v, g, beta, scale, h0, output_final_state, cu, N):
    """q, k [B, T, H, K], v [B, T, H, V] (contiguous); cu: int32 offsets on the device or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BV = block(V, 32 if K > 64 else 64)
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    gate = 0 if g is None else (1 if g.dim() == 3 else 2)
    fused_recurrent_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, beta, o, h0, ht, cu, scale, T, H=H, K=K, V=V, BK=block(K, 256), BV=BV,
        GATE=gate, DELTA=beta is not None, USE_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=cu is not None, num_warps=warps("fused_recurrent", 4 if K * BV >= 4096 else 1),
    )  # fmt: skip
    return o, ht
