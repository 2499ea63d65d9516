"""Gated linear recurrence in three forms: recurrent (the reference), chunk, parallel.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

`g` is absent (linear attention), a per-head scalar [B, T, H] (RetNet, Mamba-2, simple GLA) or a
per-key-channel vector [B, T, H, K] (GLA, HGRN-2), always in log space and ≤ 0. Inside a chunk
every decay is written as exp(b_i − b_j) with j ≤ i, so it never overflows (MATH.md §1), and its
exponent is clamped at `_common.exp_floor` (−30 in float32, −80 in float64), so strong decay
costs no time (the slow paths of exp, matmuls and multiplies for values below the normal range)
and changes nothing above round-off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Literal

import torch

from seqlab.ops._common import (
    SLICE_ROWS,
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
    chunk_count,
    compute_dtype,
    decay_exp,
    floor_log_gate,
    outside_autocast,
    run_packed,
    run_sliced,
    to_chunks,
)
from seqlab.ops.attention import sdpa_peer, sdpa_workspace_bytes
from seqlab.ops.registry import Flops, OpFamily, register_family
from seqlab.ops.triton import family_backend, use_triton


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


def _intra_channel(q, k, b):
    """A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk), j ≤ i; q, k, b [..., C, K] → [..., C, C].

    Elementwise from one [C, C, K] log-space tensor: the parallel form's oracle (the chunk form
    uses `_intra_channel_av`, which forms no such tensor). Exponents are clamped to
    [exp_floor, 0] and the upper part zeroed after the exp (exp of −inf is slow on a CPU).
    """
    C = q.shape[-2]
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)[..., None]
    E = b[..., :, None, :] - b[..., None, :, :]  # [..., C, C, K]: b_i − b_j
    if not torch.is_grad_enabled():
        E = decay_exp(E, inplace=True).masked_fill_(upper, 0.0)
        return E.mul_(q[..., :, None, :]).mul_(k[..., None, :, :]).sum(-1)
    E = decay_exp(E).masked_fill(upper, 0.0)
    return (q[..., :, None, :] * k[..., None, :, :] * E).sum(-1)


def _intra_channel_av(q, k, v, b):
    """(A V)_i = Σ_{j ≤ i} A_ij v_j with A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk): the intra-chunk
    output of per-channel gates; q, k, b [L, C, K], v [L, C, V] → [L, C, V].

    By recursive halving, matmul-shaped and stable, with no [C, C, K] tensor. The diagonal is
    A_ii = q_i·k_i. For the rest, the chunk (zero-padded to a power of two P) is cut into blocks
    of 2s rows, s = 1, 2, 4, ..., P/2: in each block, the second half I takes from the first
    half J through (Q_I ⊙ exp(b_I − b_m)) (K_J ⊙ exp(b_m − b_J))ᵀ V_J, with m the last row of J,
    so both exponents are ≤ 0. Every pair j < i meets in exactly one block (the smallest holding
    both). Per level that is elementwise work on [P, K] and matmuls of [s, K] @ [K, s] @ [s, V];
    log2(P) levels in all, so the elementwise work per row is O(K log C), not O(K c) for the
    [c, c, K] diagonal blocks of a sub-chunked form, and the backward pass is autograd's over
    these few tensors.
    """
    L, C, K = q.shape
    V = v.shape[-1]
    P = 1 << (C - 1).bit_length()
    if P != C:  # zero rows at the end add nothing; b repeats its last row, so exponents stay ≤ 0
        pad = (0, 0, 0, P - C)
        q, k, v = (torch.nn.functional.pad(x, pad) for x in (q, k, v))
        b = torch.cat([b, b[:, -1:].expand(L, P - C, K)], 1)
    inplace = not torch.is_grad_enabled()
    out = (q * k).sum(-1, keepdim=True) * v  # the diagonal, A_ii = q_i·k_i
    s = 1
    while s < P:
        n = P // (2 * s)
        qI, bI = q.view(L, n, 2, s, K)[:, :, 1], b.view(L, n, 2, s, K)[:, :, 1]
        kJ, bJ = k.view(L, n, 2, s, K)[:, :, 0], b.view(L, n, 2, s, K)[:, :, 0]
        bm = bJ[:, :, -1:]  # [L, n, 1, K]: the last row of each first half
        qt = decay_exp(bI - bm, inplace)  # [L, n, s, K]
        kt = decay_exp(bm - bJ, inplace)
        qt, kt = (qt.mul_(qI), kt.mul_(kJ)) if inplace else (qt * qI, kt * kJ)
        vJ = v.view(L, n, 2, s, V)[:, :, 0]
        out.view(L, n, 2, s, V)[:, :, 1] += (qt @ kt.transpose(-1, -2)) @ vJ
        s *= 2
    return out[:, :C] if P != C else out


def _chunk(q, k, v, g, S0, scale, chunk_size, split=True):
    """The chunk form (`_chunk_core`), in time slices when autograd is off."""
    core = functools.partial(_chunk_core, split=split)
    return run_sliced(core, (q, k, v, g), S0, scale, chunk_size)


def _chunk_core(q, k, v, g, S0, scale, chunk_size, split=True):
    """Chunkwise-parallel form; the Python loop runs only over the T / C chunks.

    split: per-channel gates form the intra-chunk output by recursive halving
    (`_intra_channel_av`); False forms A elementwise (`_intra_channel`, the parallel form).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [N·B·H, C, ·]
    inplace = not torch.is_grad_enabled()
    AV = None  # the intra-chunk output A V, where it is formed without A
    if g is None:
        A = _intra_scalar(qc, kc, None)
        q_in, k_out, decay = qc, kc, None
    else:
        b = to_chunks(g, C).cumsum(1)  # [N·B·H, C] or [N·B·H, C, K]
        last = b[:, -1:]
        if g.dim() == 3:
            A = _intra_scalar(qc, kc, b)
            b, last = b[..., None], last[..., None]
        elif split:
            AV = _intra_channel_av(qc, kc, vc, b)
        else:
            A = _intra_channel(qc, kc, b)
        # qc, kc are fresh copies (to_chunks) and A (A V) is formed: without autograd they are
        # updated in place
        q_in = qc.mul_(decay_exp(b)) if inplace else qc * decay_exp(b)
        k_out = kc.mul_(decay_exp(last - b, inplace)) if inplace else kc * decay_exp(last - b)
        decay = decay_exp(last).transpose(1, 2)  # [N·B·H, 1 or K, 1]
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
    AV = A @ vc if AV is None else AV
    starts = starts.view(-1, K, V)
    # [N·B·H, C, V]; in place without autograd (A V is fresh): no copy of A V
    o = torch.baddbmm(AV, q_in, starts, out=AV) if inplace else torch.baddbmm(AV, q_in, starts)
    o = o.mul_(scale)
    return o, S.view(B, H, K, V)  # o in chunks: run_sliced lays it out


