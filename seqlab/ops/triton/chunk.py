"""Chunk kernels shared by the gated linear recurrence and the gated delta rule.

Inside chunk c with entering state h_c [K, V] and in-chunk cumulative log-gate b (MATH.md §1):
    o   = scale · ((Q ⊙ exp(b)) h_c + A V),   A_ij = q_i·k_j exp(b_i − b_j) for j ≤ i
    h_c+1 = exp(b_last) ⊙ h_c + (K ⊙ exp(b_last − b))ᵀ V
The delta rule is the same chunk with V replaced by U = U' − W h_c (MATH.md §2), so the kernels
below take a DELTA switch. GATE: 0 none, 1 per-head scalar [B·T, H], 2 per-channel [B·T, H, K]
(its A comes from gla.py). Every exponent is b_i − b_j with j ≤ i, masked to −inf before exp;
rows past the end of a sequence are masked too, since their b is 0 and would make it positive.

Launch layout: the state passes (fwd_h, bwd_dh) run one program per (sequence, head, K/V block)
and loop over that sequence's chunks; everything else runs one program per chunk in parallel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton._meta import Chunks, block, dot_precision, warps


@triton.jit
def chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN: tl.constexpr):
    """Global chunk i_c → (first row of its sequence, sequence length, chunk within it)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_index + 2 * i_c)
        i_t = tl.load(chunk_index + 2 * i_c + 1)
        bos = tl.load(cu_seqlens + i_n)
        L = tl.load(cu_seqlens + i_n + 1) - bos
    else:
        i_n = i_c // NT
        i_t = i_c - i_n * NT
        bos = i_n * T
        L = T
    return bos.to(tl.int64), L, i_t


@triton.jit
def sequence_span(i_n, cu_seqlens, chunk_offsets, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence i_n → (first row, length, number of chunks, global index of its first chunk)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n)
        L = tl.load(cu_seqlens + i_n + 1) - bos
        n_chunks = tl.cdiv(L, BT)
        c0 = tl.load(chunk_offsets + i_n)
    else:
        bos = i_n * T
        L = T
        n_chunks = NT
        c0 = i_n * NT
    return bos.to(tl.int64), L, n_chunks, c0.to(tl.int64)


@triton.jit
def chunk_rows(bos, L, i_t, BT: tl.constexpr):
    """Chunk i_t of the sequence of L rows from row bos → its BT rows in the flat [B·T] layout,
    which of them are real (the last chunk may end early), and its last real row."""
    o_t = i_t * BT + tl.arange(0, BT)
    return bos + o_t, o_t < L, bos + tl.minimum(i_t * BT + BT, L) - 1


