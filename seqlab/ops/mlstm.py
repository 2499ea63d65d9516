"""The mLSTM of xLSTM (Beck et al. 2024): a matrix memory with an exponential input gate and a
sigmoid forget gate, stabilised in log space, in three forms: recurrent (the reference), chunk,
parallel. The semantics are those of the `mlstm_kernels` package (its native `parallel`,
`chunkwise` and recurrent `native_sequence` kernels):

    log f_t = logsigmoid(f̃_t),  m_t = max(log f_t + m_{t−1}, ĩ_t)           (the stabiliser)
    C_t = exp(log f_t + m_{t−1} − m_t) C_{t−1} + exp(ĩ_t − m_t) k_t v_tᵀ
    n_t = exp(log f_t + m_{t−1} − m_t) n_{t−1} + exp(ĩ_t − m_t) k_t
    h_t = (s q_t)ᵀ C_t / (max(|(s q_t)ᵀ n_t|, exp(−m_t)) + eps),   s = scale = K^−1/2

ĩ, f̃ are the gate pre-activations [B, T, H] (the input gate enters as exp(ĩ), unbounded); the
state starts from C = 0, n = 0, m = 0 (so with no initial state m_t ≥ b_t, the cumulated log
forget gate). C and n are the true memory and normaliser scaled by exp(−m): with the stabiliser
every exponent taken is ≤ 0. The output is invariant to m but for the eps term: h_t =
qᵀC̄_t / (max(|qᵀn̄_t|, 1) + eps·exp(m_t)) with C̄, n̄ the unscaled state.

The state is one tensor S [B, H, K + 1, V + 1] packing the triple (`pack_state`,
`unpack_state`): C = S[..., :K, :V], n = S[..., :K, V], m = S[..., K, V] (S[..., K, :V] is
zero). The chunk form carries [C | n] as one [K, V + 1] matrix: n is C's column for a value
that is 1 at every step.

Layout mapping to mlstm_kernels (q, k [B, NH, S, DHQK], v [B, NH, S, DHV], i, f [B, NH, S];
states c [B, NH, DHQK, DHV], n [B, NH, DHQK], m [B, NH, 1]): here every per-token tensor is
[B, T, H, ·] (theirs transposed in dims 1 and 2), i and f are [B, T, H], and `initial_state` /
the final state are the packed S above; `return_last_states=True` there is
`output_final_state=True` here. Their parallel kernel has no initial state and omits the m_0 = 0
term from m_t (m_t = max_j (b_t − b_j + ĩ_j)); it differs from their recurrent and chunkwise
kernels (and from every form here) only through eps·exp(m_t), where every ĩ_j < log f_1 + ... +
log f_j.

Chunk form: within a chunk with cumulated log forget b (b_0 = 0) and entry stabiliser m_0,
m_t = b_t + M_t with M_t = max(m_0, max_{j≤t} (ĩ_j − b_j)) (a cumulative max), and every decay
is exp(ĩ_j − b_j − M_t) ≤ 1 for j ≤ t, exp(m_0 − M_t) ≤ 1 for the entry state. The entry
stabilisers follow from the chunks' gate sums alone, in a loop over chunks on [B·H] scalars
before any state is formed, so each chunk's contribution to its exit state is one matmul.

The chunk form's backward (`_ChunkMLSTM`, one autograd node) is written by hand and exact: it
equals autograd through the recurrent form (tests/ops/test_mlstm.py, float64). With N̄_t =
exp(m_t) Y_t the unscaled (num | den) and Y = s (qᵀC | qᵀn), h_t = R(N̄_t, m_t): N̄ is a gated
linear attention (key weights exp(ĩ_j), decays exp(log f)) whatever the stabiliser, and m_t
enters only through the readout's exp(−m_t) (the eps·exp(m_t) term) and the final state's
scaling. So the gradient has two parts (δ the loss's gradient, dP = s δY):

    readout: δY_v = δh / den,  g_den = −δh·h / den  to |Y_n| (sign(Y_n)) or to lo = exp(−m),
             as the max picks (half each on a tie, as torch.maximum),
    state, run backwards over chunks (δS_N the final state's):
             δS_n = α_n δS_{n+1} + (w_in ∘ q)ᵀ dP,   δA = (dP [v | 1]ᵀ) ∘ D,
             δq = δA k + (w_in ∘ dP) S_inᵀ,  δk = δAᵀ q + w ∘ ([v | 1] δS_exitᵀ),
             δv = Aᵀ dP_v + w ∘ (k δS_exit),
    gates through N̄: δĩ_j = δk_j·k_j,  δb_t = δY_t·Y_t − δk_t·k_t (+ ⟨δS_T, S_T⟩ at T),
             b the log forget cumulated from the start, δlog f_s = Σ_{t ≥ s} δb_t,
    stabiliser: δm_t = −δY_t·Y_t − lo_t g_lo [m_t > −cap] (and −⟨δS_T, S_T⟩ + δm_T at T),
             through m_t = b_t + M_t, M_t = max(cummax_j u_j, m_in), m_out = g + M_C to the
             gate where each max was reached (cummax's index, or m_in: a loop back over chunks
             on [B·H] scalars),
    initial state: δ(C₀ | n₀) = δS_0,  δm₀ = ⟨δS_0, S₀⟩ + the stabiliser chain's.

The forward keeps each chunk's decays D and A = (q kᵀ) ∘ D, the denominator, the small
per-token numbers (gates, weights, stabilisers) and the states; q, k and v are chunked again
where needed. Both passes run the [C, C] work over groups of chunks (GRAD_SLICE_ROWS rows) so
that each group's blocks stay in cache; the per-token work on gates and readout is done once.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from seqlab.ops._common import (
    SLICE_ROWS,
    check_chunk_size,
    check_form,
    check_gate_dtype,
    check_qkv,
    check_scale,
    check_shape,
    check_tensor,
    chunk_count,
    chunked,
    compute_dtype,
    connected_zeros,
    decay_exp,
    floor_log_gate,
    from_chunks,
    outside_autocast,
    refuse_double_backward,
    run_sliced,
    to_chunks,
    value_range,
)
from seqlab.ops.registry import Flops, OpFamily, register_family

EPS = 1e-6  # mlstm_kernels' default


def _m_cap(dtype: torch.dtype) -> float:
    """exp(−m) in the denominator is taken at m ≥ −cap: exp(cap) stays far from overflow.

    Only a stabiliser below −cap (every input gate pre-activation below −cap since the last
    strong one) is raised: there the output is below exp(−cap) times the stabilised numerator,
    and where exp(−m) would overflow (mlstm_kernels returns 0 and NaN gradients) it stays
    finite."""
    return 700.0 if dtype == torch.float64 else 80.0


def pack_state(C: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(C [B, H, K, V], n [B, H, K], m [B, H] or [B, H, 1]) → S [B, H, K + 1, V + 1]."""
    B, H, K, V = C.shape
    m = m.reshape(B, H)
    top = torch.cat([C, n[..., None]], -1)  # [B, H, K, V + 1]
    bottom = torch.cat([m.new_zeros(B, H, V), m[..., None]], -1)[..., None, :]
    return torch.cat([top, bottom.to(top.dtype)], -2)


