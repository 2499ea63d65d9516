"""xLSTM's sLSTM (Beck et al. 2024): a scalar-memory LSTM with exponential gating, a stabiliser
state and block-diagonal (per-head) recurrent weights, in two forms: recurrent (the reference)
and fused (the fast one). It has no parallel form: every gate reads h_{t−1}.

    ĩ, f̃, z̃, õ = x_t + R h_{t−1} + b                     (per head: R [D, 4D], D = head size)
    a_t = log f_t + m_{t−1}    (log f = log σ(f̃), variant "sigmoid"; log f = f̃, variant "exp")
    m_t = max(ĩ_t, a_t),   i' = exp(ĩ_t − m_t),   f' = exp(a_t − m_t)
    c_t = f' c_{t−1} + i' tanh(z̃_t),   n_t = f' n_{t−1} + i',   h_t = σ(õ_t) c_t / n_t

m is the stabiliser: c and n are the unstabilised cell and normaliser scaled by exp(−m_t), so no
exponential gate overflows and h is what the unstabilised recurrence gives. A unit whose n is 0
is empty (c is 0 there too, the zero initial state): there m_t = ĩ_t and f' = min(exp(a_t − ĩ_t),
1), as the xlstm package's step does (i' = 1, and f' only multiplies zeros, so the values are
those of any m; the clamp shapes the gradient to c_0, n_0). After one step n > 0 (i' or f' is 1),
so the fused form checks for it at the first step only. The output is h_t.

Shapes (H heads of D units; gate order i, f, z, o everywhere, as in the xlstm package):

    x [B, T, 4, H, D]  the input pre-activations W x_t (the projections are the mixer's),
    R [H, D, 4, D]     R[h, k, g, j]: from unit k of h_{t−1} to gate g of unit j, head h,
    b [H, 4, D]        (optional),
    o [B, T, H, D]     h_t,
    initial_state, final state [B, 4, H, D]: (h, c, n, m) stacked on dim 1 (float32; float64
    for float64 inputs; zeros: the empty state).

The xlstm package's vanilla backend (`xlstm.blocks.slstm.src.vanilla.slstm_forward` with its
"slstm" pointwise function, what `sLSTMCell_vanilla` runs) maps to these by
`x.transpose(0, 1).reshape(T, B, 4·H·D)` (its internal "SBGNH" input), the recurrent kernel
`R.permute(0, 2, 3, 1).reshape(H, 4·D, D)` (its `_recurrent_kernel`; our R is exactly its
external `recurrent_kernel` [H, D, 4, D]), the bias `b.transpose(0, 1).reshape(4·H·D)` (its
`_bias`; our b is its external `bias` [H, 4, D]) and the state
`initial_state.transpose(0, 1).reshape(4, B, H·D)`; its states_all[0][1:] [T, B, H·D] is our o
transposed. Its pointwise step clamps i' and f' at 1 (a no-op but for the empty state: m_t ≥
both exponents) and takes m_t = ĩ_t where n is 0 in the whole batch (here: per unit, so that a
sequence does not depend on the others in its batch; the same for every reachable state).
The family's peer "xlstm" is that function called through exactly this mapping (sigmoid forget
gate only: the package has no exponential one).

The fused form (the family's fast form) is one autograd node. The forward runs the recurrence
with one batched product (R h_{t−1} added to the step's input pre-activations) and a dozen
elementwise ops per step on fixed [H, B, ·, D] buffers (the step makes no view: a view costs
about as much as a small op, and the loop is bound by op overhead at these sizes); where a
backward follows it keeps every step's pre-activations and states, else h alone. Its
backward is the adjoint recurrence run in reverse (δ the loss's gradient, carried: δc, δn, δm):

    δh_t = δo_t + R δg_{t+1},    δc_t ← δc_t + δh σ(õ)/n,    δn_t ← δn_t − δh h_t/n,
    δi' = δc tanh(z̃) + δn,       δf' = δc c_{t−1} + δn n_{t−1},
    δm_t ← δm_t − δi' i' − δf' f',   δĩ = δi' i' + [m = ĩ] δm,   δa = δf' f' + [m = a] δm,
    δf̃ = δa σ(−f̃) (sigmoid) or δa (exp),   δz̃ = δc i' (1 − tanh²),   δõ = δh c/n σ'(õ),
    δc_{t−1} = δc f',   δn_{t−1} = δn f',   δm_{t−1} = δa,

then δR = Σ_t h_{t−1}ᵀ δg_t and δb = Σ δg_t in one batched product and one sum; the factors that
do not depend on δ (σ(õ)/n, h/n, i'(1 − tanh²), c/n σ'(õ), σ(−f̃)), and the gates themselves
(from the kept pre-activations and stabilisers), are formed for all steps at once before the
reverse loop.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from seqlab.ops._common import (
    check_shape,
    check_tensor,
    compute_dtype,
    outside_autocast,
    refuse_double_backward,
)
from seqlab.ops.registry import Flops, OpFamily, register_family

FORGET = ("sigmoid", "exp")


def _check(x, R, b, initial_state, forget):
    """Check shapes, dtypes, devices; return (batch, T, heads H, head size D)."""
    check_tensor("x", x)
    check_tensor("R", R)
    if forget not in FORGET:
        raise ValueError(f"forget must be one of {FORGET}, got {forget!r}")
    if x.dim() != 5 or x.shape[2] != 4:
        raise ValueError(
            f"x must have shape [B, T, 4, H, D] (the pre-activations of gates i, f, z, o), "
            f"got {tuple(x.shape)}"
        )
    Bsz, T, _, H, D = x.shape
    if R.dim() != 4:
        raise ValueError(f"R must have rank 4 [H, D, 4, D], got shape {tuple(R.shape)}")
    check_shape("R", R, "HDGD", (H, D, 4, D))
    if b is not None:
        check_tensor("b", b)
        check_shape("b", b, "HGD", (H, 4, D))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BSHD", (Bsz, 4, H, D))
    tensors = [t for t in (x, R, b, initial_state) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(
            f"all inputs must be on one device, got {[str(t.device) for t in tensors]}"
        )
    if T == 0:
        raise ValueError("the sequence is empty: x has T = 0 time steps")
    if H == 0 or D == 0:
        raise ValueError(f"x has no units: H = {H}, D = {D} (shape {tuple(x.shape)})")
    return Bsz, T, H, D


def _prepare(x, R, b, initial_state, forget):
    """Check; return x, R, b, the initial state in the compute dtype (b, state may be None)."""
    _check(x, R, b, initial_state, forget)
    dt = compute_dtype(x.dtype)
    return (
        x.to(dt),
        R.to(dt),
        None if b is None else b.to(dt),
        None if initial_state is None else initial_state.to(dt),
    )


def _log_forget(f, forget):
    # contiguous first: on a strided view torch's CPU log_sigmoid may split even a few hundred
    # elements over threads, costing up to milliseconds a call on a busy machine
    return F.logsigmoid(f.contiguous()) if forget == "sigmoid" else f


def _recurrent(x, R, b, S0, forget):
    """The step exactly as written, one step per token; x [B, T, 4, H, D] → o [B, T, H, D] and
    the state [B, 4, H, D] after the last step."""
    Bsz, T, _, H, D = x.shape
    if S0 is None:
        S0 = x.new_zeros(Bsz, 4, H, D)
    h, c, n, m = S0.unbind(1)
    if b is not None:
        x = x + b.transpose(0, 1)  # [4, H, D]
    outs = []
    for t in range(T):
        rec = torch.einsum("bhk,hkgj->bghj", h, R)
        i, f, z, o = (x[:, t] + rec).unbind(1)
        a = _log_forget(f, forget) + m
        m = torch.where(n == 0, i, torch.maximum(i, a))
        ip, fp = torch.exp(i - m), torch.exp(a - m).clamp(max=1)
        c = fp * c + ip * torch.tanh(z)
        n = fp * n + ip
        h = torch.sigmoid(o) * c / n
        outs.append(h)
    return torch.stack(outs, dim=1), torch.stack((h, c, n, m), dim=1)


class _Fused(torch.autograd.Function):
    """The recurrence over time-major buffers, its adjoint as backward (module docstring).
    Keeps the pre-activations and every step's gates and states: O(B T H D)."""

    @staticmethod
    def forward(ctx, x, R, b, S0, forget, keep):
        Bsz, T, _, H, D = x.shape
        # G[t] [H, B, 4, D]: the step's input pre-activations x + b; with `keep` (a backward
        # will follow) R h_{t−1} is added before the step, so G holds every step's gates
        G = x.new_empty(T, H, Bsz, 4, D)  # a new buffer: contiguous() may return x itself
        if b is None:
            G.copy_(x.permute(1, 3, 0, 2, 4))
        else:
            torch.add(x.permute(1, 3, 0, 2, 4), b[:, None], out=G)
        R2 = R.reshape(H, D, 4 * D)
        # the step works in fixed buffers, so no view is made per step (a view costs about as
        # much as a small op): S (h, c, n, m) [4, H, B, D], the gates g [H, B, 4, D] whose f̃
        # slot is overwritten by a_t (then ĩ and a sit side by side and the max's two
        # differences and exps are one op each), E = (i', f') [H, B, 2, D], TZ = (tanh z̃, 1)
        # [2, H, B, D] (scales i' into (c, n) in one op), σ(õ)
        S = x.new_zeros(4, H, Bsz, D)  # a new buffer: the caller's S0 is never written
        if S0 is not None:
            S.copy_(S0.permute(1, 2, 0, 3))
        h, c, n, m = S.unbind(0)
        cn, m3 = S[1:3], m[:, :, None]
        g = x.new_empty(H, Bsz, 4, D)
        g3, gia = g.view(H, Bsz, 4 * D), g[:, :, :2]
        gi, gf, gz, go = g.unbind(2)
        E = x.new_empty(H, Bsz, 2, D)
        ip, fp = E.unbind(2)
        TZ = x.new_ones(2, H, Bsz, D)
        tz = TZ[0]
        so, fc = x.new_empty(H, Bsz, D), x.new_empty(H, Bsz, D)
        empty = n == 0  # units that start empty: m_1 = ĩ_1, f' clamped at 1
        # the history: with `keep` every state (St[0] the initial one), else h alone
        if keep:
            St = x.new_empty(T + 1, 4, H, Bsz, D)
            St[0] = S
            hist, src = St.unbind(0)[1:], S
        else:
            O = x.new_empty(T, H, Bsz, D)
            hist, src = O.unbind(0), h
        Gs = G.view(T, H, Bsz, 4 * D).unbind(0)
        sigmoid = forget == "sigmoid"
        for t in range(T):
            torch.baddbmm(Gs[t], h, R2, out=g3)  # out=, not baddbmm_: FLOP counters see it
            if keep:
                Gs[t].copy_(g3)
            if sigmoid:  # log σ on a contiguous copy (see _log_forget)
                torch.add(F.logsigmoid(fc.copy_(gf)), m, out=gf)
            else:
                gf.add_(m)
            torch.maximum(gi, gf, out=m)
            if t == 0:
                torch.where(empty, gi, m, out=m)
            torch.sub(gia, m3, out=E).exp_()
            if t == 0:
                fp.clamp_(max=1)
            torch.tanh(gz, out=tz)
            torch.sigmoid(go, out=so)
            cn.mul_(fp).addcmul_(TZ, ip)
            torch.mul(so, c, out=h).div_(n)
            hist[t].copy_(src)
        if keep:
            ctx.save_for_backward(R, G, St)
            ctx.forget, ctx.has_b, ctx.has_S0 = forget, b is not None, S0 is not None
            O = St[1:, 0]
        o = O.permute(2, 0, 1, 3).contiguous()  # [B, T, H, D]
        return o, S.permute(2, 0, 1, 3).clone()

    @staticmethod
    def backward(ctx, do, dS):
        refuse_double_backward("slstm", "fused", "recurrent")
        R, G, St = ctx.saved_tensors
        T, H, Bsz, _, D = G.shape
        Hs, Cs, Ns = St[1:, 0], St[1:, 1], St[1:, 2]  # [T, H, B, D]
        # the step's gates again, for all steps at once, from the kept pre-activations
        i, ft, z, og = G.unbind(3)
        m_prev, m = St[:-1, 3], St[1:, 3]
        a = _log_forget(ft, ctx.forget) + m_prev
        ip, fp = torch.exp(i - m), torch.exp(a - m)
        fp[0].clamp_(max=1)
        tz, so = torch.tanh(z), torch.sigmoid(og)
        # factors of δ that do not depend on it, for all steps at once
        inv_n = Ns.reciprocal()
        dc_dh = so * inv_n  # ∂h/∂c
        dn_dh = Hs * inv_n  # −∂h/∂n
        dz_dc = ip * (1 - tz * tz)  # ∂c/∂z̃
        do_dh = Cs * inv_n * so * (1 - so)  # ∂h/∂õ
        # the max took ĩ; on a tie half each way, as torch.maximum (the recurrent form) splits
        sel_i = (i > a).to(G.dtype) + 0.5 * (i == a).to(G.dtype)
        # first step: empty units took ĩ, and where their f' was clamped at 1 it has no slope
        empty = St[0, 2] == 0
        sel_i[0].masked_fill_(empty, 1.0)
        sel_a = 1 - sel_i
        fp_slope0 = fp[0].masked_fill(a[0] > St[1, 3], 0.0)
        df_da = torch.sigmoid(-ft) if ctx.forget == "sigmoid" else None
        # δo as time-major [T, H, B, D], R δg_{t+1} added in place as the loop goes
        dH = torch.zeros(T, H, Bsz, D, dtype=G.dtype, device=G.device)
        if do is not None:
            dH += do.permute(1, 2, 0, 3)
        dG = torch.empty_like(G)
        RT = R.reshape(H, D, 4 * D).transpose(1, 2)  # [H, 4D, D]
        if dS is None:
            dS = torch.zeros(Bsz, 4, H, D, dtype=G.dtype, device=G.device)
        dS = dS.permute(1, 2, 0, 3)  # [4, H, B, D]
        dH[T - 1] += dS[0]
        dc_next, dn_next, dm_next = dS[1], dS[2], dS[3]
        dHs, dGs = dH.unbind(0), dG.unbind(0)
        for t in range(T - 1, -1, -1):
            dh = dHs[t]
            if t < T - 1:
                torch.baddbmm(dh, dGs[t + 1].view(H, Bsz, 4 * D), RT, out=dh)
            dg = dGs[t]
            di, df, dz, do_ = dg.unbind(2)
            dc = torch.addcmul(dc_next, dh, dc_dh[t])
            dn = torch.addcmul(dn_next, dh, dn_dh[t], value=-1)
            dip = torch.addcmul(dn, dc, tz[t])
            dfp = torch.mul(dc, St[t, 1]).addcmul_(dn, St[t, 2])
            dip.mul_(ip[t])
            dfp.mul_(fp[t] if t > 0 else fp_slope0)
            dm = dm_next - dip - dfp
            torch.addcmul(dip, dm, sel_i[t], out=di)
            da = torch.addcmul(dfp, dm, sel_a[t])
            if df_da is None:
                df.copy_(da)
            else:
                torch.mul(da, df_da[t], out=df)
            torch.mul(dc, dz_dc[t], out=dz)
            torch.mul(dh, do_dh[t], out=do_)
            dc_next, dn_next, dm_next = dc * fp[t], dn * fp[t], da
        dx = dG.permute(2, 0, 3, 1, 4)  # [B, T, 4, H, D]
        db = dG.sum(dim=(0, 2)) if ctx.has_b else None
        # δR[h] = Σ_t h_{t−1}ᵀ δg_t: [H, D, T·B] @ [H, T·B, 4D]
        Hprev = St[:-1, 0].permute(1, 3, 0, 2).reshape(H, D, T * Bsz)
        dR = torch.bmm(Hprev, dG.permute(1, 0, 2, 3, 4).reshape(H, T * Bsz, 4 * D))
        dS0 = None
        if ctx.has_S0:
            dh0 = torch.bmm(dG[0].view(H, Bsz, 4 * D), RT)
            dS0 = torch.stack((dh0, dc_next, dn_next, dm_next)).permute(2, 0, 1, 3)
        return dx, dR.view(H, D, 4, D), db, dS0, None, None