@triton.jit
def load_tile(x, rows, m_t, i_h, H: tl.constexpr, D: tl.constexpr, o_d):
    """x [B·T, H, D] at `rows` (where m_t), head i_h, columns o_d → [BT, BD], 0 where masked."""
    p = x + (rows[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=m_t[:, None] & (o_d < D)[None, :], other=0)


@triton.jit
def load_tile_t(x, rows, m_t, i_h, H: tl.constexpr, D: tl.constexpr, o_d):
    """The tile of `load_tile`, transposed: [BD, BT]."""
    p = x + (rows[None, :] * H + i_h) * D + o_d[:, None]
    return tl.load(p, mask=(o_d < D)[:, None] & m_t[None, :], other=0)


@triton.jit
def transpose_tile(x, scratch, BT: tl.constexpr):
    """xᵀ for a [BT, BT] tile that holds a tl.dot result, through this program's [BT, BT] slot of
    `scratch` (one per program of the grid, x's dtype): stored, a barrier, loaded transposed.
    Transposing it in registers (tl.trans) leaves it in the accumulator's layout, and a tl.dot
    on that is miscompiled on Hopper by Triton 3.4 to 3.7.0 (the GPU image has 3.6.0); the
    round trip stays in L2 (flash-linear-attention fixed its kernels the same way)."""
    pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    pid = pid * tl.num_programs(2) + tl.program_id(2)
    o = tl.arange(0, BT)
    slot = scratch + pid * BT * BT
    tl.store(slot + o[:, None] * BT + o[None, :], x)
    tl.debug_barrier()
    return tl.load(slot + o[None, :] * BT + o[:, None])


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_cumsum_kernel(
    g,
    b,
    cu_seqlens,
    chunk_index,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """b = cumsum of g within each chunk, float32: [B·T, H] or [B·T, H, K]."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, _ = chunk_rows(bos, L, i_t, BT)
    if PER_CHANNEL:
        o_k = tl.program_id(2) * BK + tl.arange(0, BK)
        p = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        x = tl.load(g + p, mask=m, other=0).to(tl.float32)
        tl.store(b + p, tl.cumsum(x, 0), mask=m)
    else:
        x = tl.load(g + rows * H + i_h, mask=m_t, other=0).to(tl.float32)
        tl.store(b + rows * H + i_h, tl.cumsum(x, 0), mask=m_t)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_fwd_h_kernel(
    k,
    v,
    w,
    b,
    h,
    h0,
    ht,
    v_new,
    cu_seqlens,
    chunk_offsets,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """The inter-chunk state pass: stores h_c (the state entering chunk c) for every chunk.
    DELTA: also stores U = U' − W h_c into v_new (the value that chunk c writes); BK ≥ K."""
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, L, n_chunks, c0 = sequence_span(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    dt = k.dtype.element_ty

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0).to(tl.float32)
    for i_t in range(0, n_chunks):
        i_c = c0 + i_t
        tl.store(h + (i_c * H + i_h) * K * V + p_kv, S.to(h.dtype.element_ty), mask=m_kv)
        rows, m_t, last = chunk_rows(bos, L, i_t, BT)
        kT = load_tile_t(k, rows, m_t, i_h, H, K, o_k)  # [BK, BT]
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0).to(tl.float32)  # [BT, BV]
        if DELTA:
            b_w = load_tile(w, rows, m_t, i_h, H, K, o_k)
            b_v -= tl.dot(b_w, S.to(dt), input_precision=DOT)
            tl.store(v_new + p_v, b_v.to(v_new.dtype.element_ty), mask=m_v)
        if GATE == 1:
            b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
            b_l = tl.load(b + last * H + i_h)
            S *= tl.exp(b_l)
            b_v *= tl.exp(tl.where(m_t, b_l - b_t, float("-inf")))[:, None]
        if GATE == 2:
            m_kt = (o_k < K)[:, None] & m_t[None, :]
            bT = load_tile_t(b, rows, m_t, i_h, H, K, o_k)
            b_l = tl.load(b + (last * H + i_h) * K + o_k, mask=o_k < K, other=0)
            S *= tl.exp(b_l)[:, None]
            kT = (kT * tl.exp(tl.where(m_kt, b_l[:, None] - bT, float("-inf")))).to(dt)
        S += tl.dot(kT, b_v.to(dt), input_precision=DOT)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_kv, S, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_fwd_o_kernel(
    q,
    k,
    v,
    b,
    A,
    h,
    o,
    cu_seqlens,
    chunk_index,
    scale,
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
    """o = scale · ((Q ⊙ exp(b)) h_c + A V); A formed here (GATE 0, 1) or read (GATE 2)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, _ = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    i_c = i_c.to(tl.int64)
    dt = q.dtype.element_ty

    acc = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = load_tile(q, rows, m_t, i_h, H, K, o_k)
        b_h = tl.load(
            h + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=(o_k < K)[:, None] & (o_v < V)[None, :],
            other=0,
        )
        if GATE == 2:
            b_b = load_tile(b, rows, m_t, i_h, H, K, o_k)
            acc += tl.dot((b_q * tl.exp(b_b)).to(dt), b_h, input_precision=DOT)
        else:
            kT = load_tile_t(k, rows, m_t, i_h, H, K, o_k)
            acc += tl.dot(b_q, b_h, input_precision=DOT)
            b_A += tl.dot(b_q, kT, input_precision=DOT)
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    if GATE == 0:
        b_A = tl.where(causal, b_A, 0)
    if GATE == 1:
        b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
        acc *= tl.exp(b_t)[:, None]
        b_A *= tl.exp(tl.where(causal, b_t[:, None] - b_t[None, :], float("-inf")))
    if GATE == 2:
        b_A = load_tile(A, rows, m_t, i_h, H, BT, o_i)
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_v = m_t[:, None] & (o_v < V)[None, :]
    b_v = tl.load(v + p_v, mask=m_v, other=0)
    acc += tl.dot(b_A.to(dt), b_v, input_precision=DOT)
    tl.store(o + p_v, (acc * scale).to(o.dtype.element_ty), mask=m_v)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_dh_kernel(
    q,
    k,
    w,
    b,
    do,
    dv,
    dh,
    dht,
    dh0,
    du,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """The reverse state pass: dh[c] = dL/dh_{c+1} (the gradient of the state leaving chunk c);
        dh_c = exp(b_last) dh_{c+1} + scale (Q ⊙ exp(b))ᵀ dO   [− Wᵀ dU for the delta rule].
    DELTA: dU = dv (the intra-chunk part) + (K ⊙ exp(b_last − b)) dh_{c+1}, stored to du."""
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, L, n_chunks, c0 = sequence_span(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    dt = q.dtype.element_ty

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0)
    for i_r in range(0, n_chunks):
        i_t = n_chunks - 1 - i_r
        i_c = c0 + i_t
        tl.store(dh + (i_c * H + i_h) * K * V + p_kv, dS.to(dh.dtype.element_ty), mask=m_kv)
        rows, m_t, last = chunk_rows(bos, L, i_t, BT)
        qT = load_tile_t(q, rows, m_t, i_h, H, K, o_k)
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + p_v, mask=m_v, other=0)
        if GATE == 1:
            b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
            b_l = tl.load(b + last * H + i_h)
        if DELTA:
            b_k = load_tile(k, rows, m_t, i_h, H, K, o_k)
            b_du = tl.load(dv + p_v, mask=m_v, other=0).to(tl.float32)
            if GATE == 1:
                b_k = (b_k * tl.exp(tl.where(m_t, b_l - b_t, float("-inf")))[:, None]).to(dt)
            b_du += tl.dot(b_k, dS.to(dt), input_precision=DOT)
            tl.store(du + p_v, b_du.to(du.dtype.element_ty), mask=m_v)
        if GATE == 1:
            dS *= tl.exp(b_l)
            qT = (qT * tl.exp(b_t)[None, :]).to(dt)
        if GATE == 2:
            bT = load_tile_t(b, rows, m_t, i_h, H, K, o_k)
            b_l = tl.load(b + (last * H + i_h) * K + o_k, mask=o_k < K, other=0)
            dS *= tl.exp(b_l)[:, None]
            qT = (qT * tl.exp(bT)).to(dt)
        dS += tl.dot(qT, b_do, input_precision=DOT) * scale
        if DELTA:
            wT = load_tile_t(w, rows, m_t, i_h, H, K, o_k)
            dS -= tl.dot(wT, b_du.to(dt), input_precision=DOT)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, dS, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_dv_kernel(
    q,
    k,
    b,
    A,
    do,
    dh,
    dv,
    cu_seqlens,
    chunk_index,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    USE_DH: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """dV = scale · Aᵀ dO [+ (K ⊙ exp(b_last − b)) dh_{c+1} when USE_DH]."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, last = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    i_c = i_c.to(tl.int64)
    dt = q.dtype.element_ty

    acc = tl.zeros([BT, BV], dtype=tl.float32)
    AT = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i]
    if GATE == 1:
        b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
        b_l = tl.load(b + last * H + i_h)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = load_tile(k, rows, m_t, i_h, H, K, o_k)
        if GATE != 2:
            AT += tl.dot(b_k, load_tile_t(q, rows, m_t, i_h, H, K, o_k), input_precision=DOT)
        if USE_DH:
            b_dh = tl.load(
                dh + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                mask=(o_k < K)[:, None] & (o_v < V)[None, :],
                other=0,
            )
            if GATE == 1:
                b_k = (b_k * tl.exp(tl.where(m_t, b_l - b_t, float("-inf")))[:, None]).to(dt)
            if GATE == 2:
                b_b = load_tile(b, rows, m_t, i_h, H, K, o_k)
                b_bl = tl.load(b + (last * H + i_h) * K + o_k, mask=o_k < K, other=0)
                b_k = (b_k * tl.exp(tl.where(m_tk, b_bl[None, :] - b_b, float("-inf")))).to(dt)
            acc += tl.dot(b_k, b_dh, input_precision=DOT)
    causal = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]  # AT[j, i]: j ≤ i, row i real
    if GATE == 0:
        AT = tl.where(causal, AT, 0)
    if GATE == 1:
        AT *= tl.exp(tl.where(causal, b_t[None, :] - b_t[:, None], float("-inf")))
    if GATE == 2:
        AT = load_tile_t(A, rows, m_t, i_h, H, BT, o_i)
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_v = m_t[:, None] & (o_v < V)[None, :]
    b_do = tl.load(do + p_v, mask=m_v, other=0)
    acc += tl.dot(AT.to(dt), b_do, input_precision=DOT) * scale
    tl.store(dv + p_v, acc.to(dv.dtype.element_ty), mask=m_v)