def unpack_state(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S [B, H, K + 1, V + 1] → (C [B, H, K, V], n [B, H, K], m [B, H]), views of S."""
    return S[..., :-1, :-1], S[..., :-1, -1], S[..., -1, -1]


def _check(q, k, v, i, f, scale, eps, initial_state, check_values):
    """Check the arguments; return the scale."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name, x in (("i", i), ("f", f)):
        check_tensor(name, x)
        check_shape(name, x, "BTH", (B, T, H))
        check_gate_dtype(name, x, q)
        if check_values and x.numel():
            lo, hi = value_range(x)  # NaN fails the comparison
            if not -math.inf < lo <= hi < math.inf:
                raise ValueError(
                    f"{name} holds gate pre-activations and must be finite; got min {lo:.4g}, "
                    f"max {hi:.4g}"
                )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float ≥ 0, got {eps!r}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps!r}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BHKV", (B, H, K + 1, V + 1))
        if initial_state.device != q.device:
            raise ValueError(
                f"initial_state must be on q's device ({q.device}), got {initial_state.device}"
            )
    return check_scale(scale, K)


def _prepare(q, k, v, i, f, scale, eps, initial_state, check_values):
    """Check; return (q, k, v, i, log f, S0) in the compute dtype and the scale. log f is floored
    where its exp underflows (`floor_log_gate`), so cumulative sums stay finite."""
    scale = _check(q, k, v, i, f, scale, eps, initial_state, check_values)
    dt = compute_dtype(q.dtype)
    qf, kf, vf, i_, f_ = (x.to(dt) for x in (q, k, v, i, f))
    lf = floor_log_gate(F.logsigmoid(f_), dt)
    S0 = None if initial_state is None else initial_state.to(dt)
    return (qf, kf, vf, i_, lf, S0), scale


def _readout(num, den, m, eps):
    """h = num / (max(|den|, exp(−m)) + eps); num [..., V], den and m [...] (`_denominator`)."""
    return num / _denominator(den, m, eps)[0][..., None]


