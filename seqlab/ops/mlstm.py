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
    compute_dtype,
    decay_exp,
    floor_log_gate,
    outside_autocast,
    run_sliced,
    to_chunks,
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
        if check_values and x.numel() and not bool(x.isfinite().all()):
            raise ValueError(
                f"{name} holds gate pre-activations and must be finite; got min "
                f"{x.min().item():.4g}, max {x.max().item():.4g}"
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
    """h = num / (max(|den|, exp(−m)) + eps); num [..., V], den and m [...]."""
    lo = torch.exp(-m.clamp(min=-_m_cap(m.dtype)))
    return num / (torch.maximum(den.abs(), lo) + eps)[..., None]


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


def _chunk_core(q, k, v1, i, lf, S0, scale, chunk_size, eps=EPS):
    """Chunkwise-parallel form on one time slice; v1 = [v | 1] [B, T, H, V + 1]. Returns the
    output in chunks [N·B·H, C, V] and the packed final state."""
    B, T, H, K = q.shape
    V1 = v1.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    BH = B * H
    inplace = not torch.is_grad_enabled()
    if N * C != T:  # padded steps: no forgetting and no input (ĩ = the dtype's lowest value)
        i = F.pad(i, (0, 0, 0, N * C - T), value=torch.finfo(i.dtype).min)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v1, C)  # [N·B·H, C, ·]
    b = to_chunks(lf, C).cumsum(1)  # [N·B·H, C]: cumulated log forget within the chunk
    u = to_chunks(i, C) - b  # ĩ_j − b_j
    g = b[:, -1]  # [N·B·H]: the chunk's total log forget
    a = g + u.max(1).values  # the largest exponent of an input reaching the chunk's exit

    # entry stabiliser of every chunk (the recurrent m at the chunk boundaries)
    if S0 is None:
        m, S = q.new_zeros(BH), q.new_zeros(BH, K, V1)
    else:
        S, m = S0[..., :-1, :].reshape(BH, K, V1), S0[..., -1, -1].reshape(BH)
    entries = []
    for g_n, a_n in zip(g.view(N, BH), a.view(N, BH), strict=True):
        entries.append(m)
        m = torch.maximum(g_n + m, a_n)
    m_in = torch.stack(entries)  # [N, B·H]
    m_out = torch.cat([m_in[1:], m[None]]).view(-1)
    m_in = m_in.view(-1)

    M = torch.maximum(u.cummax(1).values, m_in[:, None])  # [N·B·H, C]: m_t − b_t
    # intra-chunk: A_tj = s q_t·k_j exp(ĩ_j − b_j − M_t), j ≤ t
    E = u[:, None, :] - M[:, :, None]
    D = decay_exp(E, inplace)
    D = D.tril_() if inplace else D.tril()
    A = qc @ kc.transpose(1, 2)
    A = A.mul_(D) if inplace else A * D
    # each chunk's contribution to its exit state, stabilised by the exit m
    w = decay_exp(g[:, None] + u - m_out[:, None], inplace)[..., None]
    k_out = kc.mul_(w) if inplace else kc * w
    dS = (k_out.transpose(1, 2) @ vc).view(N, BH, K, V1)
    alpha = torch.exp(g.view(N, BH) + m_in.view(N, BH) - m_out.view(N, BH))
    states = []
    for al_n, dS_n in zip(alpha, dS, strict=True):
        states.append(S)
        S = torch.addcmul(dS_n, S, al_n[:, None, None])
    starts = torch.stack(states).view(-1, K, V1)  # the state entering each chunk
    w_in = decay_exp(m_in[:, None] - M, inplace)[..., None]
    q_in = qc.mul_(w_in) if inplace else qc * w_in
    Hc = A @ vc
    Hc = torch.baddbmm(Hc, q_in, starts, out=Hc) if inplace else torch.baddbmm(Hc, q_in, starts)
    Hc = Hc.mul_(scale) if inplace else Hc * scale
    o = _readout(Hc[..., :-1], Hc[..., -1], b + M, eps)
    S_out = torch.cat([S, torch.zeros_like(S[:, :1])], 1)
    S_out[:, -1, -1] = m
    return o, S_out.view(B, H, K + 1, V1)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: the normaliser n is C's column for a value of 1."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


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


def _empty(q, v, S0):
    """No rows or no values: nothing to compute."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = S0 if S0 is not None else q.new_zeros(B, H, K + 1, V + 1)
    return q.new_zeros(B, T, H, V), S


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
        return _finish(*_empty(qf, vf, S0), q, output_final_state)
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
        return _finish(*_empty(qf, vf, S0), q, output_final_state)
    core = functools.partial(_chunk_core, eps=eps)
    o, S = run_sliced(core, (qf, kf, _with_ones(vf), i_, lf), S0, scale, chunk_size)
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
        return _finish(*_empty(qf, vf, S0), q, output_final_state)
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
    """The chunk form's [C, C] blocks in float32 (exponents, decays, A and their copies, about
    six), kept for backward with `grad`, else formed a slice of at most 8192 tokens at a time, and
    its per-chunk states [K, V + 1]; the parallel form's [T, T] blocks; the recurrent form's
    states (every step's, with `grad`)."""
    state = H * (K + 1) * (V + 1) * 4
    if form == "recurrent":
        return (2 * T if grad else 4) * state
    rows = T if grad else min(T, SLICE_ROWS)
    if form == "parallel":
        return 8 * H * T * rows * 4
    return rows * 6 * H * chunk_size * 4 + 3 * (rows // chunk_size + 1) * state


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
