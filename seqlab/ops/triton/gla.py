"""Chunked gated linear recurrence on Triton: forward and backward as one autograd.Function.

The per-channel gate (GLA) needs its intra-chunk matrix A [C, C] from secondary chunking
(MATH.md §1): sub-chunks of c = 16; for a block of rows I and every earlier column j, with the
reference row n just before I, A_Ij = (Q_I ⊙ exp(b_I − b_n)) (k_j ⊙ exp(b_n − b_j))ᵀ, both
exponents ≤ 0; the diagonal [c, c] block is summed elementwise. Scalar gates form A inline in
chunk.py. A is stored as [B·T, H, C] float32: row t holds its chunk-local columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton._meta import SUB_CHUNK, Chunks, block, dot_precision, warps
from seqlab.ops.triton.chunk import (
    chunk_bwd_dh,
    chunk_bwd_dqk,
    chunk_bwd_dv,
    chunk_cumsum,
    chunk_fwd_h,
    chunk_fwd_o,
    chunk_position,
    chunk_rows,
    load_tile,
    load_tile_t,
)


@triton.jit(do_not_specialize=["T", "NT"])
def gla_intra_A_kernel(
    q,
    k,
    b,
    A,
    cu_seqlens,
    chunk_index,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """One program per (chunk, sub-chunk of rows I, head): A[I, :] [BC, BT]."""
    i_ci, i_h = tl.program_id(0), tl.program_id(1)
    i_c, i_s = i_ci // (BT // BC), i_ci % (BT // BC)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    base = bos + i_t * BT
    o_j = tl.arange(0, BT)
    o_r = i_s * BC + tl.arange(0, BC)
    m_j = i_t * BT + o_j < L
    m_r = i_t * BT + o_r < L
    before = (o_j < i_s * BC) & m_j
    row_n = base + tl.minimum(tl.maximum(i_s * BC - 1, 0), L - i_t * BT - 1)
    dt = q.dtype.element_ty

    acc = tl.zeros([BC, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_r = ((base + o_r)[:, None] * H + i_h) * K + o_k[None, :]
        m_rk = m_r[:, None] & m_k[None, :]
        b_q = tl.load(q + p_r, mask=m_rk, other=0).to(tl.float32)
        b_r = tl.load(b + p_r, mask=m_rk, other=0)
        b_n = tl.load(b + (row_n * H + i_h) * K + o_k, mask=m_k, other=0)
        p_jT = ((base + o_j)[None, :] * H + i_h) * K + o_k[:, None]
        m_jT = m_k[:, None] & m_j[None, :]
        kT = tl.load(k + p_jT, mask=m_jT, other=0).to(tl.float32)
        bT = tl.load(b + p_jT, mask=m_jT, other=0)
        q_dec = b_q * tl.exp(tl.where(m_rk, b_r - b_n[None, :], float("-inf")))
        m_before = m_k[:, None] & before[None, :]
        k_dec = kT * tl.exp(tl.where(m_before, b_n[:, None] - bT, float("-inf")))
        acc += tl.dot(q_dec.to(dt), k_dec.to(dt), input_precision=DOT)
        for jj in range(0, BC):
            j = i_s * BC + jj
            p_j = ((base + j) * H + i_h) * K + o_k
            m_jk = m_k & (i_t * BT + j < L)
            k_j = tl.load(k + p_j, mask=m_jk, other=0).to(tl.float32)
            b_j = tl.load(b + p_j, mask=m_jk, other=0)
            e = tl.where((o_r >= j)[:, None] & m_rk, b_r - b_j[None, :], float("-inf"))
            col = tl.sum(b_q * k_j[None, :] * tl.exp(e), 1)
            acc += tl.where(o_j[None, :] == j, col[:, None], 0)
    tl.store(A + ((base + o_r)[:, None] * H + i_h) * BT + o_j[None, :], acc, mask=m_r[:, None])


@triton.jit(do_not_specialize=["T", "NT"])
def gla_bwd_dA_kernel(
    v,
    do,
    dA,
    cu_seqlens,
    chunk_index,
    scale,
    T,
    NT,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """dA = scale · dO Vᵀ on j ≤ i, [B·T, H, BT] float32."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, _ = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_do = load_tile(do, rows, m_t, i_h, H, V, o_v)
        vT = load_tile_t(v, rows, m_t, i_h, H, V, o_v)
        acc += tl.dot(b_do, vT, input_precision=DOT)
    acc = tl.where((o_i[:, None] >= o_i[None, :]) & m_t[:, None], acc * scale, 0)
    tl.store(dA + (rows[:, None] * H + i_h) * BT + o_i[None, :], acc, mask=m_t[:, None])


