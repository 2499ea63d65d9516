"""Chunked gated delta rule on Triton (UT / WY transform, MATH.md §2): one autograd.Function.

Per chunk, in parallel over chunks: X = M⁻¹ with M = I + diag(β) tril(Γ ⊙ K Kᵀ, −1), by forward
substitution over the C rows; W = X diag(β)(γ ⊙ K), U' = X diag(β) V. The state pass then runs
U = U' − W h_c and the gated linear chunk update with V → U (chunk.py, DELTA=True); the output is
the scalar-gate chunk output with V → U. X is kept in float32 as [B·T, H, C].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton._meta import Chunks, block, dot_precision, warps
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
    transpose_tile,
)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_fwd_kernel(
    k,
    v,
    beta,
    b,
    X,
    w,
    u,
    cu_seqlens,
    chunk_index,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, _ = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    dt = k.dtype.element_ty
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0).to(tl.float32)

    KK = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_tile(k, rows, m_t, i_h, H, K, o_k)
        KK += tl.dot(b_k, tl.trans(b_k), input_precision=DOT)
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    k_scale = b_beta
    if GATE == 1:
        b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
        KK *= tl.exp(tl.where(strict, b_t[:, None] - b_t[None, :], float("-inf")))
        k_scale *= tl.exp(b_t)
    else:
        KK = tl.where(strict, KK, 0)
    # Forward substitution: row i of X − I is −L_i − Σ_{j<i} L_ij (X − I)_j, L = diag(β) KK.
    Xn = -KK * b_beta[:, None]
    for i in range(1, BT):
        sel = o_i == i
        row = tl.sum(tl.where(sel[:, None], Xn, 0), 0)
        row += tl.sum(row[:, None] * Xn, 0) * (o_i < i)
        Xn = tl.where(sel[:, None], row[None, :], Xn)
    b_X = Xn + (o_i[:, None] == o_i[None, :])
    tl.store(X + (rows[:, None] * H + i_h) * BT + o_i[None, :], b_X, mask=m_t[:, None])

    b_Xd = b_X.to(dt)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_k, mask=m_k, other=0)
        b_w = tl.dot(b_Xd, (b_k * k_scale[:, None]).to(dt), input_precision=DOT)
        tl.store(w + p_k, b_w.to(w.dtype.element_ty), mask=m_k)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0)
        b_u = tl.dot(b_Xd, (b_v * b_beta[:, None]).to(dt), input_precision=DOT)
        tl.store(u + p_v, b_u.to(u.dtype.element_ty), mask=m_v)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_bwd_kernel(
    k,
    v,
    beta,
    b,
    X,
    dw,
    du,
    dk_part,
    db_part,
    dk,
    dv,
    dbeta,
    dg,
    scratch,
    cu_seqlens,
    chunk_index,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """Back through W = X diag(βγ) K, U' = X diag(β) V and X = M⁻¹ (dM = −Xᵀ dX Xᵀ); adds the
    results to dK and dL/db from chunk_bwd_dqk and turns dL/db into dL/dg."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, _ = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0).to(tl.float32)
    b_X = load_tile(X, rows, m_t, i_h, H, BT, o_i)
    XT = tl.trans(b_X)
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    k_scale = b_beta
    if GATE == 1:
        b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
        k_scale *= tl.exp(b_t)
        b_db = tl.load(db_part + rows * H + i_h, mask=m_t, other=0)

    KK = tl.zeros([BT, BT], dtype=tl.float32)
    dX = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_k, mask=m_k, other=0).to(tl.float32)
        b_dw = tl.load(dw + p_k, mask=m_k, other=0)
        KK += tl.dot(b_k, tl.trans(b_k), input_precision=DOT)
        dX += tl.dot(b_dw, tl.trans(b_k * k_scale[:, None]), input_precision=DOT)
        s = tl.sum(tl.dot(XT, b_dw, input_precision=DOT) * b_k, 1)  # Σ_k (Xᵀ dW) ⊙ K
        if GATE == 1:
            s *= tl.exp(b_t)
            b_db += s * b_beta
        b_dbeta += s
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0).to(tl.float32)
        b_du = tl.load(du + p_v, mask=m_v, other=0).to(tl.float32)
        dX += tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), input_precision=DOT)
        XtdU = tl.dot(XT, b_du, input_precision=DOT)
        tl.store(dv + p_v, (XtdU * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_v)
        b_dbeta += tl.sum(XtdU * b_v, 1)

    dM = -tl.dot(tl.dot(XT, dX, input_precision=DOT), XT, input_precision=DOT)
    dL = tl.where(strict, dM, 0)
    if GATE == 1:
        Gam = tl.exp(tl.where(strict, b_t[:, None] - b_t[None, :], float("-inf")))
    else:
        Gam = tl.where(strict, 1.0, 0.0)
    dKK = dL * Gam
    b_dbeta += tl.sum(dKK * KK, 1)
    dKK *= b_beta[:, None]
    if GATE == 1:
        P = dKK * KK  # dL ⊙ L: the gradient of each entry's exponent b_i − b_j
        b_db += tl.sum(P, 1) - tl.sum(P, 0)
        tl.store(dg + rows * H + i_h, tl.cumsum(b_db, 0, reverse=True), mask=m_t)
    dKKs = dKK + transpose_tile(dKK, scratch, BT)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_k, mask=m_k, other=0).to(tl.float32)
        b_dw = tl.load(dw + p_k, mask=m_k, other=0)
        b_dk = tl.load(dk_part + p_k, mask=m_k, other=0)
        b_dk += tl.dot(XT, b_dw, input_precision=DOT) * k_scale[:, None]
        b_dk += tl.dot(dKKs, b_k, input_precision=DOT)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_k)
    tl.store(dbeta + rows * H + i_h, b_dbeta, mask=m_t)


