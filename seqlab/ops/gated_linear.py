"""Gated linear recurrence in three forms: recurrent (the reference), chunk, parallel.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

`g` is absent (linear attention), a per-head scalar [B, T, H] (RetNet, Mamba-2, simple GLA) or a
per-key-channel vector [B, T, H, K] (GLA, HGRN-2), always in log space and ≤ 0. Inside a chunk
every decay is written as exp(b_i − b_j) with j ≤ i, so strong decay underflows to zero and never
overflows (MATH.md §1).
"""

from __future__ import annotations

import functools

import torch

from seqlab.ops._common import (
    causal_decay,
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_initial_state,
    check_log_gate,
    check_qkv,
    check_scale,
    check_shape,
    check_tensor,
    compute_dtype,
    floor_log_gate,
    run_packed,
    run_sliced,
    to_chunks,
)
from seqlab.ops.triton import use_triton

SUB_CHUNK = 16  # per-channel gates: diagonal blocks of this size are formed elementwise


def _check(q, k, v, g, scale, initial_state, cu_seqlens, check_values=True):
    """Check the arguments (g's values only with `check_values`); return the scale and the
    packing offsets."""
    B, T, H, K, V = check_qkv(q, k, v)
    if g is not None:
        check_tensor("g", g)
        if g.dim() not in (3, 4):
            raise ValueError(
                f"g must have rank 3 [B, T, H] (per-head gate) or rank 4 [B, T, H, K] "
                f"(per-channel gate), got shape {tuple(g.shape)}"
            )
        if g.dim() == 3:
            check_shape("g", g, "BTH", (B, T, H))
        else:
            check_shape("g", g, "BTHK", (B, T, H, K))
        check_log_gate("g", g, q, values=check_values)
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_initial_state(initial_state, B, H, K, V, cu)
    return check_scale(scale, K), cu


def _prepare(q, k, v, g, scale, initial_state, cu_seqlens, check_values):
    """Check the arguments; return them cast to the compute dtype, with the packing offsets."""
    scale, cu = _check(q, k, v, g, scale, initial_state, cu_seqlens, check_values)
    dt = compute_dtype(q.dtype)
    cast = [None if x is None else x.to(dt) for x in (q, k, v, g, initial_state)]
    cast[3] = floor_log_gate(cast[3], dt)
    return cast, scale, cu


def _zero_state(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, _, H, K = q.shape
    return q.new_zeros(B, H, K, v.shape[-1])


def _recurrent(q, k, v, g, S, scale):
    """Loop over time; q, k [B, T, H, K], v [B, T, H, V], S [B, H, K, V]."""
    S = _zero_state(q, v) if S is None else S
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            decay = g[:, t].exp()
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1) * scale, S


def _intra_scalar(q, k, b):
    """A_ij = q_i·k_j exp(b_i − b_j), j ≤ i; q, k [..., C, K], b [..., C] → [..., C, C]."""
    A = q @ k.transpose(-1, -2)
    inplace = not torch.is_grad_enabled()  # A is fresh: no copy where autograd needs none
    if b is None:
        return A.tril_() if inplace else A.tril()
    gam = causal_decay(b)
    return A.mul_(gam) if inplace else A * gam


def _intra_channel(q, k, b, c):
    """A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk), j ≤ i; q, k, b [..., C, K] → [..., C, C].

    The chunk is cut into sub-chunks of c. Diagonal [c, c] blocks are formed elementwise from a
    [c, c, K] log-space tensor. Off-diagonal blocks (rows I after columns J) are one matmul,
    (Q_I ⊙ exp(b_I − b_m)) (K_J ⊙ exp(b_m − b_J))ᵀ with m the last row of J: both exponents ≤ 0.
    Without autograd, exponents are clamped to ≤ 0 and masked entries zeroed after the exp, in
    place (exp of a −inf mask is several times slower on a CPU); with autograd the mask is −inf
    before the exp, which keeps the backward pass shorter.
    """
    C = q.shape[-2]
    S = C // c
    inplace = not torch.is_grad_enabled()
    qs, ks, bs = (x.unflatten(-2, (S, c)) for x in (q, k, b))  # [..., S, c, K]
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)[..., None]
    E = bs[..., :, None, :] - bs[..., None, :, :]  # [..., S, c, c, K]: b_i − b_j
    if inplace:
        E = E.clamp_(max=0).exp_().masked_fill_(upper, 0.0)
        A_diag = E.mul_(qs[..., :, None, :]).mul_(ks[..., None, :, :]).sum(-1)  # [..., S, c, c]
    else:  # a −inf mask before the exp: fewer saved tensors, faster forward+backward here
        E = E.masked_fill_(upper, float("-inf")).exp()
        A_diag = (qs[..., :, None, :] * ks[..., None, :, :] * E).sum(-1)
    if S == 1:
        return A_diag[..., 0, :, :]
    bm = bs[..., -1, :]  # [..., S, K]: last row of each sub-chunk
    kt = ks * (bm[..., :, None, :] - bs).exp()  # [..., S_J, c, K]
    later = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)  # I > J
    off = bs[..., :, None, :, :] - bm[..., None, :, None, :]  # [..., S_I, S_J, c, K]
    if inplace:
        off = off.clamp_(max=0).exp_().masked_fill_(~later[:, :, None, None], 0.0)
        off = off.mul_(qs[..., :, None, :, :])
    else:
        off = off.masked_fill_(~later[:, :, None, None], float("-inf")).exp()
        off = qs[..., :, None, :, :] * off
    A_off = off @ kt[..., None, :, :, :].transpose(-1, -2)
    eye = torch.eye(S, dtype=q.dtype, device=q.device)[:, :, None, None]
    A = A_off + eye * A_diag[..., :, None, :, :]  # [..., S_I, S_J, c, c]
    return A.transpose(-3, -2).reshape(*A.shape[:-4], C, C)