def _finish(o, S, q, output_final_state):
    return o.to(q.dtype), (S if output_final_state else None)


@outside_autocast
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


@outside_autocast
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


@outside_autocast
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
    o, S = run_packed(_chunk, cu, (qf, kf, vf, gf), S0, scale, T, False)
    return _finish(o, S, q, output_final_state)


@outside_autocast
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


Gate = Literal["none", "head", "channel"]


def gated_linear_flops(
    T: int, H: int, K: int, V: int, gate: Gate = "none", form: str = "chunk", chunk_size: int = 64
) -> Flops:
    """`gated_linear` over T tokens in the named form ("chunk", "parallel" or "recurrent").

    Per chunk and head: A = Q Kᵀ [C, C] (2C²K), dS = Kᵀ V (2CKV), O = Q S₀ + A V (2CKV + 2C²V);
    so ≈ 2C(K + V) + 4KV per token, MATH.md §6. Per-channel gates: the chunk form forms A V by
    recursive halving of the chunk padded to P rows (`_intra_channel_av`): at block size 2s,
    P / 2s products [s, K] @ [K, s] @ [s, V], P(P − 1)(K + V) over all levels, elementwise the
    diagonal qᵢ·kᵢ vᵢ and the scaled halves (PK per level); the parallel form forms A from an
    elementwise [C, C, K] tensor. The recurrent form reads out Sᵀq by a matmul (2KV) and updates
    S elementwise.
    """
    if form == "recurrent":
        update = (3 if gate != "none" else 2) * K * V  # decay, outer product k vᵀ, add
        return Flops(2 * K * V, update) * (H * T)
    C, N = chunk_count(T, T if form == "parallel" else chunk_size)
    matmul = 4 * C * K * V
    other = 0
    if gate == "channel" and form == "chunk":
        P = 1 << (C - 1).bit_length()
        matmul += P * (P - 1) * (K + V)
        other = P * (2 * K + V) + (P.bit_length() - 1) * P * K
    elif gate == "channel":
        matmul += 2 * C * C * V
        other = 3 * C * C * K  # [C, C, K]: products, products, sums
    else:
        matmul += 2 * C * C * K + 2 * C * C * V
    return Flops(matmul, other) * (H * N)


