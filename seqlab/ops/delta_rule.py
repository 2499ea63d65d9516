"""Gated delta rule in three forms: recurrent (the reference), chunk (UT transform), parallel.

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

`g` absent is DeltaNet, a per-head log-decay [B, T, H] is Gated DeltaNet. β ∈ [0, 1], or [0, 2]
with `allow_neg_eigval` (negative eigenvalues of I − β k kᵀ for unit keys: state tracking).
Keys are expected L2-normalised (the layers do it); the op computes the recurrence as written.
"""

from __future__ import annotations

import functools

import torch

from seqlab.ops._common import (
    SLICE_ROWS,
    causal_decay,
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_gate_dtype,
    check_initial_state,
    check_log_gate,
    check_qkv,
    check_scale,
    check_shape,
    check_tensor,
    chunk_count,
    chunked,
    compute_dtype,
    decay_exp,
    floor_log_gate,
    outside_autocast,
    run_packed,
    run_sliced,
    to_chunks,
    value_range,
)
from seqlab.ops.attention import sdpa_peer
from seqlab.ops.gated_linear import fla_loader, gated_linear_workspace_bytes
from seqlab.ops.registry import Flops, OpFamily, register_family
from seqlab.ops.triton import family_backend, use_triton


def _check(q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values=True):
    """Check the arguments (β's and g's values only with `check_values`); return the scale and
    the packing offsets."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_tensor("beta", beta)
    check_shape("beta", beta, "BTH", (B, T, H))
    check_gate_dtype("beta", beta, q)
    hi = 2.0 if allow_neg_eigval else 1.0
    if check_values and beta.numel():
        lo, top = value_range(beta)  # NaN fails the comparison
        if not (lo >= 0 and top <= hi):
            hint = "" if allow_neg_eigval else " (values up to 2 need allow_neg_eigval=True)"
            raise ValueError(f"beta must lie in [0, {hi:g}]{hint}; got min {lo:.4g}, max {top:.4g}")
    if g is not None:
        check_tensor("g", g)
        check_shape("g", g, "BTH", (B, T, H))
        check_log_gate("g", g, q, values=check_values)
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_initial_state(initial_state, B, H, K, V, cu)
    return check_scale(scale, K), cu


def _prepare(q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values):
    """Check the arguments; return them cast to the compute dtype, with the packing offsets."""
    args = (q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values)
    scale, cu = _check(*args)
    dt = compute_dtype(q.dtype)
    cast = [None if x is None else x.to(dt) for x in (q, k, v, beta, g, initial_state)]
    cast[4] = floor_log_gate(cast[4], dt)
    return cast, scale, cu


def _recurrent(q, k, v, beta, g, S, scale):
    """Loop over time with the pseudo-value u_t = β_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if S is None else S
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t, :, None, None].exp()
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1) * scale, S


# Diagonal blocks of this size are inverted by a triangular solve, the rest by block products.
# 16 over 8: 0.6x the inverse time for 128-512 blocks of 64 (2 threads, 2026-12-05), ~5 % of
# the gated chunk forward at T = 8192.
INVERSE_LEAF = 16


def inverts_in_blocks(C: int, leaf: int = INVERSE_LEAF) -> bool:
    """Whether `unit_lower_inverse` of a [C, C] matrix goes by blocks: C = leaf · 2^j, j ≥ 1."""
    leaves = C // leaf
    return C > leaf and leaves * leaf == C and not leaves & (leaves - 1)