def _chunk(q, k, v, g, S0, scale, chunk_size, sub_chunk=SUB_CHUNK):
    """The chunk form (`_chunk_core`), in time slices when autograd is off."""
    core = functools.partial(_chunk_core, sub_chunk=sub_chunk)
    weight = 4 if g is not None and g.dim() == 4 else 1
    return run_sliced(core, (q, k, v, g), S0, scale, chunk_size, weight)


def _chunk_core(q, k, v, g, S0, scale, chunk_size, sub_chunk=SUB_CHUNK):
    """Chunkwise-parallel form; the Python loop runs only over the T / C chunks."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [N·B·H, C, ·]
    if g is None:
        A = _intra_scalar(qc, kc, None)
        q_in, k_out, decay = qc, kc, None
    else:
        b = to_chunks(g, C).cumsum(1)  # [N·B·H, C] or [N·B·H, C, K]
        last = b[:, -1:]
        if g.dim() == 3:
            A = _intra_scalar(qc, kc, b)
            b, last = b[..., None], last[..., None]
        else:
            c = sub_chunk if C % sub_chunk == 0 else C
            A = _intra_channel(qc, kc, b, c)
        if torch.is_grad_enabled():
            q_in, k_out = qc * b.exp(), kc * (last - b).exp()
        else:  # qc, kc are fresh copies (to_chunks) and A is formed: update them in place
            q_in, k_out = qc.mul_(b.exp()), kc.mul_((last - b).exp_())
        decay = last.exp().transpose(1, 2)  # [N·B·H, 1 or K, 1]
    dS = (k_out.transpose(1, 2) @ vc).view(-1, B * H, K, V)  # each chunk's own contribution

    S = q.new_zeros(B * H, K, V) if S0 is None else S0.reshape(B * H, K, V)
    if decay is None:
        starts = torch.cat([S[None], dS[:-1]], 0).cumsum(0)
        S = starts[-1] + dS[-1]
    else:
        states = []
        for d_n, dS_n in zip(decay.view(-1, B * H, *decay.shape[1:]), dS, strict=True):
            states.append(S)
            S = torch.addcmul(dS_n, S, d_n)
        starts = torch.stack(states, 0)  # [N, B·H, K, V]: state entering each chunk
    o = torch.baddbmm(A @ vc, q_in, starts.view(-1, K, V)).mul_(scale)  # [N·B·H, C, V]
    return o, S.view(B, H, K, V)  # o in chunks: run_sliced lays it out


def _finish(o, S, q, output_final_state):
    return o.to(q.dtype), (S if output_final_state else None)


def recurrent_gated_linear(
    q,
    k,
    v,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    *,
    check_values=True,
):
    """Reference form: one state update per time step. Also the decode step (T = 1)."""
    args = (q, k, v, g, scale, initial_state, cu_seqlens, check_values)
    (qf, kf, vf, gf, S0), scale, cu = _prepare(*args)
    o, S = run_packed(_recurrent, cu, (qf, kf, vf, gf), S0, scale)
    return _finish(o, S, q, output_final_state)


def chunk_gated_linear(
    q,
    k,
    v,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=64,
    *,
    check_values=True,
):
    """Chunkwise-parallel form (the training form): quadratic within a chunk, recurrent across."""
    check_chunk_size(chunk_size)
    args = (q, k, v, g, scale, initial_state, cu_seqlens, check_values)
    (qf, kf, vf, gf, S0), scale, cu = _prepare(*args)
    o, S = run_packed(_chunk, cu, (qf, kf, vf, gf), S0, scale, chunk_size)
    return _finish(o, S, q, output_final_state)


def parallel_gated_linear(
    q,
    k,
    v,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    *,
    check_values=True,
):
    """Quadratic form: one [T, T] masked product ([T, T, K] for per-channel gates); an oracle."""
    args = (q, k, v, g, scale, initial_state, cu_seqlens, check_values)
    (qf, kf, vf, gf, S0), scale, cu = _prepare(*args)
    T = qf.shape[1] if cu is None else int((cu[1:] - cu[:-1]).max())
    o, S = run_packed(_chunk, cu, (qf, kf, vf, gf), S0, scale, T, T)
    return _finish(o, S, q, output_final_state)


def gated_linear(
    q,
    k,
    v,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    form="chunk",
    chunk_size=64,
    backend="auto",
    *,
    check_values=True,
):
    """The gated linear recurrence in the named form ("recurrent", "chunk" or "parallel").

    backend: "auto" runs the Triton kernels on CUDA tensors where they support the call and
    PyTorch elsewhere; "torch" or "triton" forces one (seqlab.ops.triton).
    check_values: False skips the check that g is finite and ≤ 0, which reads g back to the host,
    so a GPU caller waits for its queue on every call. The mixers pass False (their gates are
    log-sigmoids or −softplus, valid by construction), so a decode step never waits. Shapes,
    dtypes and devices are checked either way.
    """
    check_form(form)
    check_chunk_size(chunk_size)
    if use_triton(backend, form, chunk_size, (q, k, v, g, initial_state)):
        from seqlab.ops.triton import api

        scale, cu = _check(q, k, v, g, scale, initial_state, cu_seqlens, check_values)
        g = floor_log_gate(g, torch.float32)  # the kernels take exps in float32
        args = (q, k, v, g, scale, initial_state, output_final_state, cu)
        return api.gated_linear(*args, form, chunk_size)
    args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    checks = {"check_values": check_values}
    if form == "chunk":
        return chunk_gated_linear(*args, chunk_size=chunk_size, **checks)
    if form == "parallel":
        return parallel_gated_linear(*args, **checks)
    return recurrent_gated_linear(*args, **checks)