def wy_fwd(k, v, beta, b, ch: Chunks):
    """X [B, T, H, C] float32, W [B, T, H, K], U' [B, T, H, V]."""
    _, _, H, K = k.shape
    V = v.shape[-1]
    X = k.new_empty(*k.shape[:3], ch.BT, dtype=torch.float32)
    w, u = torch.empty_like(k), torch.empty_like(v)
    wy_fwd_kernel[(ch.NC, H)](
        k, v, beta, b, X, w, u, ch.cu_seqlens, ch.chunk_index, ch.T, ch.NT, H=H, K=K, V=V,
        BT=ch.BT, BK=block(K), BV=block(V), GATE=0 if b is None else 1, IS_VARLEN=ch.varlen,
        DOT=dot_precision(k.dtype), num_warps=warps("wy_fwd", 4), num_stages=2,
    )  # fmt: skip
    return X, w, u


def wy_bwd(k, v, beta, b, X, dw, du, dk_part, db_part, ch: Chunks):
    """dK (final), dV, dβ (float32) and dL/dg (float32, None without a gate)."""
    _, _, H, K = k.shape
    V = v.shape[-1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dbeta = beta.new_empty(beta.shape, dtype=torch.float32)
    dg = None if b is None else torch.empty_like(b)
    scratch = k.new_empty(ch.NC * H * ch.BT * ch.BT, dtype=torch.float32)  # transpose_tile
    wy_bwd_kernel[(ch.NC, H)](
        k, v, beta, b, X, dw, du, dk_part, db_part, dk, dv, dbeta, dg, scratch, ch.cu_seqlens,
        ch.chunk_index, ch.T, ch.NT, H=H, K=K, V=V, BT=ch.BT, BK=block(K), BV=block(V),
        GATE=0 if b is None else 1, IS_VARLEN=ch.varlen, DOT=dot_precision(k.dtype),
        num_warps=warps("wy_bwd", 8), num_stages=2,  # five [C, C] float32 tiles live at once
    )  # fmt: skip
    return dk, dv, dbeta, dg


class ChunkDeltaRule(torch.autograd.Function):
    """q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g None / [B, T, H], h0 [N, H, K, V]."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, ch: Chunks, output_final_state):
        b = None if g is None else chunk_cumsum(g, ch)
        X, w, u = wy_fwd(k, v, beta, b, ch)
        h, ht, v_new = chunk_fwd_h(k, u, b, h0, ch, output_final_state, w=w)
        o = chunk_fwd_o(q, k, v_new, b, None, h, scale, ch)
        ctx.save_for_backward(q, k, v, beta, b, X, w, u, h0)
        ctx.scale, ctx.ch = scale, ch
        ctx.g_dtype = None if g is None else g.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, b, X, w, u, h0 = ctx.saved_tensors
        scale, ch = ctx.scale, ctx.ch
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        h, _, v_new = chunk_fwd_h(k, u, b, h0, ch, False, w=w)
        dv_intra = chunk_bwd_dv(q, k, b, None, do, None, scale, ch)
        dh, dh0, du = chunk_bwd_dh(
            q, b, do, dht, scale, ch, ctx.needs_input_grad[5], k=k, w=w, dv=dv_intra
        )
        dq, dk_part, dw, db = chunk_bwd_dqk(q, k, v_new, b, h, do, dh, scale, ch, du=du)
        dk, dv, dbeta, dg = wy_bwd(k, v, beta, b, X, dw, du, dk_part, db, ch)
        dg = None if dg is None else dg.to(ctx.g_dtype)
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dbeta.to(beta.dtype), dg, dh0, None, None, None