def _finish(o, S, x, output_final_state):
    return o.to(x.dtype), (S if output_final_state else None)


@outside_autocast
def recurrent_slstm(x, R, b=None, forget="sigmoid", initial_state=None, output_final_state=False):
    """Reference form: the step as written, one per token (autograd through the loop). Also
    the decode step (T = 1)."""
    xf, Rf, bf, S0 = _prepare(x, R, b, initial_state, forget)
    o, S = _recurrent(xf, Rf, bf, S0, forget)
    return _finish(o, S, x, output_final_state)


@outside_autocast
def fused_slstm(x, R, b=None, forget="sigmoid", initial_state=None, output_final_state=False):
    """Fused form (the training form): the loop over in-place buffers, one autograd node whose
    backward is the reverse (adjoint) loop."""
    xf, Rf, bf, S0 = _prepare(x, R, b, initial_state, forget)
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xf, Rf, bf, S0)
    )
    o, S = _Fused.apply(xf, Rf, bf, S0, forget, keep)
    return _finish(o, S, x, output_final_state)


@outside_autocast
def slstm(*args, form="fused", **kwargs):
    """The sLSTM in the named form ("recurrent" or "fused")."""
    if form == "fused":
        return fused_slstm(*args, **kwargs)
    if form == "recurrent":
        return recurrent_slstm(*args, **kwargs)
    raise ValueError(f"form must be one of 'recurrent', 'fused', got {form!r}")