def unit_lower_inverse(M: torch.Tensor, leaf: int = INVERSE_LEAF) -> torch.Tensor:
    """M⁻¹ for a batch [R, C, C] of unit lower-triangular M; reads only M's strict lower part.

    Where C = leaf · 2^j: one batched solve inverts every [leaf, leaf] diagonal block, then
    each level joins pairs of inverted blocks, [[X₁₁, 0], [M₂₁, X₂₂]]⁻¹ has X₂₁ = −X₂₂ M₂₁ X₁₁,
    as two batched matmuls over all pairs at once (blocks are strided views: no copies but the
    products). A CPU's batched solve of 64 × 64 blocks runs its substitution row by row and
    barely uses a second thread; this took half its time on the project's 2-core VM (1.1 vs
    2.1 ms for 128 blocks of 64, float32, 2 threads). Other C: one solve against I.
    """
    R, C = M.shape[0], M.shape[-1]
    if not inverts_in_blocks(C, leaf):
        eye = torch.eye(C, dtype=M.dtype, device=M.device).expand_as(M)
        return torch.linalg.solve_triangular(M, eye, upper=False, unitriangular=True)
    leaves = C // leaf
    if M.stride()[1:] != (C, 1):  # rows of each matrix contiguous; any stride between matrices
        M = M.contiguous()
    off, ms = M.storage_offset(), M.stride(0)
    X = M.new_zeros(R, C, C)
    diag = ((R, leaves, leaf, leaf), (C * C, leaf * (C + 1), C, 1))
    Md = M.as_strided(diag[0], (ms, *diag[1][1:]), off).reshape(R * leaves, leaf, leaf)
    eye = torch.eye(leaf, dtype=M.dtype, device=M.device).expand_as(Md)
    Xd = torch.linalg.solve_triangular(Md, eye, upper=False, unitriangular=True)
    X.as_strided(*diag).copy_(Xd.view(R, leaves, leaf, leaf))
    s = leaf
    while s < C:  # pairs of [s, s] blocks → [2s, 2s] blocks
        shape, stride = (R, C // (2 * s), s, s), (C * C, 2 * s * (C + 1), C, 1)
        X11, X22, X21 = (X.as_strided(shape, stride, o) for o in (0, s * (C + 1), s * C))
        M21 = M.as_strided(shape, (ms, *stride[1:]), off + s * C)
        X21.copy_(torch.matmul(X22, M21 @ X11).neg_())
        s *= 2
    return X


class _UnitLowerInverse(torch.autograd.Function):
    """X = M⁻¹ for M unit lower-triangular (only M's strict lower part is read), batched.

    Forward is `unit_lower_inverse`. Backward uses that X is the inverse: the gradient
    of M is −(Xᵀ Ḡ Xᵀ) on the strict lower part, two matmuls, where autograd's solve_triangular
    backward runs a second triangular solve (slower per flop on a CPU, and it computes with
    the decayed values of a gated chunk, whose products underflow to slow denormals).
    """

    @staticmethod
    def forward(M):
        return unit_lower_inverse(M)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (X,) = ctx.saved_tensors
        Xt = X.transpose(-1, -2)
        return (Xt @ grad @ Xt).tril_(-1).neg_()


def _chunk(q, k, v, beta, g, S0, scale, chunk_size, parallel=False):
    """The chunk form (`_chunk_core`), in time slices when autograd is off."""
    core = functools.partial(_chunk_core, parallel=parallel)
    return run_sliced(core, (q, k, v, beta, g), S0, scale, chunk_size)


def _chunk_core(q, k, v, beta, g, S0, scale, chunk_size, parallel=False):
    """UT-transform chunk form (MATH.md §2); the Python loop runs only over the T / C chunks.

    Per chunk, with M = I + tril(diag(β) Γ ⊙ K Kᵀ, −1) and T = M⁻¹, W = T diag(β) (γ ⊙ K) and
    U' = T diag(β) V: for C ≤ K + V one batched triangular solve against I, then matmuls (small
    batched solves are several times slower per flop than matmuls on a CPU), else one solve
    against [βγK | βV]. The inverse is taken without the decay: Γ_ij = γ_i / γ_j makes
    M = D M₀ D⁻¹ with D = diag(γ) and M₀ = I + tril(diag(β) K Kᵀ, −1), so M⁻¹ = Γ ⊙ M₀⁻¹ (every
    path from j to i in the substitution carries the same decay Γ_ij). Solving with the decay
    inside ran 1.6x slower under strong gates on a CPU (its products underflow to denormals);
    M₀ holds none, and Γ is clamped (`decay_exp`). So a gated chunk form always takes the
    inverse; the wide solve, whose substitution carries the decay, is left to ungated chunks
    (no decay, no denormals) and to the parallel form (`parallel`, C = T: an oracle, where an
    inverse would cost C³). With K̃ = K ⊙ γ_{C−1}/γ, the state pass is U_n = U'_n − W_n S_n,
    S_{n+1} = γ_{C−1} S_n + K̃ᵀ U_n. Without autograd it runs like that, step by step, in place.
    With autograd each chunk's affine map S_{n+1} = P_n S_n + R_n, P_n = γ_{C−1} I − K̃ᵀ W and
    R_n = K̃ᵀ U', is batched over chunks, so the loop is one [K, K] @ [K, V] product per chunk
    (a shorter graph to differentiate) and U is batched again once the states are known.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    R = N * B * H
    # Without autograd, fresh intermediates are updated in place: on a CPU every new
    # [N·B·H, C, C] tensor costs about as much (allocation, page faults) as the math on it.
    inplace = not torch.is_grad_enabled()
    # [scale·Q; βK] in one buffer: one product with Kᵀ gives A and M (one bmm over [2C, K]
    # rows is faster on a CPU than two over [C, K]); the scale rides on the copy of Q, so A
    # and the output carry it with no pass of their own.
    bv = chunked(beta, C)[..., None]  # [N, B, H, C, 1]
    if inplace:
        QK, vb = q.new_empty(N, B, H, 2 * C, K), v.new_empty(N, B, H, C, V)
        torch.mul(chunked(q, C), scale, out=QK[..., :C, :])
        torch.mul(chunked(k, C), bv, out=QK[..., C:, :])
        torch.mul(chunked(v, C), bv, out=vb)  # βV, chunked by the product itself
    else:
        QK = torch.cat([chunked(q, C), chunked(k, C)], -2) * torch.cat(
            [torch.full_like(bv, scale), bv], -2
        )
        vb = chunked(v, C) * bv
    QK, vb = QK.view(R, 2 * C, K), vb.reshape(R, C, V)
    qc, kb = QK.split(C, 1)  # scale·Q and βK, [N·B·H, C, K] views (split: one cat back)
    kc = to_chunks(k, C)
    kt = kc.transpose(1, 2)
    AM = QK @ kt
    A, M = AM.split(C, 1)  # M: its strict lower part; the unit-triangular solve reads no more
    if g is None:
        A = A.tril_() if inplace else A.tril()  # diagonal included
        q_in, kdec, kbg, decay = qc, kc, kb, None
    else:
        b = to_chunks(g, C).cumsum(1)  # [N·B·H, C]
        Gam = causal_decay(b)  # [N·B·H, C, C]
        gam = decay_exp(b)[..., None]  # γ_i = exp(b_i) ≤ 1
        tail = decay_exp(b[:, -1:] - b, inplace=True)[..., None]  # γ_{C-1} / γ
        decay = decay_exp(b[:, -1:])  # [N·B·H, 1]
        if inplace:
            A = A.mul_(Gam)
            q_in, kdec, kbg = qc.mul_(gam), kc.mul_(tail), kb.mul_(gam)
        else:
            A = A * Gam
            q_in, kdec, kbg = qc * gam, kc * tail, kb * gam  # kdec = K ⊙ γ_{C-1} / γ
    # the inverse, then separate products: faster on a CPU than one wide solve for C ≤ K + V
    if C <= K + V or (g is not None and not parallel):
        Tinv = _UnitLowerInverse.apply(M)  # M₀⁻¹
        if g is not None:  # M⁻¹ = Γ ⊙ M₀⁻¹
            Tinv = Tinv.mul_(Gam) if inplace else Tinv * Gam
        W, U_pre = Tinv @ kbg, Tinv @ vb
    else:  # long chunks, ungated or the parallel form: an inverse costs C³, the solve C²(K + V)
        if g is not None:
            M = M.mul_(Gam) if inplace else M * Gam
        rhs = torch.cat([kbg, vb], 2)
        Y = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
        W, U_pre = Y[..., :K], Y[..., K:]
    kdt = kdec.transpose(1, 2)
    S = q.new_zeros(B * H, K, V) if S0 is None else S0.reshape(B * H, K, V)
    if inplace:  # U_n = U'_n − W_n S_n and S_{n+1} = γ S_n + K̃ᵀ U_n, step by step
        # Three in-place ops per chunk, each state written into its slot of one buffer: the
        # loop runs B·H small matmuls per op, so op count, not flops, sets its time.
        W_n, U_n, kdt_n = (x.view(N, B * H, *x.shape[1:]) for x in (W, U_pre, kdt))
        dec = None if decay is None else decay.view(N, B * H, 1, 1)
        states = q.new_empty(N + 1, B * H, K, V)  # the state at each chunk's start, then S_N
        states[0].copy_(S)
        # (`out=`, not `baddbmm_`: torch's FlopCounterMode counts no in-place baddbmm_.)
        for n in range(N):
            U, S_next = U_n[n], states[n + 1]
            torch.baddbmm(U, W_n[n], states[n], alpha=-1, out=U)  # U' becomes U in place
            if dec is None:
                torch.baddbmm(states[n], kdt_n[n], U, out=S_next)
            else:
                torch.mul(states[n], dec[n], out=S_next)
                torch.baddbmm(S_next, kdt_n[n], U, out=S_next)
        # S_N copied out of the buffer: a view would keep every chunk's state alive
        U, S, starts = U_pre, states[N].clone(), states[:N].view(-1, K, V)
    else:  # the affine map of each chunk batched: one [K, K] @ [K, V] product per step
        P = (kdt @ W).neg_()  # γ_{C-1} I − K̃ᵀ W once the diagonal is added
        P.diagonal(dim1=-2, dim2=-1).add_(1.0 if decay is None else decay)
        P, R = P.view(N, B * H, K, K), (kdt @ U_pre).view(N, B * H, K, V)
        starts = []
        for P_n, R_n in zip(P.unbind(0), R.unbind(0), strict=True):
            starts.append(S)
            S = torch.baddbmm(R_n, P_n, S)
        starts = torch.stack(starts, 0).view(-1, K, V)
    if not inplace:
        U = torch.baddbmm(U_pre, W, starts, alpha=-1)
    o = A @ U  # [N·B·H, C, V]; + Q S (in place without autograd: no copy of A U)
    o = torch.baddbmm(o, q_in, starts, out=o) if inplace else torch.baddbmm(o, q_in, starts)
    return o, S.view(B, H, K, V)  # o in chunks: run_sliced lays it out


def _finish(o, S, q, output_final_state):
    return o.to(q.dtype), (S if output_final_state else None)


@outside_autocast
def recurrent_delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    allow_neg_eigval=False,
    *,
    check_values=True,
):
    """Reference form: one rank-one state update per time step. Also the decode step (T = 1)."""
    args = (q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values)
    args = _prepare(*args)
    (qf, kf, vf, bf, gf, S0), scale, cu = args
    o, S = run_packed(_recurrent, cu, (qf, kf, vf, bf, gf), S0, scale)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def chunk_delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    allow_neg_eigval=False,
    chunk_size=64,
    *,
    check_values=True,
):
    """Chunkwise-parallel form with the WY/UT representation (the training form)."""
    check_chunk_size(chunk_size)
    args = (q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values)
    args = _prepare(*args)
    (qf, kf, vf, bf, gf, S0), scale, cu = args
    o, S = run_packed(_chunk, cu, (qf, kf, vf, bf, gf), S0, scale, chunk_size)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def parallel_delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    allow_neg_eigval=False,
    *,
    check_values=True,
):
    """Quadratic form: the UT transform over the whole sequence (one [T, T] triangular solve)."""
    args = (q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval, check_values)
    args = _prepare(*args)
    (qf, kf, vf, bf, gf, S0), scale, cu = args
    T = qf.shape[1] if cu is None else int((cu[1:] - cu[:-1]).max())
    o, S = run_packed(_chunk, cu, (qf, kf, vf, bf, gf), S0, scale, T, True)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    allow_neg_eigval=False,
    form="chunk",
    chunk_size=64,
    backend="auto",
    *,
    check_values=True,
):
    """The gated delta rule in the named form ("recurrent", "chunk" or "parallel").

    backend: "auto" runs the Triton kernels on CUDA tensors where they support the call and
    PyTorch elsewhere; "torch" or "triton" forces one (seqlab.ops.triton).
    check_values: False skips the checks that β lies in range and g is finite and ≤ 0, which read
    them back to the host, so a GPU caller waits for its queue on every call. The mixers pass
    False (sigmoid β, −softplus gates: valid by construction), so a decode step never waits.
    Shapes, dtypes and devices are checked either way.
    """
    check_form(form)
    check_chunk_size(chunk_size)
    if use_triton(backend, form, chunk_size, (q, k, v, beta, g, initial_state)):
        from seqlab.ops.triton import api

        args = (q, k, v, beta, g, scale, initial_state, cu_seqlens, allow_neg_eigval)
        scale, cu = _check(*args, check_values)
        g = floor_log_gate(g, torch.float32)  # the kernels take exps in float32
        args = (q, k, v, beta, g, scale, initial_state, output_final_state, cu)
        return api.delta_rule(*args, form, chunk_size)
    args = (q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    args = (*args, allow_neg_eigval)
    checks = {"check_values": check_values}
    if form == "chunk":
        return chunk_delta_rule(*args, chunk_size=chunk_size, **checks)
    if form == "parallel":
        return parallel_delta_rule(*args, **checks)
    return recurrent_delta_rule(*args, **checks)


def unit_lower_inverse_flops(C: int, leaf: int = INVERSE_LEAF) -> Flops:
    """`seqlab.ops.delta_rule.unit_lower_inverse` of one [C, C] matrix.

    Where C = leaf · 2^j (j ≥ 1): a solve per [leaf, leaf] diagonal block, C · leaf(leaf − 1),
    then at each block size s = leaf, 2·leaf, …, C/2 the C / 2s pairs take two [s, s] products,
    2C s² in all per level. Other C: one solve against I, C²(C − 1).
    """
    if not inverts_in_blocks(C, leaf):
        return Flops(0, C * C * (C - 1))
    matmul, s = 0, leaf
    while s < C:
        matmul += 2 * C * s * s
        s *= 2
    return Flops(matmul, C * leaf * (leaf - 1))


def delta_rule_flops(
    T: int,
    H: int,
    K: int,
    V: int,
    form: str = "chunk",
    chunk_size: int = 64,
    autograd: bool = False,
    gated: bool = False,
) -> Flops:
    """`delta_rule` over T tokens, without a gate or with one (`gated`).

    Per chunk and head: Q Kᵀ and diag(β) K Kᵀ (4C²K); for C ≤ K + V, and in a gated chunk form
    for any C, the inverse T = M⁻¹ (`unit_lower_inverse_flops`: block solves and products),
    W = T βγK and U' = T βV (2C²(K + V)), else one solve against [βγK | βV]
    (C(C − 1)(K + V)); then
    O = Q S₀ + A U (2CKV + 2C²V). The state pass differs by mode. Inference (no autograd):
    U = U' − W S₀ and S₁ = γS₀ + K̃ᵀU step by step (4CKV). With autograd (`autograd=True`, the
    training forward): the affine maps P = γI − K̃ᵀW, R = K̃ᵀU' batched (2CK(K + V)), the
    step S₁ = P S₀ + R (2K²V), and U = U' − W S₀ batched (2CKV).
    The recurrent form has two matmuls per step, kᵀS and qᵀS (4KV), and an elementwise update.
    """
    if form == "recurrent":
        return Flops(4 * K * V, 3 * K * V) * (H * T)
    C, N = chunk_count(T, T if form == "parallel" else chunk_size)
    matmul = 4 * C * C * K + 2 * C * K * V + 2 * C * C * V
    if C <= K + V or (gated and form == "chunk"):  # the inverse, then W = T βγK and U' = T βV
        inverse = unit_lower_inverse_flops(C)
        matmul += 2 * C * C * (K + V) + inverse.matmul
        solve = inverse.other
    else:  # one solve against [βγK | βV]
        solve = C * (C - 1) * (K + V)
    if autograd:
        matmul += 2 * C * K * (K + V) + 2 * K * K * V + 2 * C * K * V
    else:
        matmul += 4 * C * K * V
    return Flops(matmul, solve) * (H * N)


def _family_inputs(variant, B, T, H, dtype=torch.float32, generator=None, K=64, V=64):
    """q, unit keys, v, β = sigmoid(z) and, gated, log-decays logsigmoid(z) (z standard normal)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, K),
        "k": torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "beta": randn(B, T, H).sigmoid(),
    }
    if variant == "gated":
        x["g"] = torch.nn.functional.logsigmoid(randn(B, T, H))
    return {n: t.to(dtype) for n, t in x.items()}


