"""Diagonal-plus-low-rank (DPLR) delta rule, RWKV-7's recurrence: recurrent (the reference), chunk.

    S_t = (diag(exp(gk_t)) + b_t a_tᵀ) S_{t−1} + k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

S [B, H, K, V] (seqlab's layout; fla's `generalized_delta_rule` writes the same update as
S_t = S_{t−1}(diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ on the transposed [V, K] state): q, k, a, b and
the per-channel log-decay gk [B, T, H, K], v [B, T, H, V]. The output reads the state after the
step's update, as fla's `dplr_recurrence` does. RWKV-7 takes a = −κ̂, b = κ̂ ⊙ α (κ̂ the
normalised key, α the in-context learning rate), which makes the low-rank part a delta-rule
removal along κ̂. With b = −β k, a = k, gk = g (one value per head) it is the gated delta rule
(tests/ops/test_dplr.py holds that relation).

The chunk form (MATH.md §2 generalised) uses the pseudo-value u_t = a_tᵀ S_{t−1}, so that
S_t = diag(exp(gk_t)) S_{t−1} + k_t v_tᵀ + b_t u_tᵀ is a gated linear recurrence with two kinds of
key; u is found for a whole chunk by one unit lower-triangular inverse (the UT transform).
"""

from __future__ import annotations

import torch

from seqlab.ops._common import (
    check_chunk_size,
    check_gate_dtype,
    check_initial_state,
    check_log_gate,
    check_qkv,
    check_scale,
    check_shape,
    check_tensor,
    compute_dtype,
    decay_exp,
    exp_floor,
    floor_log_gate,
    outside_autocast,
    run_sliced,
    to_chunks,
)
from seqlab.ops.delta_rule import _UnitLowerInverse, unit_lower_inverse_flops
from seqlab.ops.registry import Flops, OpFamily, register_family

# Sub-chunk of the intra-chunk blocks: pairs (i, j) in one sub-chunk take their decay
# exp(G_i − G_j) elementwise (a [c, c, K] tensor per sub-chunk), pairs in different sub-chunks
# factor it through the position m just before i's sub-chunk, exp(G_i − G_m) · exp(G_m − G_j),
# both exponents ≤ 0, as matmuls. Exact for any decay strength: no factor ever exceeds 1, and
# where one underflows the product it stands for is smaller still. 16 as fla's kernels use: the
# elementwise part costs c per token and channel, the matmul part C.
SUB_CHUNK = 16