def slstm_flops(variant: str = "sigmoid", form: str = "fused", T: int = 1, H: int = 1, *, D: int):
    """One sequence of T tokens, H heads of D units, both forms alike.

    matmul (what torch's FlopCounterMode sees): R h_{t−1}, one [D] @ [D, 4D] product per head and
    token (8 D² per head). other, per unit and token: the
    input and bias adds (8), log σ(f̃) (1, sigmoid only), a, the max, two differences and two exps
    (6), tanh and σ (2), c (3), n (2), h (2)."""
    if form not in ("recurrent", "fused"):
        raise ValueError(f"slstm has no form {form!r}")
    other = 23 + (variant == "sigmoid")
    return Flops(8 * H * D * D * T, other * H * D * T)


def slstm_state_bytes(variant: str = "sigmoid", T: int = 0, H: int = 1, *, D: int) -> int:
    """h, c, n, m [H, D] of one sequence, float32."""
    return 4 * 4 * H * D


def slstm_workspace_bytes(variant, form, T, H, grad, D=64, **_):
    """The fused form's time-major buffers: without `grad` the pre-activations 4, h and the
    output 2 per unit and token; with `grad` the pre-activations and states 4 + 4 kept, the
    output, and the backward's gates recomputed 5, δg 4, δh 1 and six factors; the recurrent
    form's and the xlstm package's autograd graphs, about 40 tensors per unit and token (a few
    without `grad`)."""
    if form == "fused":
        return 4 * T * H * D * (24 if grad else 6)
    return 4 * H * D * (40 * T if grad else 16)