@triton.jit(do_not_specialize=["T", "NT"])
def gla_intra_dqk_kernel(
    q,
    k,
    b,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_index,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """Intra-chunk dQ, dK of per-channel gates for the rows of sub-chunk I, float32:
        dq_i = Σ_{j ≤ i} dA_ij exp(b_i − b_j) ⊙ k_j,   dk_j = Σ_{i ≥ j} dA_ij exp(b_i − b_j) ⊙ q_i.
    Earlier columns go through the row n before I, later rows through the last row m of I."""
    i_k, i_ci, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_s = i_ci // (BT // BC), i_ci % (BT // BC)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    base = bos + i_t * BT
    o_j = tl.arange(0, BT)
    o_r = i_s * BC + tl.arange(0, BC)
    m_j = i_t * BT + o_j < L
    m_r = i_t * BT + o_r < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    row_n = base + tl.minimum(tl.maximum(i_s * BC - 1, 0), L - i_t * BT - 1)
    row_m = base + tl.minimum(i_s * BC + BC, L - i_t * BT) - 1
    dt = q.dtype.element_ty

    p_r = ((base + o_r)[:, None] * H + i_h) * K + o_k[None, :]
    m_rk = m_r[:, None] & m_k[None, :]
    b_r = tl.load(b + p_r, mask=m_rk, other=0)
    p_j = ((base + o_j)[:, None] * H + i_h) * K + o_k[None, :]
    m_jk = m_j[:, None] & m_k[None, :]
    b_all = tl.load(b + p_j, mask=m_jk, other=0)
    b_n = tl.load(b + (row_n * H + i_h) * K + o_k, mask=m_k, other=0)
    b_m = tl.load(b + (row_m * H + i_h) * K + o_k, mask=m_k, other=0)

    before = ((o_j < i_s * BC) & m_j)[:, None] & m_k[None, :]
    k_dec = tl.load(k + p_j, mask=m_jk, other=0) * tl.exp(
        tl.where(before, b_n[None, :] - b_all, float("-inf"))
    )
    p_dA = ((base + o_r)[:, None] * H + i_h) * BT + o_j[None, :]
    dA_r = tl.load(dA + p_dA, mask=m_r[:, None], other=0)
    b_dq = tl.dot(dA_r.to(dt), k_dec.to(dt), input_precision=DOT)
    b_dq *= tl.exp(tl.where(m_rk, b_r - b_n[None, :], float("-inf")))

    after = ((o_j >= i_s * BC + BC) & m_j)[:, None] & m_k[None, :]
    q_dec = tl.load(q + p_j, mask=m_jk, other=0) * tl.exp(
        tl.where(after, b_all - b_m[None, :], float("-inf"))
    )
    p_dAT = ((base + o_j)[None, :] * H + i_h) * BT + o_r[:, None]
    dAT = tl.load(dA + p_dAT, mask=m_j[None, :], other=0)
    b_dk = tl.dot(dAT.to(dt), q_dec.to(dt), input_precision=DOT)
    b_dk *= tl.exp(tl.where(m_rk, b_m[None, :] - b_r, float("-inf")))

    for jj in range(0, BC):
        j = i_s * BC + jj
        m_jj = i_t * BT + j < L
        p_jj = ((base + j) * H + i_h) * K + o_k
        b_jj = tl.load(b + p_jj, mask=m_k & m_jj, other=0)
        k_jj = tl.load(k + p_jj, mask=m_k & m_jj, other=0).to(tl.float32)
        q_jj = tl.load(q + p_jj, mask=m_k & m_jj, other=0).to(tl.float32)
        dA_col = tl.load(dA + ((base + o_r) * H + i_h) * BT + j, mask=m_r, other=0)
        dA_row = tl.load(dA + ((base + j) * H + i_h) * BT + o_r, mask=m_r & m_jj, other=0)
        e_q = tl.where((o_r >= j)[:, None] & m_rk, b_r - b_jj[None, :], float("-inf"))
        b_dq += dA_col[:, None] * k_jj[None, :] * tl.exp(e_q)
        e_k = tl.where((o_r <= j)[:, None] & m_rk & m_jj, b_jj[None, :] - b_r, float("-inf"))
        b_dk += dA_row[:, None] * q_jj[None, :] * tl.exp(e_k)
    tl.store(dq + p_r, b_dq, mask=m_rk)
    tl.store(dk + p_r, b_dk, mask=m_rk)


def gla_intra_A(q, k, b, ch: Chunks) -> torch.Tensor:
    _, _, H, K = q.shape
    A = q.new_empty(*q.shape[:3], ch.BT, dtype=torch.float32)
    gla_intra_A_kernel[(ch.NC * (ch.BT // SUB_CHUNK), H)](
        q, k, b, A, ch.cu_seqlens, ch.chunk_index, ch.T, ch.NT, H=H, K=K, BT=ch.BT,
        BC=SUB_CHUNK, BK=block(K), IS_VARLEN=ch.varlen, DOT=dot_precision(q.dtype),
        num_warps=warps("gla_intra_A", 4), num_stages=2,
    )  # fmt: skip
    return A


def gla_bwd_intra(q, k, v, b, do, scale, ch: Chunks):
    """The intra-chunk dQ, dK of per-channel gates, float32."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    dA = q.new_empty(*q.shape[:3], ch.BT, dtype=torch.float32)
    gla_bwd_dA_kernel[(ch.NC, H)](
        v, do, dA, ch.cu_seqlens, ch.chunk_index, scale, ch.T, ch.NT, H=H, V=V, BT=ch.BT,
        BV=block(V), IS_VARLEN=ch.varlen, DOT=dot_precision(q.dtype),
        num_warps=warps("gla_bwd_dA", 4), num_stages=2,
    )  # fmt: skip
    dq = torch.empty_like(q, dtype=torch.float32)
    dk = torch.empty_like(k, dtype=torch.float32)
    BK = block(K)
    gla_intra_dqk_kernel[(triton.cdiv(K, BK), ch.NC * (ch.BT // SUB_CHUNK), H)](
        q, k, b, dA, dq, dk, ch.cu_seqlens, ch.chunk_index, ch.T, ch.NT, H=H, K=K, BT=ch.BT,
        BC=SUB_CHUNK, BK=BK, IS_VARLEN=ch.varlen, DOT=dot_precision(q.dtype),
        num_warps=warps("gla_intra_dqk", 4), num_stages=2,
    )  # fmt: skip
    return dq, dk


class ChunkGatedLinear(torch.autograd.Function):
    """q, k [B, T, H, K], v [B, T, H, V], g None / [B, T, H] / [B, T, H, K], h0 [N, H, K, V]."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, ch: Chunks, output_final_state):
        b = None if g is None else chunk_cumsum(g, ch)
        A = gla_intra_A(q, k, b, ch) if g is not None and g.dim() == 4 else None
        h, ht, _ = chunk_fwd_h(k, v, b, h0, ch, output_final_state)
        o = chunk_fwd_o(q, k, v, b, A, h, scale, ch)
        ctx.save_for_backward(q, k, v, b, h0)
        ctx.scale, ctx.ch = scale, ch
        ctx.g_dtype = None if g is None else g.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, b, h0 = ctx.saved_tensors
        scale, ch = ctx.scale, ctx.ch
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        per_channel = b is not None and b.dim() == 4
        h, _, _ = chunk_fwd_h(k, v, b, h0, ch, False)
        A = gla_intra_A(q, k, b, ch) if per_channel else None
        dh, dh0, _ = chunk_bwd_dh(q, b, do, dht, scale, ch, ctx.needs_input_grad[4])
        dv = chunk_bwd_dv(q, k, b, A, do, dh, scale, ch)
        dq_i, dk_i = gla_bwd_intra(q, k, v, b, do, scale, ch) if per_channel else (None, None)
        dq, dk, _, dg = chunk_bwd_dqk(q, k, v, b, h, do, dh, scale, ch, None, dq_i, dk_i)
        dg = None if dg is None else dg.to(ctx.g_dtype)
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg, dh0, None, None, None