def _recurrent(q, k, v, i, lf, S0, scale, eps):
    """One step at a time, as mlstm_kernels' native_sequence; q, k [B, T, H, K], v [B, T, H, V],
    i, lf [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if S0 is None:
        C, n, m = q.new_zeros(B, H, K, V), q.new_zeros(B, H, K), q.new_zeros(B, H)
    else:
        C, n, m = unpack_state(S0)
    outs = []
    for t in range(T):
        m_new = torch.maximum(lf[:, t] + m, i[:, t])
        a = torch.exp(lf[:, t] + m - m_new)[..., None]
        b = torch.exp(i[:, t] - m_new)[..., None]
        C = a[..., None] * C + (b * k[:, t])[..., None] * v[:, t, :, None, :]
        n = a * n + b * k[:, t]
        qs = q[:, t] * scale
        num = torch.einsum("bhk,bhkv->bhv", qs, C)
        den = (qs * n).sum(-1)
        outs.append(_readout(num, den, m_new, eps))
        m = m_new
    return torch.stack(outs, 1), pack_state(C, n, m)


def _chunk_prologue(q, i, lf, S0, C):
    """What every chunk form pass needs before any [C, C] block: the chunked gates and the
    stabilisers. Returns (b, u, g, (cm, cm_at), M, m_in, m_out, m_fin, S_init): b the cumulated
    log forget within each chunk [N·B·H, C], u = ĩ − b, g the chunks' total log forget
    [N·B·H], u's running max and where it was reached, M = m_t − b_t, the entry and exit
    stabilisers [N·B·H], the final one [B·H], and the entry state [B·H, K, V + 1] (None: zero)."""
    B, T, H, K = q.shape
    N = -(-T // C)
    BH = B * H
    if N * C != T:  # padded steps: no forgetting and no input (ĩ = the dtype's lowest value)
        i = F.pad(i, (0, 0, 0, N * C - T), value=torch.finfo(i.dtype).min)
    b = to_chunks(lf, C).cumsum(1)
    u = to_chunks(i, C) - b
    g = b[:, -1]
    cm, cm_at = u.cummax(1)
    if S0 is None:
        m, S_init = q.new_zeros(BH), None
    else:
        m, S_init = S0[..., -1, -1].reshape(BH), S0[..., :-1, :].reshape(BH, K, -1)
    # the recurrent m at the chunk boundaries: a loop over chunks on [B·H] scalars,
    # m_out = max(g + m_in, g + max u)
    entries = []
    for g_n, a_n in zip(g.view(N, BH), (g + cm[:, -1]).view(N, BH), strict=True):
        entries.append(m)
        m = torch.maximum(g_n + m, a_n)
    m_in = torch.stack(entries)  # [N, B·H]
    m_out = torch.cat([m_in[1:], m[None]]).view(-1)
    m_in = m_in.view(-1)
    M = torch.maximum(cm, m_in[:, None])
    return b, u, g, (cm, cm_at), M, m_in, m_out, m, S_init


def _pack(S, m, B, H):
    """[B·H, K, V + 1] and [B·H] → the packed state [B, H, K + 1, V + 1]."""
    S_out = S.new_zeros(S.shape[0], S.shape[1] + 1, S.shape[2])
    S_out[:, :-1] = S
    S_out[:, -1, -1] = m
    return S_out.view(B, H, *S_out.shape[1:])


def _chunk_core(q, k, v, i, lf, S0, scale, chunk_size, eps=EPS):
    """Chunkwise-parallel form on one time slice, without autograd, every intermediate
    overwritten in place; v [B, T, H, V], V ≥ 1, chunked as [v | 1]. Returns the output in
    chunks [N·B·H, C, V] and the packed final state."""
    B, T, H, K = q.shape
    V1 = v.shape[-1] + 1
    C = min(chunk_size, T)
    BH = B * H
    b, u, g, _, M, m_in, m_out, m, S_init = _chunk_prologue(q, i, lf, S0, C)
    # [N·B·H, C, ·]; [v | 1] built in its chunks (no [B, T, H, V + 1] copy of v first)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), _value_chunks(v, 0, T, C)
    # states[n]: the state entering chunk n (states[N] the final one), stabilised by m_in
    states = q.new_empty(-(-T // C) + 1, BH, K, V1)
    states[0] = 0 if S_init is None else S_init
    # intra-chunk: A_tj = q_t·k_j exp(ĩ_j − b_j − M_t), j ≤ t
    A = (qc @ kc.transpose(1, 2)).mul_(decay_exp(u[:, None, :] - M[:, :, None], True).tril_())
    # each chunk's contribution to its exit state, stabilised by the exit m, written in place
    # of the next entry state, then the states in order: S_{n+1} += α_n S_n
    kc.mul_(decay_exp(g[:, None] + u - m_out[:, None], True)[..., None])
    torch.bmm(kc.transpose(1, 2), vc, out=states[1:].view(-1, K, V1))
    alpha = torch.exp(g + m_in - m_out).view(-1, BH, 1, 1)
    for S_n, S_next, al in zip(states[:-1], states[1:], alpha, strict=True):
        S_next.addcmul_(S_n, al)
    Hc = torch.bmm(qc, states[:-1].view(-1, K, V1))
    Hc.mul_(decay_exp(m_in[:, None] - M, True)[..., None])
    Hc = torch.baddbmm(Hc, A, vc, out=Hc)  # [N·B·H, C, V + 1]: (num | den), unscaled
    # the scale on the denominator column, on the numerator with the division (`_readout`
    # in place: one pass over Hc and no new tensor)
    den, _ = _denominator(Hc[..., -1].mul_(scale), M.add_(b), eps)
    o = Hc[..., :-1].mul_((scale / den)[..., None])
    return o, _pack(states[-1], m, B, H)


# With autograd, the chunk form's [C, C] work (forward, and backward in reverse order) runs over
# groups of whole chunks holding about this many (token, head) rows, so that each group's blocks
# stay in cache (measured at T = 2048, B·H = 4 on one thread: groups of 512 tokens took 0.7-0.8x
# the time of one group of 2048; groups of 256 or 1024 tokens were no faster than 512).
GRAD_SLICE_ROWS = 2048


def _groups(T, BH, C):
    """(first chunk, end chunk, rows, first step, end step) of each group of whole chunks
    (GRAD_SLICE_ROWS)."""
    N, G = -(-T // C), max(1, GRAD_SLICE_ROWS // (BH * C))
    out = []
    for n0 in range(0, N, G):
        n1 = min(n0 + G, N)
        out.append((n0, n1, slice(n0 * BH, n1 * BH), n0 * C, min(n1 * C, T)))
    return out


def _denominator(Yn, m, eps):
    """max(|Y_n|, lo) + eps and lo = exp(−max(m, −cap)), the readout's denominator, for every
    form (the chunk backward reads lo too).

    lo is floored at about √tiny (tiny the dtype's smallest normal; √tiny · e^0.001): where
    exp(−m) underflowed to 0, a zero query row with eps = 0 gave 0 / 0, and √tiny rather than
    tiny keeps den² (the chunk backward's −rr / den²) from underflowing to 0 as well. It only
    matters where |Y_n| < √tiny too (≈ 1e-19 in float32). The floor caps m at hi =
    −log(√tiny) − 0.001 through a detached shift, so d lo / dm stays −lo, the derivative the
    chunk backward uses, and every form's gradient agrees; below hi the value is unchanged."""
    m = m.clamp(min=-_m_cap(m.dtype))
    hi = -0.5 * math.log(torch.finfo(m.dtype).tiny) - 1e-3
    lo = torch.exp(-(m - (m - hi).clamp(min=0).detach()))
    return torch.maximum(Yn.abs(), lo) + eps, lo


def _value_chunks(v, t0, t1, C):
    """[v | 1] of steps t0..t1 in chunks [G·B·H, C, V + 1] (`to_chunks`'s order)."""
    c = chunked(v[:, t0:t1], C)
    out = v.new_empty(*c.shape[:-1], c.shape[-1] + 1)
    out[..., :-1] = c
    out[..., -1] = 1
    return out.view(-1, C, c.shape[-1] + 1)


class _ChunkMLSTM(torch.autograd.Function):
    """The chunk form with its hand-derived backward (see the module docstring): one autograd
    node, its forward run without autograd keeping what the backward needs."""

    @staticmethod
    def forward(ctx, q, k, v, i, lf, S0, scale, chunk_size, eps):
        B, T, H, K = q.shape
        V1 = v.shape[-1] + 1
        C = min(chunk_size, T)
        BH = B * H
        b, u, g, (cm, cm_at), M, m_in, m_out, m, S_init = _chunk_prologue(q, i, lf, S0, C)
        NBH = b.shape[0]
        w = decay_exp(g[:, None] + u - m_out[:, None], True)  # an input's weight at the exit
        w_in = decay_exp(m_in[:, None] - M, True)  # the entry state's weight
        alpha = torch.exp(g + m_in - m_out).view(-1, BH, 1, 1)
        # states[n]: the state entering chunk n (stabilised by m_in), states[N] the final one
        states = q.new_empty(NBH // BH + 1, BH, K, V1)
        states[0] = 0 if S_init is None else S_init
        D, A = (q.new_empty(NBH, C, C) for _ in range(2))
        Y = q.new_empty(NBH, C, V1)  # (num | den), unscaled
        for n0, n1, r, t0, t1 in _groups(T, BH, C):
            qg, kg, vg = (
                to_chunks(q[:, t0:t1], C),
                to_chunks(k[:, t0:t1], C),
                _value_chunks(v, t0, t1, C),
            )
            decay_exp(torch.sub(u[r, None, :], M[r, :, None], out=D[r]), True).tril_()
            torch.bmm(qg, kg.transpose(1, 2), out=A[r]).mul_(D[r])
            k_out = kg.mul_(w[r, :, None])
            torch.bmm(k_out.transpose(1, 2), vg, out=states[n0 + 1 : n1 + 1].view(-1, K, V1))
            steps = zip(states[n0:n1], states[n0 + 1 : n1 + 1], alpha[n0:n1], strict=True)
            for S_n, S_next, al in steps:
                S_next.addcmul_(S_n, al)
            torch.bmm(qg, states[n0:n1].view(-1, K, V1), out=Y[r]).mul_(w_in[r, :, None])
            torch.baddbmm(Y[r], A[r], vg, out=Y[r])
        Yn = Y[..., -1].mul_(scale)  # the scale on the denominator column, on the
        # numerator with the division: one pass over Y fewer
        m_t = M.add_(b)
        den, _ = _denominator(Yn, m_t, eps)
        o = from_chunks(Y[..., :-1].mul_((scale / den)[..., None]), B, T, H)
        kept = (D, A, Yn, w, w_in, alpha, states, m_t, cm, cm_at, m_in)
        ctx.save_for_backward(q, k, v, o, *kept, S0)
        ctx.args = (scale, eps, C)
        ctx.set_materialize_grads(False)
        return o, _pack(states[-1], m, B, H)

    @staticmethod
    def backward(ctx, dO, dS_out):
        refuse_double_backward("mlstm", "chunk", "parallel")
        grads = _chunk_backward(dO, dS_out, *ctx.saved_tensors, *ctx.args)
        return (*grads, None, None, None)


def _chunk_backward(
    dO, dS_out, q, k, v, o, D, A, Yn, w, w_in, alpha, states, m, cm, cm_at, m_in, S0, scale,
    eps, C,
):  # fmt: skip
    """Gradients of (o, final state) with respect to (q, k, v, i, log f, S0) (None for an
    absent S0); the tensors as `_ChunkMLSTM.forward` keeps them (chunk-major [N·B·H, C, ·], m the
    readout's stabiliser b + M)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    V1 = V + 1
    NBH, BH = D.shape[0], B * H
    N = NBH // BH
    dt = q.dtype
    cap = _m_cap(dt)
    # dS[n]: the gradient of the state entering chunk n, dS[N] the final state's
    dS = q.new_empty(N + 1, BH, K, V1)
    sS = None
    if dS_out is None:
        dS[-1] = 0
        g_fin = q.new_zeros(BH)
    else:
        dS[-1] = dS_out[..., :-1, :].reshape(BH, K, V1)
        sS = torch.linalg.vecdot(dS[-1].flatten(1), states[-1].flatten(1))
        g_fin = dS_out[..., -1, -1].reshape(BH).to(dt) - sS
    # the readout h = Y_v / den, den = max(|Y_n|, lo) + eps: dP = scale · dL/dY, the gradient
    # of the unscaled (num | den), formed group by group below from these per-token numbers
    groups = _groups(T, BH, C)
    if dO is None:
        dYY, gm, dPn = (q.new_zeros(NBH, C) for _ in range(3))
    else:
        den, lo = _denominator(Yn, m, eps)
        dOo = [torch.linalg.vecdot(dO[:, t0:t1], o[:, t0:t1]) for *_, t0, t1 in groups]
        rr = to_chunks(torch.cat(dOo, 1), C) * den  # dO·Y_v
        g_den = -rr / (den * den)
        # which side of the max takes the gradient (half each on a tie, as torch.maximum)
        absn = Yn.abs()
        pick = (absn > lo).to(dt) + 0.5 * (absn == lo).to(dt)
        g_n = g_den * pick * torch.sign(Yn)  # dL/dY_n
        dYY = rr / den + g_n * Yn  # dL/dY · Y
        gm = -dYY - g_den * (1 - pick) * lo * (m > -cap).to(dt)  # dL/dm_t
        dPn, dPv_scale = g_n * scale, (scale / den)[..., None]
    kk = q.new_empty(NBH, C)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    for n0, n1, r, t0, t1 in reversed(groups):
        qg, kg, vg = (
            to_chunks(q[:, t0:t1], C),
            to_chunks(k[:, t0:t1], C),
            _value_chunks(v, t0, t1, C),
        )
        dP = q.new_empty(vg.shape)
        if dO is None:
            dP[..., :V] = 0
        else:
            torch.mul(
                chunked(dO[:, t0:t1], C),
                dPv_scale[r].view(n1 - n0, B, H, C, 1),
                out=dP.view(n1 - n0, B, H, C, V1)[..., :V],
            )
        dP[..., V] = dPn[r]
        dP_in = dP * w_in[r, :, None]
        # the state gradients run backwards: dS_n = α_n dS_{n+1} + (w_in q)ᵀ dP
        torch.bmm(qg.transpose(1, 2), dP_in, out=dS[n0:n1].view(-1, K, V1))
        steps = zip(dS[n0:n1], dS[n0 + 1 : n1 + 1], alpha[n0:n1], strict=True)
        for dS_n, dS_next, al in reversed(list(steps)):
            dS_n.addcmul_(dS_next, al)
        ends = dS[n0 + 1 : n1 + 1].view(-1, K, V1)
        G = torch.bmm(dP, vg.transpose(1, 2)).mul_(D[r])  # dL/dA
        dq = torch.bmm(G, kg).baddbmm_(dP_in, states[n0:n1].view(-1, K, V1).transpose(1, 2))
        # the exit weights ride on [v | 1] and k (each used for the last time): one product
        # each, accumulated in place, instead of a product, then a weighted sum
        wr = w[r, :, None]
        dk = torch.bmm(G.transpose(1, 2), qg).baddbmm_(vg.mul_(wr), ends.transpose(1, 2))
        kk[r] = torch.linalg.vecdot(dk, kg)
        dv = torch.bmm(A[r].transpose(1, 2), dP[..., :V]).baddbmm_(kg.mul_(wr), ends[..., :V])
        for x, out in zip((dq, dk, dv), grads, strict=True):
            from_chunks(x, B, t1 - t0, H, out=out[:, t0:t1])

    # gates: the unscaled terms carry exp(b_t) on the query side, exp(ĩ_j − b_j) on the key side
    x_glob = dYY - kk  # dL/db_t through the unscaled state (b cumulated from the start)
    if sS is not None:
        x_glob[-BH:, -1] += sS
    # the stabiliser m_t = b_t + M_t, M_t = max(running max of u = ĩ − b, m_in), chunk by
    # chunk m_out = g + M_C; its gradient run backwards over chunks
    lef = (cm <= m_in[:, None]).to(dt)  # where the entry stabiliser is M
    s_n = (gm * lef).sum(1).view(N, BH)
    c_n = lef[:, -1].view(N, BH)
    g_out, g = [], g_fin
    for s, c in zip(s_n.flip(0), c_n.flip(0), strict=True):
        g_out.append(g)
        g = torch.addcmul(s, c, g)
    g_out = torch.stack(g_out[::-1]).view(NBH)
    gM = gm.clone()
    gM[:, -1] += g_out
    g_u = torch.zeros_like(gM).scatter_add_(1, cm_at, gM * (1 - lef))
    x_loc = gm - g_u
    x_loc[:, -1] += g_out
    # dL/dlog f_s = Σ_{t ≥ s} (x_glob over the sequence, x_loc within the chunk)
    total = x_glob.sum(1).view(N, BH)
    later = total.flip(0).cumsum(0).flip(0) - total
    dlf = (x_loc + x_glob).flip(1).cumsum(1).flip(1).add_(later.view(NBH, 1))
    dS0 = None
    if S0 is not None:
        dS0 = torch.zeros_like(S0)
        dS0[..., :-1, :] = dS[0].view(B, H, K, V1)
        g_m0 = g + torch.linalg.vecdot(dS[0].flatten(1), states[0].flatten(1))
        dS0[..., -1, -1] = g_m0.view(B, H)
    return (*grads, from_chunks(kk + g_u, B, T, H), from_chunks(dlf, B, T, H), dS0)


def _parallel(q, k, v, i, lf, S0, scale, eps):
    """The [T, T] form (mlstm_kernels' parallel kernel, with an initial state and the m_0 term)."""
    B, T, H, K = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, ·]
    i, lf = i.transpose(1, 2), lf.transpose(1, 2)  # [B, H, T]
    b = lf.cumsum(-1)
    if S0 is None:  # zeros, not skipped: every call does the same work (the FLOP count)
        S0 = q.new_zeros(B, H, K + 1, v.shape[-1] + 1)
    C0, n0, m0 = unpack_state(S0)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logD = (b[..., :, None] - b[..., None, :] + i[..., None, :]).masked_fill(~mask, -math.inf)
    m = torch.maximum(logD.max(-1).values, b + m0[..., None])  # [B, H, T]
    A = (q @ k.transpose(-1, -2)) * scale * torch.exp(logD - m[..., None])
    num, den = A @ v, A.sum(-1)
    w0 = torch.exp(b + m0[..., None] - m)  # [B, H, T]: the initial state's weight
    qs = q * (scale * w0[..., None])
    num = num + qs @ C0
    den = den + (qs @ n0[..., None])[..., 0]
    o = _readout(num, den, m, eps).transpose(1, 2)
    # final state: the last row's stabiliser
    mT, bT = m[..., -1], b[..., -1]
    wk = torch.exp(bT[..., None] - b + i - mT[..., None])[..., None] * k  # [B, H, T, K]
    C, n = wk.transpose(-1, -2) @ v, wk.sum(-2)
    w = torch.exp(bT + m0 - mT)[..., None]
    C, n = C + w[..., None] * C0, n + w * n0
    return o, pack_state(C, n, mT)


def _finish(o, S, q, output_final_state):
    return o.to(q.dtype), (S if output_final_state else None)


def _empty(q, v, S0, *inputs):
    """No rows: nothing to compute (the output stays in the graph of `inputs`)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = S0 if S0 is not None else q.new_zeros(B, H, K + 1, V + 1)
    return connected_zeros((B, T, H, V), q, v, S0, *inputs), S


@outside_autocast
def recurrent_mlstm(
    q,
    k,
    v,
    i,
    f,
    scale=None,
    eps=EPS,
    initial_state=None,
    output_final_state=False,
    *,
    check_values=True,
):
    """Reference form: one state update per time step (mlstm_kernels' native_sequence); also the
    decode step (T = 1). q, k [B, T, H, K], v [B, T, H, V], i, f [B, T, H] (pre-activations),
    initial_state [B, H, K + 1, V + 1] (`pack_state`) → (h [B, T, H, V], final state or None)."""
    (qf, kf, vf, i_, lf, S0), scale = _prepare(
        q, k, v, i, f, scale, eps, initial_state, check_values
    )
    if q.shape[0] * q.shape[2] == 0:
        return _finish(*_empty(qf, vf, S0, kf, i_, lf), q, output_final_state)
    o, S = _recurrent(qf, kf, vf, i_, lf, S0, scale, eps)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def chunk_mlstm(
    q,
    k,
    v,
    i,
    f,
    scale=None,
    eps=EPS,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    *,
    check_values=True,
):
    """Chunkwise-parallel form (the training form): quadratic within a chunk of `chunk_size`
    tokens, recurrent across chunks; arguments as `recurrent_mlstm`."""
    check_chunk_size(chunk_size)
    (qf, kf, vf, i_, lf, S0), scale = _prepare(
        q, k, v, i, f, scale, eps, initial_state, check_values
    )
    if q.shape[0] * q.shape[2] == 0:
        return _finish(*_empty(qf, vf, S0, kf, i_, lf), q, output_final_state)
    xs = (qf, kf, vf, i_, lf)
    if vf.shape[-1] == 0:  # no values, the normaliser alone: nothing to gain from chunks
        o, S = _recurrent(*xs, S0, scale, eps)
    elif torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*xs, S0)):
        o, S = _ChunkMLSTM.apply(*xs, S0, scale, chunk_size, eps)
    else:
        with torch.no_grad():  # the core works in place
            o, S = run_sliced(functools.partial(_chunk_core, eps=eps), xs, S0, scale, chunk_size)
    return _finish(o, S, q, output_final_state)


@outside_autocast
def parallel_mlstm(
    q,
    k,
    v,
    i,
    f,
    scale=None,
    eps=EPS,
    initial_state=None,
    output_final_state=False,
    *,
    check_values=True,
):
    """Quadratic form: one [T, T] decay matrix per head, its stabiliser the row max; an oracle.
    Arguments as `recurrent_mlstm`."""
    (qf, kf, vf, i_, lf, S0), scale = _prepare(
        q, k, v, i, f, scale, eps, initial_state, check_values
    )
    if q.shape[0] * q.shape[2] == 0:
        return _finish(*_empty(qf, vf, S0, kf, i_, lf), q, output_final_state)
    o, S = _parallel(qf, kf, vf, i_, lf, S0, scale, eps)
    return _finish(o, S, q, output_final_state)


FORMS = ("recurrent", "chunk", "parallel")


@outside_autocast
def mlstm(
    q,
    k,
    v,
    i,
    f,
    scale=None,
    eps=EPS,
    initial_state=None,
    output_final_state=False,
    form="chunk",
    chunk_size=64,
    *,
    check_values=True,
):
    """The mLSTM in the named form ("recurrent", "chunk" or "parallel").

    check_values: False skips the check that i and f are finite, which reads them back to the
    host (a GPU caller waits for its queue); the mixer passes False (its gates are projections of
    finite activations). Shapes, dtypes and devices are checked either way.
    """
    check_form(form, FORMS)
    args = (q, k, v, i, f, scale, eps, initial_state, output_final_state)
    if form == "chunk":
        return chunk_mlstm(*args, chunk_size=chunk_size, check_values=check_values)
    if form == "parallel":
        return parallel_mlstm(*args, check_values=check_values)
    return recurrent_mlstm(*args, check_values=check_values)


def mlstm_flops(T: int, H: int, K: int, V: int, form: str = "chunk", chunk_size: int = 64) -> Flops:
    """`mlstm` over T tokens in the named form, its final state included.

    Chunk form, per chunk and head (V' = V + 1, the normaliser as one more value column):
    A = Q Kᵀ (2C²K), A [V | 1] (2C²V'), Q S₀ (2CKV'), the chunk's state contribution Kᵀ [V | 1]
    (2CKV'); elementwise the [C, C] decays (≈ 4C²) and the readout. Parallel form: Q Kᵀ and A V
    (2T²(K + V)), the initial state's Q C₀ and Q n₀ (2TK(V + 1)), the final state's Kᵀ V (2TKV);
    the row sums of A and the [T, T] decays elementwise. Recurrent: the readout qᵀC (2KV) by a
    matmul, the updates of C and n elementwise.
    """
    V1 = V + 1
    if form == "recurrent":
        return Flops(2 * K * V, 4 * K * V + 6 * K + 3 * V + 12) * (H * T)
    if form == "parallel":
        matmul = 2 * T * T * (K + V) + 2 * T * K * V1 + 2 * T * K * V
        return Flops(matmul, 6 * T * T + 4 * T * K + 3 * T * V) * H
    C, N = chunk_count(T, chunk_size)
    matmul = 2 * C * C * K + 2 * C * C * V1 + 4 * C * K * V1
    other = 4 * C * C + 3 * C * K + 2 * K * V1 + 3 * C * V
    return Flops(matmul, other) * (H * N)


def _family_inputs(variant, B, T, H, dtype=torch.float32, generator=None, K=64, V=64):
    """q, k, v standard normal; input gate pre-activations N(0, 3²) (exp(ĩ) up to e^10, strong
    inputs); forget gate pre-activations N(2, 3²): log f from about −0.003 to a tail of strong
    forgetting (log f ≈ −7 at 3σ), as trained models' gates spread around the xLSTM init (forget
    bias linspace(3, 6))."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, K),
        "k": randn(B, T, H, K),
        "v": randn(B, T, H, V),
        "i": 3 * randn(B, T, H),
        "f": 2 + 3 * randn(B, T, H),
    }
    return {n: t.to(dtype) for n, t in x.items()}


def _kernels_peer(kind: str):
    """mlstm_kernels' native (PyTorch) `kind` kernel on this module's layout, or None where
    mlstm_kernels is not installed: "chunkwise" (their hand-written backward, which leaves out the
    gradient through the denominator, so dq, dk, di, df are not the output's gradients: they
    rely on the multi-head norm that follows), "chunkwise_autograd" (their chunkwise forward under
    autograd: exact gradients), both on the sequence padded to a whole number of 64-token
    chunks; "parallel" (their [T, T] kernel, hand-written backward)."""
    if importlib.util.find_spec("mlstm_kernels") is None:
        return None
    if kind == "chunkwise":
        from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_custbw as fn
    elif kind == "chunkwise_autograd":
        from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd as fn
    else:
        from mlstm_kernels.torch.parallel.native import mlstm_parallel__native_custbw as fn

    def run(q, k, v, i, f, **_):
        T = q.shape[1]
        pad = 0 if kind == "parallel" else -T % 64
        xs = [F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)).transpose(1, 2) for x in (q, k, v, i, f)]
        return fn(*xs).transpose(1, 2)[:, :T]

    return run


def mlstm_workspace_bytes(variant, form, T, H, grad, K=64, V=64, chunk_size=64, **_):
    """Float32 working memory beyond the inputs, output and gradients. Chunk form without autograd:
    its [C, C] blocks (exponents, decays, A and their copies, about six) formed a slice of at most
    8192 (token, head) rows at a time, and the per-chunk states [K, V + 1]. With autograd: what
    the forward keeps for the backward (each token's rows of the [C, C] decays and products, two
    C wide, and about 32 per-token numbers: gates, stabilisers, the denominator, their gradients),
    the per-chunk states and their gradients, and one group's (GRAD_SLICE_ROWS) chunked inputs,
    gradients and products, about 16 rows of max(K, V, C). Parallel form: its [T, T] blocks;
    recurrent form: its states (every step's, with `grad`)."""
    state = H * (K + 1) * (V + 1) * 4
    if form == "recurrent":
        return (2 * T if grad else 4) * state
    if form == "parallel":
        return 8 * H * T * T * 4 if grad else 8 * H * T * min(T, SLICE_ROWS) * 4
    if not grad:
        rows = min(T, SLICE_ROWS)
        return rows * 6 * H * chunk_size * 4 + 3 * (rows // chunk_size + 1) * state
    group = 16 * min(H * T, GRAD_SLICE_ROWS) * max(K, V, chunk_size) * 4
    return H * T * (2 * chunk_size + 32) * 4 + 2 * (T // chunk_size + 1) * state + group


register_family(
    OpFamily(
        name="mlstm",
        forms={"recurrent": recurrent_mlstm, "chunk": chunk_mlstm, "parallel": parallel_mlstm},
        make_inputs=_family_inputs,
        flops=lambda variant, form, T, H, K=64, V=64, chunk_size=64: mlstm_flops(
            T, H, K, V, form, chunk_size
        ),
        state_bytes=lambda variant, T, H, K=64, V=64: H * (K + 1) * (V + 1) * 4,
        dims={"K": 64, "V": 64},
        peers={
            "mlstm_kernels_chunkwise": lambda: _kernels_peer("chunkwise"),
            "mlstm_kernels_chunkwise_autograd": lambda: _kernels_peer("chunkwise_autograd"),
            "mlstm_kernels_parallel": lambda: _kernels_peer("parallel"),
        },
        targets={"recurrent": 10.0, "peer:mlstm_kernels_chunkwise": 2.0},
        workspace_bytes=mlstm_workspace_bytes,
        doc="xLSTM's mLSTM: C_t = f_t C_{t−1} + i_t v_t k_tᵀ, n_t = f_t n_{t−1} + i_t k_t, "
        "h_t = C_t q_t / max(|n_tᵀ q_t|, exp(−m_t)), exponential input and sigmoid forget gates "
        "stabilised by m (mlstm_kernels' semantics)",
    )
)