def _family_inputs(variant, B, T, H, dtype=torch.float32, generator=None, K=64, V=64):
    """q, k, v and, for a gated variant, log-decays logsigmoid(z), z standard normal: a median
    of about −0.7 per step with a tail of strong decay, as trained models have."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K) / K**0.5, "v": randn(B, T, H, V)}
    if variant != "none":
        x["g"] = torch.nn.functional.logsigmoid(
            randn(B, T, H, *([K] if variant == "channel" else []))
        )
    return {n: t.to(dtype) for n, t in x.items()}


def fla_loader(module: str, name: str):
    """flash-linear-attention's `module.name` where fla-core is installed and a CUDA device is
    here (its kernels are Triton GPU kernels), else None; fla is never imported on a CPU-only
    machine."""
    if importlib.util.find_spec("fla") is None or not torch.cuda.is_available():
        return None
    return getattr(importlib.import_module(module), name)


def _fla_peer():
    """fla's chunk_simple_gla (no or a per-head gate) and chunk_gla (a per-channel gate), on the
    same [B, T, H, ·] inputs."""
    simple = fla_loader("fla.ops.simple_gla", "chunk_simple_gla")
    gla = fla_loader("fla.ops.gla", "chunk_gla")
    if simple is None or gla is None:
        return None

    def run(q, k, v, g=None, **_):
        if g is not None and g.dim() == 4:
            return gla(q, k, v, g=g)[0]
        return simple(q, k, v, g=g)[0]

    return run


def gated_linear_workspace_bytes(variant, form, T, H, grad, K=64, V=64, chunk_size=64, **_):
    """The chunk form's [C, C] blocks in float32 (A, decays, their copies; per-channel gates add
    the [c, c, K] sub-chunk blocks, c = 16), kept for backward with `grad`, else formed a slice
    of at most 8192 tokens at a time; the parallel form's [T, T] blocks; SDPA's, for that peer.
    Measured on CPU at T = 8192: within 1.5x above the peak, with the inputs."""
    if form == "sdpa":
        return sdpa_workspace_bytes(T, H, K, V)
    if form == "recurrent":
        return 4 * H * K * V * 4
    rows = T if grad else min(T, SLICE_ROWS)
    if form == "parallel":
        return 6 * H * T * rows * 4
    per_token = 6 * H * chunk_size * 4
    if variant == "channel":
        per_token += 6 * H * 16 * K * 4
    return rows * per_token


register_family(
    OpFamily(
        name="gated_linear",
        forms={
            "recurrent": recurrent_gated_linear,
            "chunk": chunk_gated_linear,
            "parallel": parallel_gated_linear,
        },
        variants=("none", "head", "channel"),
        make_inputs=_family_inputs,
        flops=lambda variant, form, T, H, K=64, V=64, chunk_size=64: gated_linear_flops(
            T, H, K, V, variant, form, chunk_size
        ),
        state_bytes=lambda variant, T, H, K=64, V=64: H * K * V * 4,
        dims={"K": 64, "V": 64},
        packed=True,
        peers={"sdpa": sdpa_peer, "fla": _fla_peer},
        workspace_bytes=gated_linear_workspace_bytes,
        backend=family_backend,
        doc="S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t (no, per-head or "
        "per-key-channel gate)",
    )
)