@triton.jit(do_not_specialize=["T", "NT", "TT"])
def chunk_bwd_dqk_kernel(
    q,
    k,
    v,
    b,
    h,
    do,
    dh,
    du,
    dq_intra,
    dk_intra,
    dq,
    dk,
    dw,
    db,
    scratch,
    cu_seqlens,
    chunk_index,
    scale,
    T,
    NT,
    TT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
):
    """dQ, dK for one K block of one chunk, and the gate gradient:
        dQ = scale · exp(b) ⊙ (dO h_cᵀ) + (dA ⊙ D) K,    dA = scale · dO Vᵀ (GATE 0, 1)
        dK = (dA ⊙ D)ᵀ Q + exp(b_last − b) ⊙ (V dh_{c+1}ᵀ)
    GATE 2 takes the intra-chunk parts from dq_intra / dk_intra (gla.py).
    With b the in-chunk cumulative gate, dL/db_i = q_i·dq_i − k_i·dk_i, plus ⟨dh_{c+1}, h_{c+1}⟩ at
    the chunk's last real row. Gated linear: db is reverse-cumsummed here into dL/dg ([NK, B·T, H]
    partial sums over K blocks for GATE 1). DELTA: v holds U, dW = −dU h_cᵀ is stored, and db is
    stored raw for the WY backward, which adds the terms through W and the UT matrix."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, i_t = chunk_position(i_c, cu_seqlens, chunk_index, T, NT, IS_VARLEN)
    rows, m_t, last = chunk_rows(bos, L, i_t, BT)
    o_i = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p_tk = (rows[:, None] * H + i_h) * K + o_k[None, :]
    i_c = i_c.to(tl.int64)
    dt = q.dtype.element_ty

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dw_acc = tl.zeros([BT, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)  # Σ_v h_c ⊙ dh_{c+1}
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = (rows[:, None] * H + i_h) * V + o_v[None, :]
        p_hT = (i_c * H + i_h) * K * V + o_k[None, :] * V + o_v[:, None]
        m_hT = (o_k < K)[None, :] & (o_v < V)[:, None]
        hT = tl.load(h + p_hT, mask=m_hT, other=0)  # [BV, BK]
        dhT = tl.load(dh + p_hT, mask=m_hT, other=0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0)
        dq_acc += tl.dot(b_do, hT, input_precision=DOT)
        dk_acc += tl.dot(b_v, dhT, input_precision=DOT)
        hdh += tl.sum(hT.to(tl.float32) * dhT.to(tl.float32), 0)
        if GATE != 2:
            b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=DOT)
        if DELTA:
            b_du = tl.load(du + p_tv, mask=m_tv, other=0)
            dw_acc += tl.dot(b_du.to(dt), hT, input_precision=DOT)

    b_q = tl.load(q + p_tk, mask=m_tk, other=0)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0)
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    n_last = tl.minimum(BT, L - i_t * BT) - 1  # the chunk's last real row
    if GATE == 0:
        b_dA = tl.where(causal, b_dA * scale, 0).to(dt)
        b_dq = dq_acc * scale + tl.dot(b_dA, b_k, input_precision=DOT)
        b_dk = dk_acc + tl.dot(transpose_tile(b_dA, scratch, BT), b_q, input_precision=DOT)
    if GATE == 1:
        b_t = tl.load(b + rows * H + i_h, mask=m_t, other=0)
        b_l = tl.load(b + last * H + i_h)
        D = tl.exp(tl.where(causal, b_t[:, None] - b_t[None, :], float("-inf")))
        b_dA = (b_dA * D * scale).to(dt)
        b_dq = dq_acc * (tl.exp(b_t) * scale)[:, None] + tl.dot(b_dA, b_k, input_precision=DOT)
        dk_state = dk_acc * tl.exp(tl.where(m_t, b_l - b_t, float("-inf")))[:, None]
        b_dA_t = transpose_tile(b_dA, scratch, BT)
        b_dk = dk_state + tl.dot(b_dA_t, b_q, input_precision=DOT)
        state = tl.exp(b_l) * tl.sum(hdh, 0) + tl.sum(tl.sum(b_k * dk_state, 1), 0)
        b_db = tl.sum(b_q * b_dq - b_k * b_dk, 1) + tl.where(o_i == n_last, state, 0)
    if GATE == 2:
        b_b = tl.load(b + p_tk, mask=m_tk, other=0)
        b_l = tl.load(b + (last * H + i_h) * K + o_k, mask=o_k < K, other=0)
        b_dq = dq_acc * tl.exp(b_b) * scale + tl.load(dq_intra + p_tk, mask=m_tk, other=0)
        dk_state = dk_acc * tl.exp(tl.where(m_tk, b_l[None, :] - b_b, float("-inf")))
        b_dk = dk_state + tl.load(dk_intra + p_tk, mask=m_tk, other=0)
        state = tl.exp(b_l) * hdh + tl.sum(b_k * dk_state, 0)
        b_db = b_q * b_dq - b_k * b_dk + tl.where(o_i == n_last, 1.0, 0.0)[:, None] * state[None, :]
        tl.store(db + p_tk, tl.cumsum(b_db, 0, reverse=True), mask=m_tk)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if DELTA:
        tl.store(dw + p_tk, -dw_acc, mask=m_tk)
    if GATE == 1:
        p_db = (i_k * TT + rows) * H + i_h
        if not DELTA:
            b_db = tl.cumsum(b_db, 0, reverse=True)
        tl.store(db + p_db, b_db, mask=m_t)


def chunk_cumsum(g: torch.Tensor, ch: Chunks) -> torch.Tensor:
    """In-chunk cumulative log-gate, float32, same shape as g ([B, T, H] or [B, T, H, K])."""
    b = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    H = g.shape[2]
    per_channel = g.dim() == 4
    K = g.shape[3] if per_channel else 1
    BK = block(K)
    grid = (ch.NC, H, triton.cdiv(K, BK)) if per_channel else (ch.NC, H)
    chunk_cumsum_kernel[grid](
        g, b, ch.cu_seqlens, ch.chunk_index, ch.T, ch.NT, H=H, K=K, BT=ch.BT, BK=BK,
        PER_CHANNEL=per_channel, IS_VARLEN=ch.varlen, num_warps=warps("chunk_cumsum", 4),
    )  # fmt: skip
    return b


def gate_kind(b: torch.Tensor | None) -> int:
    return 0 if b is None else (1 if b.dim() == 3 else 2)


def chunk_fwd_h(k, v, b, h0, ch: Chunks, output_final_state: bool, w=None):
    """States entering each chunk [NC, H, K, V] (in k's dtype), the final state [N, H, K, V]
    (float32) and, for the delta rule (w given), U [B, T, H, V]."""
    _, _, H, K = k.shape
    V = v.shape[-1]
    delta = w is not None
    BK = block(K, 256) if delta else block(K)
    BV = (32 if BK > 64 else 64) if delta else block(V)
    h = k.new_empty(ch.NC, H, K, V)
    ht = k.new_empty(ch.N, H, K, V, dtype=torch.float32) if output_final_state else None
    v_new = torch.empty_like(v) if delta else None
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), ch.N * H)
    chunk_fwd_h_kernel[grid](
        k, v, w, b, h, h0, ht, v_new, ch.cu_seqlens, ch.chunk_offsets, ch.T, ch.NT,
        H=H, K=K, V=V, BT=ch.BT, BK=BK, BV=BV, GATE=gate_kind(b), DELTA=delta,
        USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=ch.varlen,
        DOT=dot_precision(k.dtype), num_warps=warps("chunk_fwd_h", 4), num_stages=2,
    )  # fmt: skip
    return h, ht, v_new


def chunk_fwd_o(q, k, v, b, A, h, scale, ch: Chunks):
    _, _, H, K = q.shape
    V = v.shape[-1]
    BV = block(V)
    o = torch.empty_like(v)
    chunk_fwd_o_kernel[(triton.cdiv(V, BV), ch.NC, H)](
        q, k, v, b, A, h, o, ch.cu_seqlens, ch.chunk_index, scale, ch.T, ch.NT,
        H=H, K=K, V=V, BT=ch.BT, BK=block(K), BV=BV, GATE=gate_kind(b), IS_VARLEN=ch.varlen,
        DOT=dot_precision(q.dtype), num_warps=warps("chunk_fwd_o", 4), num_stages=2,
    )  # fmt: skip
    return o


def chunk_bwd_dh(q, b, do, dht, scale, ch: Chunks, want_dh0: bool, k=None, w=None, dv=None):
    """Gradients of the states leaving each chunk [NC, H, K, V], dL/dh0 (float32) and, for the
    delta rule (k, w, dv given), dU [B, T, H, V]."""
    _, _, H, K = q.shape
    V = do.shape[-1]
    delta = w is not None
    BK = block(K, 256) if delta else block(K)
    BV = (32 if BK > 64 else 64) if delta else block(V)
    dh = q.new_empty(ch.NC, H, K, V)
    dh0 = q.new_empty(ch.N, H, K, V, dtype=torch.float32) if want_dh0 else None
    du = torch.empty_like(do) if delta else None
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), ch.N * H)
    chunk_bwd_dh_kernel[grid](
        q, k, w, b, do, dv, dh, dht, dh0, du, ch.cu_seqlens, ch.chunk_offsets, scale, ch.T,
        ch.NT, H=H, K=K, V=V, BT=ch.BT, BK=BK, BV=BV, GATE=gate_kind(b), DELTA=delta,
        USE_DHT=dht is not None, STORE_DH0=want_dh0, IS_VARLEN=ch.varlen,
        DOT=dot_precision(q.dtype), num_warps=warps("chunk_bwd_dh", 4), num_stages=2,
    )  # fmt: skip
    return dh, dh0, du


def chunk_bwd_dv(q, k, b, A, do, dh, scale, ch: Chunks):
    """dV = scale · Aᵀ dO + (K ⊙ exp(b_last − b)) dh; without dh, only the intra-chunk part
    (float32: the delta rule adds the state part to it before rounding)."""
    _, _, H, K = q.shape
    V = do.shape[-1]
    BV = block(V)
    dv = torch.empty_like(do, dtype=do.dtype if dh is not None else torch.float32)
    chunk_bwd_dv_kernel[(triton.cdiv(V, BV), ch.NC, H)](
        q, k, b, A, do, dh, dv, ch.cu_seqlens, ch.chunk_index, scale, ch.T, ch.NT,
        H=H, K=K, V=V, BT=ch.BT, BK=block(K), BV=BV, GATE=gate_kind(b), USE_DH=dh is not None,
        IS_VARLEN=ch.varlen, DOT=dot_precision(q.dtype), num_warps=warps("chunk_bwd_dv", 4),
        num_stages=2,
    )  # fmt: skip
    return dv


def chunk_bwd_dqk(q, k, v, b, h, do, dh, scale, ch: Chunks, du=None, dq_intra=None, dk_intra=None):
    """dQ, dK and the gate gradient; see chunk_bwd_dqk_kernel. Returns (dq, dk, dw, db) where
    dw is None without du, and db is dL/dg (gated linear) or the raw dL/db (delta rule)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    BK = block(K)
    NK = triton.cdiv(K, BK)
    delta = du is not None
    gate = gate_kind(b)
    TT = q.shape[0] * q.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k, dtype=torch.float32) if delta else torch.empty_like(k)
    dw = torch.empty_like(k, dtype=torch.float32) if delta else None
    db = None
    if gate == 1:
        db = q.new_empty(NK, *b.shape, dtype=torch.float32)
    elif gate == 2:
        db = torch.empty_like(b)
    # dA's transpose goes through memory (transpose_tile); GATE 2 has no dA
    scratch = None if gate == 2 else q.new_empty(NK * ch.NC * H * ch.BT * ch.BT)
    chunk_bwd_dqk_kernel[(NK, ch.NC, H)](
        q, k, v, b, h, do, dh, du, dq_intra, dk_intra, dq, dk, dw, db, scratch, ch.cu_seqlens,
        ch.chunk_index, scale, ch.T, ch.NT, TT, H=H, K=K, V=V, BT=ch.BT, BK=BK, BV=block(V),
        GATE=gate, DELTA=delta, IS_VARLEN=ch.varlen, DOT=dot_precision(q.dtype),
        num_warps=warps("chunk_bwd_dqk", 4), num_stages=2,
    )  # fmt: skip
    if gate == 1:
        db = db.sum(0)
    return dq, dk, dw, db