def _check(q, k, v, a, b, gk, scale, initial_state, check_values=True):
    """Check the arguments (gk's values only with `check_values`); return the scale."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name, x in (("a", a), ("b", b), ("gk", gk)):
        check_tensor(name, x)
        check_shape(name, x, "BTHK", (B, T, H, K))
    for name, x in (("a", a), ("b", b)):
        check_gate_dtype(name, x, q)
    check_log_gate("gk", gk, q, values=check_values)
    check_initial_state(initial_state, B, H, K, V, None)
    return check_scale(scale, K)


def _prepare(q, k, v, a, b, gk, scale, initial_state, check_values):
    scale = _check(q, k, v, a, b, gk, scale, initial_state, check_values)
    dt = compute_dtype(q.dtype)
    cast = [None if x is None else x.to(dt) for x in (q, k, v, a, b, gk, initial_state)]
    cast[5] = floor_log_gate(cast[5], dt)
    return cast, scale


def _recurrent(q, k, v, a, b, gk, S, scale):
    """Loop over time: u_t = a_tᵀ S_{t−1}, S_t = exp(gk_t) ⊙ S_{t−1} + b_t u_tᵀ + k_t v_tᵀ."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if S is None else S
    outs = []
    for t in range(T):
        u = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = (
            S * gk[:, t, :, :, None].exp()
            + b[:, t, :, :, None] * u[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1) * scale, S


def chunk_sizes(T: int, chunk_size: int) -> tuple[int, int, int]:
    """(C, c, N): chunk and sub-chunk lengths and the chunk count the chunk form cuts T into.

    T ≤ SUB_CHUNK or chunk_size ≤ SUB_CHUNK: one sub-chunk per chunk, C = min(chunk_size, T).
    Else C = min(chunk_size, T rounded up to a whole number of sub-chunks), c = SUB_CHUNK.
    """
    if chunk_size <= SUB_CHUNK or T <= SUB_CHUNK:
        C = min(chunk_size, T)
        return C, C, -(-T // C)
    C = min(chunk_size, -(-T // SUB_CHUNK) * SUB_CHUNK)
    return C, SUB_CHUNK, -(-T // C)


def _intra(X, P, Y, G, c):
    """The chunk's pair matrix A [R, 2, C, 2, C] (rows: x = scale·q or a; columns: y = k or b):

        A[x, i, y, j] = Σ_κ X[x, i, κ] Y[y, j, κ] exp(P[x, i, κ] − G[j, κ])

    for j ≤ i (q rows) or j < i (a rows), 0 above. X, P [R, 2, C, K] (P: G for q rows, the
    exclusive G_{i−1} for a rows), Y [R, 2, C, K], G [R, C, K] the inclusive log-decay sums.
    """
    R, _, C, K = X.shape
    nb = C // c
    A = X.new_zeros(R, 2, C, 2, C)
    # Pairs within a sub-chunk: the decay elementwise, [R, 2, nb, c(i), c(j), K].
    Pd, Gd = P.view(R, 2, nb, c, 1, K), G.view(R, 1, nb, 1, c, K)
    XE = X.view(R, 2, nb, c, 1, K) * decay_exp(Pd - Gd)
    Ad = torch.einsum("rxnijk,rynjk->rxniyj", XE, Y.view(R, 2, nb, c, K))
    ones = torch.ones(c, c, dtype=torch.bool, device=X.device)
    mask = torch.stack([ones.tril(), ones.tril(-1)]).view(2, 1, c, 1, c)
    Ad = Ad * mask  # the positive exponents above (and, for a rows, on) the diagonal drop here
    for n in range(nb):
        A[:, :, n * c : (n + 1) * c, :, n * c : (n + 1) * c] = Ad[:, :, n]
    # Pairs across sub-chunks, through m = the last position before row block n.
    for n in range(1, nb):
        s, m = n * c, n * c - 1
        Gm = G[:, None, m : m + 1]  # [R, 1, 1, K]
        Xs = X[:, :, s : s + c] * decay_exp(P[:, :, s : s + c] - Gm)  # [R, 2, c, K]
        Ys = Y[:, :, :s] * decay_exp(Gm - G[:, None, :s])  # [R, 2, s, K]
        off = Xs.reshape(R, 2 * c, K) @ Ys.reshape(R, 2 * s, K).transpose(1, 2)
        A[:, :, s : s + c, :, :s] = off.view(R, 2, c, 2, s)
    return A


def _chunk(q, k, v, a, b, gk, S0, scale, chunk_size):
    """The chunk form (`_chunk_core`), in time slices when autograd is off."""
    return run_sliced(_chunk_core, (q, k, v, a, b, gk), S0, scale, chunk_size)


def _chunk_core(q, k, v, a, b, gk, S0, scale, chunk_size):
    """Chunkwise-parallel form; the Python loop runs over the T / C chunks only.

    In a chunk starting from S₀, with G_i = Σ_{s≤i} gk_s per channel and Gx_i = G_{i−1}:
    U = A_ak V + A_ab U + (a ⊙ exp(Gx)) S₀ (strictly lower A_ak, A_ab from `_intra`), so with
    Tinv = (I − A_ab)⁻¹: U = U' + W S₀, U' = Tinv A_ak V, W = Tinv (a ⊙ exp(Gx)). Then
    O = (scale·q ⊙ exp(G)) S₀ + A_qk V + A_qb U and
    S₁ = exp(G_{C−1}) ⊙ S₀ + (k ⊙ exp(G_{C−1} − G))ᵀ V + (b ⊙ exp(G_{C−1} − G))ᵀ U.
    Unlike the gated delta rule's scalar gate, a per-channel decay cannot be factored out of the
    inverse; A_ab holds factors ≤ 1 only, so the inverse stays bounded. Each chunk's affine map
    S₁ = P S₀ + R (P = diag(exp(G_{C−1})) + B̃ᵀ W, R = K̃ᵀ V + B̃ᵀ U') is formed for all chunks
    at once, so the sequential loop is one [K, K] @ [K, V] product per chunk.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, c, N = chunk_sizes(T, chunk_size)
    R = N * B * H
    # Strong steps gain nothing below exp's floor (their factor is 0 to round-off) and would
    # make G's values, and so the round-off of its differences, large.
    g = to_chunks(gk.clamp(min=exp_floor(gk.dtype)), C)
    G = g.cumsum(1)  # [R, C, K]
    Gx = G - g
    qc, kc, vc, ac, bc = (to_chunks(x, C) for x in (q * scale, k, v, a, b))
    X = torch.stack([qc, ac], 1)
    A = _intra(X, torch.stack([G, Gx], 1), torch.stack([kc, bc], 1), G, c)
    A_q, A_ak, A_ab = A[:, 0].reshape(R, C, 2 * C), A[:, 1, :, 0], A[:, 1, :, 1]
    Tinv = _UnitLowerInverse.apply(A_ab.neg())  # (I − A_ab)⁻¹: reads the strict lower part
    W = Tinv @ (ac * decay_exp(Gx))
    U_pre = Tinv @ (A_ak @ vc)
    tail = decay_exp(G[:, -1:] - G)
    KB = torch.cat([kc, bc], 1) * torch.cat([tail, tail], 1)  # [R, 2C, K]: K̃ and B̃
    dec = decay_exp(G[:, -1])  # [R, K]
    KBt = KB.transpose(1, 2)
    P = KBt[..., C:] @ W + torch.diag_embed(dec)
    Rn = KBt @ torch.cat([vc, U_pre], 1)
    P, Rn = P.view(N, B * H, K, K), Rn.view(N, B * H, K, V)
    S = q.new_zeros(B * H, K, V) if S0 is None else S0.reshape(B * H, K, V)
    starts = []
    for P_n, R_n in zip(P.unbind(0), Rn.unbind(0), strict=True):
        starts.append(S)
        S = torch.baddbmm(R_n, P_n, S)
    starts = torch.stack(starts, 0).view(R, K, V)
    U = torch.baddbmm(U_pre, W, starts)
    o = torch.baddbmm(A_q @ torch.cat([vc, U], 1), qc * decay_exp(G), starts)
    return o, S.view(B, H, K, V)


def _finish(o, S, q, output_final_state):
    return o.to(q.dtype), (S if output_final_state else None)


@outside_autocast
def recurrent_dplr(
    q,
    k,
    v,
    a,
    b,
    gk,
    scale=None,
    initial_state=None,
    output_final_state=False,
    *,
    check_values=True,
):
    """Reference form: one diagonal-plus-rank-one transition per step. Also the decode step."""
    (qf, kf, vf, af, bf, gf, S0), scale = _prepare(
        q, k, v, a, b, gk, scale, initial_state, check_values
    )
    o, S = _recurrent(qf, kf, vf, af, bf, gf, S0, scale)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def chunk_dplr(
    q,
    k,
    v,
    a,
    b,
    gk,
    scale=None,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    *,
    check_values=True,
):
    """Chunkwise-parallel form (the training form). chunk_size: at most 16, or a multiple of 16
    (the sub-chunk)."""
    check_chunk_size(chunk_size)
    if chunk_size > SUB_CHUNK and chunk_size % SUB_CHUNK:
        raise ValueError(
            f"chunk_size must be at most {SUB_CHUNK} or a multiple of {SUB_CHUNK} (the "
            f"sub-chunk), got {chunk_size}"
        )
    (qf, kf, vf, af, bf, gf, S0), scale = _prepare(
        q, k, v, a, b, gk, scale, initial_state, check_values
    )
    o, S = _chunk(qf, kf, vf, af, bf, gf, S0, scale, chunk_size)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def dplr(
    q,
    k,
    v,
    a,
    b,
    gk,
    scale=None,
    initial_state=None,
    output_final_state=False,
    form="chunk",
    chunk_size=64,
    *,
    check_values=True,
):
    """The DPLR delta rule in the named form ("recurrent" or "chunk").

    check_values: False skips the check that gk is finite and ≤ 0, which reads it back to the
    host (the mixer passes False: its decays are valid by construction).
    """
    if form not in ("recurrent", "chunk"):
        raise ValueError(f"form must be 'recurrent' or 'chunk', got {form!r}")
    args = (q, k, v, a, b, gk, scale, initial_state, output_final_state)
    if form == "chunk":
        return chunk_dplr(*args, chunk_size=chunk_size, check_values=check_values)
    return recurrent_dplr(*args, check_values=check_values)


def dplr_flops(T: int, H: int, K: int, V: int, form: str = "chunk", chunk_size: int = 64) -> Flops:
    """`dplr` over T tokens (its matmul part is what torch's FlopCounterMode counts).

    Recurrent: aᵀS and qᵀS per step (4KV), the update elementwise (7KV). Chunk, per chunk
    (C, sub-chunk c, nb = C / c): the pair matrix's sub-chunk blocks (einsum, 8Cc K) and
    cross-sub-chunk blocks (4C(C − c)K), the inverse (`unit_lower_inverse_flops`), W and
    U' = Tinv (A_ak V) (2C²K + 4C²V), the affine map P, R (2CK² + 4CKV), the state step
    (2K²V), U = U' + W S₀ (2CKV) and O (2CKV + 4C²V); elementwise: the decays and the
    sub-chunk products (about 4CcK).
    """
    if form == "recurrent":
        return Flops(4 * K * V, 7 * K * V) * (H * T)
    C, c, N = chunk_sizes(T, chunk_size)
    inverse = unit_lower_inverse_flops(C)
    matmul = 8 * C * c * K + 4 * C * (C - c) * K + inverse.matmul
    matmul += 2 * C * C * K + 4 * C * C * V + 2 * C * K * K + 4 * C * K * V + 2 * K * K * V
    matmul += 2 * C * K * V + 2 * C * K * V + 4 * C * C * V
    return Flops(matmul, inverse.other + 4 * C * c * K) * (H * N)


def _family_inputs(variant, B, T, H, dtype=torch.float32, generator=None, K=64, V=64):
    """RWKV-7's inputs: q, k, v standard normal, κ̂ a unit key, a = −κ̂, b = κ̂ ⊙ α with
    α = sigmoid(z), and per-channel log-decays logsigmoid(2z) (from about −0.01 to −8 per step:
    mild and strong channels in one head; RWKV-7's own lie in (−0.61, 0))."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    kappa = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    x = {
        "q": randn(B, T, H, K),
        "k": randn(B, T, H, K),
        "v": randn(B, T, H, V),
        "a": -kappa,
        "b": kappa * randn(B, T, H, K).sigmoid(),
        "gk": torch.nn.functional.logsigmoid(2 * randn(B, T, H, K)),
    }
    return {n: t.to(dtype) for n, t in x.items()}


def fla_naive_dplr():
    """(dplr_recurrence, dplr_chunkwise) from fla's `generalized_delta_rule/dplr/naive.py`, or
    None where fla-core is not installed. The file (torch and einops only) is loaded by its path:
    importing it as `fla.ops...` runs fla's package imports, which build its Triton and Gluon
    kernels (seconds, and they fail under Triton's CPU interpreter, which the tests use)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fla")
    if (
        spec is None
        or not spec.submodule_search_locations
        or not importlib.util.find_spec("einops")
    ):
        return None
    path = Path(spec.submodule_search_locations[0], "ops/generalized_delta_rule/dplr/naive.py")
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_fla_dplr_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.dplr_recurrence, module.dplr_chunkwise


def _fla_naive_peer():
    """fla's naive chunkwise DPLR (`dplr_chunkwise`, pure PyTorch, chunks of 32) on seqlab's
    [B, T, H, ·] inputs, or None where fla is not installed. It computes in float32, scales q
    by K^-1/2 and takes whole chunks only: T is zero-padded to a multiple of 32 (zero k, v, a, b
    and gk leave the state as it is; the padded outputs are dropped)."""
    naive = fla_naive_dplr()
    if naive is None:
        return None
    dplr_chunkwise = naive[1]

    def peer(q, k, v, a, b, gk, **_):
        T = q.shape[1]
        pad = -T % 32
        x = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v)]
        y = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (a, b, gk)]
        o = dplr_chunkwise(*x, *y, output_final_state=False)[0]
        return o.transpose(1, 2)[:, :T]

    return peer


def _workspace_bytes(variant, form, T, H, grad, K=64, V=64, chunk_size=64, **_):
    """Per token and head in float32: the pair matrix (4C), its sub-chunk tensors (`_intra`:
    the exponent P − G, its exp, X ⊙ exp and einsum's copy of it, each [2, c, K] per token: 8cK),
    the inverse, W, U', U, the decays (C + 8K + 3V) and a [K, K] map per chunk (float32 copies of
    the inputs aside). Coarse, for `seqlab bench`'s memory guard."""
    if form == "recurrent":
        return 4 * T * H * K * V * 4 if grad else 2 * H * K * V * 4
    C, c, _ = chunk_sizes(T, chunk_size)
    per_token = 5 * C + 8 * c * K + 8 * K + 3 * V + K * K // C
    rows = T if grad else min(T, 8192)
    return rows * H * per_token * 4


register_family(
    OpFamily(
        name="dplr",
        forms={"recurrent": recurrent_dplr, "chunk": chunk_dplr},
        make_inputs=_family_inputs,
        flops=lambda variant, form, T, H, K=64, V=64, chunk_size=64: dplr_flops(
            T, H, K, V, form, chunk_size
        ),
        state_bytes=lambda variant, T, H, K=64, V=64: H * K * V * 4,
        dims={"K": 64, "V": 64},
        peers={"fla_naive_chunk": _fla_naive_peer},
        targets={"recurrent": 10.0, "peer:fla_naive_chunk": 2.0},
        workspace_bytes=_workspace_bytes,
        doc="S_t = (diag(exp(gk_t)) + b_t a_tᵀ) S_{t−1} + k_t v_tᵀ (RWKV-7: a = −κ̂, b = κ̂ ⊙ α)",
    )
)

__all__ = ["chunk_dplr", "dplr", "dplr_flops", "fla_naive_dplr", "recurrent_dplr"]