def make_slstm_inputs(
    variant: str,
    B: int,
    T: int,
    H: int = 1,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    *,
    D: int = 64,
) -> dict:
    """Pre-activations x as a trained sLSTM sees them: ĩ spread wide (exponential gate; one in
    twenty entries ±12, where the stabiliser matters), f̃, z̃, õ standard normal; R normal with
    std D^-1/2; b the xlstm package's init (the forget bias its "powerlaw_blockdependent" ramp
    from 5 down to −7 across units, strong forgetting included; the others small)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = randn(B, T, 4, H, D)
    spike = torch.rand(B, T, H, D, generator=generator, dtype=torch.float64) < 0.05
    x[:, :, 0] = torch.where(spike, 12.0 * x[:, :, 0].sign(), 2.0 * x[:, :, 0])
    b = 0.1 * randn(H, 4, D)
    ramp = torch.arange(D, dtype=torch.float64) / max(D - 1, 1)
    b[:, 1] = 5.0 - 12.0 * ramp**0.3
    return {
        "x": x.to(dtype),
        "R": (randn(H, D, 4, D) * D**-0.5).to(dtype),
        "b": b.to(dtype),
        "forget": variant,
    }


def _xlstm_peer():
    """The xlstm package's vanilla sLSTM (`slstm_forward` with its "slstm" pointwise step, what
    sLSTMCell_vanilla runs) as fn(**inputs) → o [B, T, H, D] in seqlab's layout, or None where
    the package is not installed."""
    if importlib.util.find_spec("xlstm") is None:
        return None
    from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

    pointwise = slstm_pointwise_function_registry["slstm"]

    def peer(x, R, b=None, forget="sigmoid", initial_state=None):
        if forget != "sigmoid":
            raise ValueError("the xlstm package's sLSTM has only the sigmoid forget gate")
        Bsz, T, _, H, D = x.shape
        if b is None:
            b = x.new_zeros(H, 4, D)
        if initial_state is None:
            states = x.new_zeros(4, Bsz, H * D)
        else:
            states = initial_state.transpose(0, 1).reshape(4, Bsz, H * D)
        states_all, _, _ = slstm_forward(
            x.transpose(0, 1).reshape(T, Bsz, 4 * H * D),
            states,
            R.permute(0, 2, 3, 1).reshape(H, 4 * D, D),
            b.transpose(0, 1).reshape(4 * H * D),
            pointwise,
        )
        return states_all[0, 1:].view(T, Bsz, H, D).transpose(0, 1)

    return peer


register_family(
    OpFamily(
        name="slstm",
        forms={"recurrent": recurrent_slstm, "fused": fused_slstm},
        reference="recurrent",
        fast="fused",
        variants=FORGET,
        make_inputs=make_slstm_inputs,
        flops=slstm_flops,
        state_bytes=slstm_state_bytes,
        workspace_bytes=slstm_workspace_bytes,
        dims={"D": 64},
        peers={"xlstm": _xlstm_peer},
        # a non-linear recurrence: no chunk form to beat the loop with, half the xlstm CPU cell
        targets={"peer:xlstm": 2.0},
        doc="xLSTM's sLSTM: exponential input gate, sigmoid or exponential forget gate, "
        "stabiliser m, normaliser n, block-diagonal recurrence per head",
    )
)