def _fla_peer():
    """fla's chunk_delta_rule (DeltaNet) and chunk_gated_delta_rule (with g), on the same
    [B, T, H, ·] inputs (unit keys, β in (0, 1))."""
    delta = fla_loader("fla.ops.delta_rule", "chunk_delta_rule")
    gated = fla_loader("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")
    if delta is None or gated is None:
        return None

    def run(q, k, v, beta, g=None, **_):
        if g is None:
            return delta(q, k, v, beta=beta)[0]
        return gated(q, k, v, g=g, beta=beta)[0]

    return run


def _workspace_bytes(variant, form, T, H, grad, K=64, V=64, chunk_size=64, **_):
    """The gated_linear blocks, plus W, U', U and the [K, K] maps per chunk in float32.
    Measured on CPU at T = 8192: within 1.5x above the peak, with the inputs."""
    base = gated_linear_workspace_bytes("head", form, T, H, grad, K=K, V=V, chunk_size=chunk_size)
    if form not in ("chunk",):
        return base
    rows = T if grad else min(T, SLICE_ROWS)
    return base + rows * (4 * H * (K + V) * 4 + 2 * H * K * K * 4 // chunk_size)


register_family(
    OpFamily(
        name="delta_rule",
        forms={
            "recurrent": recurrent_delta_rule,
            "chunk": chunk_delta_rule,
            "parallel": parallel_delta_rule,
        },
        variants=("delta", "gated"),
        make_inputs=_family_inputs,
        flops=lambda variant, form, T, H, K=64, V=64, chunk_size=64: delta_rule_flops(
            T, H, K, V, form, chunk_size, gated=variant == "gated"
        ),
        state_bytes=lambda variant, T, H, K=64, V=64: H * K * V * 4,
        dims={"K": 64, "V": 64},
        packed=True,
        peers={"sdpa": sdpa_peer, "fla": _fla_peer},
        workspace_bytes=_workspace_bytes,
        backend=family_backend,
        doc="S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ (DeltaNet; gated: Gated "
        "DeltaNet)",
    )
)
