"""Mamba-1's selective scan (S6) in three forms: recurrent (the reference), scan (the fast one)
and chunk.

    Δ_t = softplus(delta_t + delta_bias)  (or delta_t + delta_bias without delta_softplus)
    h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_tᵀ,    y_t = h_t C_t + D ⊙ u_t

per channel d: h_t[d] is a vector of N states, each its own scalar recurrence with decay
exp(Δ_t[d] A[d, n]). Shapes here (time before channels, as every seqlab op):

    u, delta [B, T, D],  A [D, N],  B, C [B, T, N] (one group),  D, delta_bias [D],
    initial_state and the final state [B, D, N] (float32; float64 for float64 inputs).

mamba-ssm's `selective_scan_ref(u, delta, A, B, C, D, z=None, delta_bias, delta_softplus,
return_last_state)` takes u, delta [B, D, T] and B, C [B, N, T] (or [B, G, N, T]): its arguments
map to these by `u.transpose(1, 2)`, `delta.transpose(1, 2)`, `B.transpose(1, 2)`,
`C.transpose(1, 2)`, and its y [B, D, T] is ours transposed; A, D, delta_bias and the last state
[B, D, N] are the same. Its optional z gate (y · silu(z)) is left to the caller (the Mamba mixer).
The family's peer "mamba-ssm" (an optional extra, see `_mamba_ssm_peer`) is that function called
through exactly this mapping.

The scan form (the family's fast form, what the Mamba mixer runs) is one autograd node. It forms
every decay factor E_t = exp(Δ_t A) and every input (Δ_t u_t) B_tᵀ once, as time-major
[T, B, D, N] buffers, runs the recurrence in place with one fused multiply-add per token over all
channels and states (h_t += E_t ⊙ h_{t−1}), and reads all outputs out with one batched product.
Its backward is the adjoint recurrence run the same way in reverse,

    g_t = C_t dy_tᵀ + E_{t+1} ⊙ g_{t+1}   (g_T also takes the final state's gradient),

then ∂(ΔA)_t = g_t ⊙ E_t ⊙ h_{t−1}, ∂(Δu)_t = g_t B_t, ∂B_t = g_tᵀ Δ_t u_t, ∂C_t = h_tᵀ dy_t and
∂h_0 = E_1 ⊙ g_1: a handful of passes over O(B T D N) buffers (E, the states, g) and T small
in-place steps each way, instead of autograd's graph of T steps. Decays are only ever
multiplied (no cumulative sums of log-decays, no ratios), so no gate value overflows, and the exp
argument is clamped at `_common.exp_floor` (exp there is 0 in effect), so strong decays cost no
time in subnormal arithmetic.

The chunk form cuts T into chunks of C steps. Every decay factor exp(Δ A) is taken once over the
whole input (its argument clamped at `_common.exp_floor`, so strong decays cost no time), then
(1) a loop over the C positions of a chunk runs the recurrence from a zero state in every chunk
at once (batched over chunks), giving each chunk's local end state and its total decay,
(2) a loop over the chunks carries the true state from chunk to chunk, and
(3) a second loop over the C positions runs each chunk from its true start state and reads the
outputs out with one batched product per position (y = h C).
So 2C + T / C Python steps, each over all chunks, instead of T: the same elementwise work as the
recurrence, without its per-step dispatch cost. Every factor is a product of decays ≤ 1, never
a ratio, so no strong decay overflows (a cumulative-sum-and-divide scan would).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F

from seqlab.ops._common import (
    check_chunk_size,
    check_shape,
    check_tensor,
    chunk_count,
    compute_dtype,
    decay_exp,
    exp_floor,
    outside_autocast,
    refuse_double_backward,
)
from seqlab.ops.registry import Flops, OpFamily, register_family


def _check(u, delta, A, B, C, D, delta_bias, initial_state):
    """Check shapes, dtypes, devices; return (batch, T, channels D, states N)."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_tensor(name, x)
    if u.dim() != 3:
        raise ValueError(f"u must have rank 3 [B, T, D], got shape {tuple(u.shape)}")
    Bsz, T, Dd = u.shape
    check_shape("delta", delta, "BTD", (Bsz, T, Dd))
    if A.dim() != 2:
        raise ValueError(f"A must have rank 2 [D, N], got shape {tuple(A.shape)}")
    check_shape("A", A, "DN", (Dd, None))
    N = A.shape[1]
    check_shape("B", B, "BTN", (Bsz, T, N))
    check_shape("C", C, "BTN", (Bsz, T, N))
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            check_tensor(name, x)
            check_shape(name, x, "D", (Dd,))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BDN", (Bsz, Dd, N))
    tensors = [x for x in (u, delta, A, B, C, D, delta_bias, initial_state) if x is not None]
    if len({x.device for x in tensors}) > 1:
        raise ValueError(
            f"all inputs must be on one device, got {[str(x.device) for x in tensors]}"
        )
    if T == 0:
        raise ValueError("the sequence is empty: u has T = 0 time steps")
    if N == 0:
        raise ValueError(f"A has N = 0 states (shape {tuple(A.shape)}): a scan needs a state")
    return Bsz, T, Dd, N


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    """Check; return inputs in the compute dtype with Δ formed (bias, softplus)."""
    _check(u, delta, A, B, C, D, delta_bias, initial_state)
    dt = compute_dtype(u.dtype)
    u, delta, A, B, C = (x.to(dt) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = None if initial_state is None else initial_state.to(dt)
    return u, delta, A, B, C, None if D is None else D.to(dt), h0


def _finish(y, h, u, D, uf, output_final_state):
    if D is not None:
        y = y + uf * D
    return y.to(u.dtype), (h if output_final_state else None)


def _recurrent(u, delta, A, B, C, h):
    """Loop over time; u, delta [B, T, D], A [D, N], B, C [B, T, N], h [B, D, N]."""
    Bsz, T, Dd = u.shape
    if h is None:
        h = u.new_zeros(Bsz, Dd, A.shape[1])
    x = delta * u
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + x[:, t, :, None] * B[:, t, None, :]
        ys.append(torch.bmm(h, C[:, t, :, None])[..., 0])
    return torch.stack(ys, dim=1), h


def _chunk(u, delta, A, B, C, h0, chunk_size):
    """The three passes of the module docstring; the same shapes as `_recurrent`."""
    Bsz, T, Dd = u.shape
    N = A.shape[1]
    L, K = chunk_count(T, chunk_size)  # chunk length, number of chunks
    pad = K * L - T
    x = delta * u
    if pad:  # Δ = 0: decay 1 and no input, so padding leaves the state as it is
        x, delta = (F.pad(t, (0, 0, 0, pad)) for t in (x, delta))
        B, C = (F.pad(t, (0, 0, 0, pad)) for t in (B, C))
    # position-major [L, B·K, ...]: unbind gives each position's slice of every chunk, and its
    # backward stacks the gradients once (indexing would add a full-size zero tensor per step)
    x = x.view(Bsz, K, L, Dd).permute(2, 0, 1, 3).reshape(L, Bsz * K, Dd, 1)
    Bc = B.view(Bsz, K, L, N).permute(2, 0, 1, 3).reshape(L, Bsz * K, 1, N)
    Cc = C.view(Bsz, K, L, N).permute(2, 0, 1, 3).reshape(L, Bsz * K, N, 1)
    delta = delta.view(Bsz, K, L, Dd).permute(2, 0, 1, 3).reshape(L, Bsz * K, Dd, 1)
    E = decay_exp(delta * A)  # [L, B·K, D, N]
    Es, xBs = E.unbind(0), (x * Bc).unbind(0)

    # (1) each chunk from a zero state: local end state and total decay
    h, decay = xBs[0], Es[0]
    for i in range(1, L):
        h = Es[i] * h + xBs[i]
        decay = decay * Es[i]
    h, decay = h.view(Bsz, K, Dd, N).unbind(1), decay.view(Bsz, K, Dd, N).unbind(1)
    # (2) carry the true state across chunks
    s = u.new_zeros(Bsz, Dd, N) if h0 is None else h0
    starts = []
    for k in range(K):
        starts.append(s)
        s = decay[k] * s + h[k]
    # (3) each chunk from its true start, outputs by batched products
    h = torch.stack(starts, dim=1).view(Bsz * K, Dd, N)
    hs = []
    for i in range(L):
        h = Es[i] * h + xBs[i]
        hs.append(h)
    # all readouts in one batched product: [L·B·K, D, N] @ [L·B·K, N, 1]
    y = torch.bmm(torch.stack(hs).view(L * Bsz * K, Dd, N), Cc.reshape(L * Bsz * K, N, 1))
    y = y.view(L, Bsz, K, Dd).permute(1, 2, 0, 3).reshape(Bsz, K * L, Dd)
    return y[:, :T], s


class _Scan(torch.autograd.Function):
    """h_t = E_t h_{t−1} + Δ_t u_t B_t, y_t = h_t C_t over time-major [T, B, D, N] buffers, with
    its adjoint as backward: g_t = C_t dy_t + E_{t+1} g_{t+1} (g_T also takes the final state's
    gradient), a reverse scan of the same kind. Saves E and every state (O(B T D N))."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        Bsz, T, Dd = u.shape
        N = A.shape[1]
        dt = delta.transpose(0, 1)  # [T, B, D]
        x = dt * u.transpose(0, 1)  # Δu
        Bt, Ct = B.transpose(0, 1), C.transpose(0, 1)  # [T, B, N]
        E = torch.mul(dt[..., None], A, out=u.new_empty(T, Bsz, Dd, N))
        # factors clamped at the floor become exactly 0, as exp(Δ A) is for a huge Δ: else the
        # backward's ∂A = Σ (g ⊙ E ⊙ h) Δ would multiply a floored e^−30 by that Δ and overflow
        F.threshold(decay_exp(E, inplace=True), math.exp(exp_floor(E.dtype) + 0.5), 0.0, True)
        H = u.new_empty(T + 1, Bsz, Dd, N)  # H[0] = h0, H[t + 1] = h_t
        H[0] = 0 if h0 is None else h0
        torch.mul(x[..., None], Bt[:, :, None, :], out=H[1:])
        Hs, Es = H.unbind(0), E.unbind(0)
        for t in range(T):
            Hs[t + 1].addcmul_(Es[t], Hs[t])
        y = torch.bmm(H[1:].view(T * Bsz, Dd, N), Ct.reshape(T * Bsz, N, 1))
        ctx.save_for_backward(u, delta, A, B, C, E, H)
        ctx.has_h0 = h0 is not None
        return y.view(T, Bsz, Dd).transpose(0, 1), H[T].clone()

    @staticmethod
    def backward(ctx, dy, dS):
        refuse_double_backward("selective_scan", "scan", "chunk")
        u, delta, A, B, C, E, H = ctx.saved_tensors
        Bsz, T, Dd = u.shape
        N, TB = A.shape[1], T * Bsz

        def flat(x):  # [B, T, ...] → contiguous time-major [T·B, ...] (y.sum() gives stride 0)
            return x.transpose(0, 1).reshape(TB, *x.shape[2:]).contiguous()

        dt, ut, Bt, Ct, dy = flat(delta), flat(u), flat(B), flat(C), flat(dy)
        G = torch.mul(dy[:, :, None], Ct[:, None, :], out=u.new_empty(TB, Dd, N))
        Gs, Es = G.view(T, Bsz, Dd, N).unbind(0), E.unbind(0)
        if dS is not None:
            Gs[T - 1].add_(dS)
        for t in range(T - 2, -1, -1):
            Gs[t].addcmul_(Es[t + 1], Gs[t + 1])
        dh0 = Es[0] * Gs[0] if ctx.has_h0 else None
        Hf = H[1:].view(TB, Dd, N)
        dC = torch.bmm(dy[:, None, :], Hf)
        dB = torch.bmm((dt * ut)[:, None, :], G)
        s = torch.bmm(G, Bt[:, :, None])[..., 0]  # ∂L/∂(Δu)
        Q = G.mul_(E.view(TB, Dd, N)).mul_(H[:-1].view(TB, Dd, N))  # ∂L/∂(Δ A), in place of g
        dA = torch.einsum("tdn,td->dn", Q, dt)
        ddelta = torch.einsum("tdn,dn->td", Q, A).addcmul_(s, ut)

        def unflat(x):
            return x.view(T, Bsz, *x.shape[1:]).transpose(0, 1)

        return unflat(s * dt), unflat(ddelta), dA, unflat(dB[:, 0]), unflat(dC[:, 0]), dh0


@outside_autocast
def scan_selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    output_final_state=False,
):
    """Fused-step form (the training form): one in-place step per token over all channels,
    backward by the reverse (adjoint) scan."""
    uf, df, Af, Bf, Cf, Df, h0 = _prepare(
        u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state
    )
    y, h = _Scan.apply(uf, df, Af, Bf, Cf, h0)
    return _finish(y, h, u, Df, uf, output_final_state)


@outside_autocast
def recurrent_selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    output_final_state=False,
):
    """Reference form: one state update per time step. Also the decode step (T = 1)."""
    uf, df, Af, Bf, Cf, Df, h0 = _prepare(
        u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state
    )
    y, h = _recurrent(uf, df, Af, Bf, Cf, h0)
    return _finish(y, h, u, Df, uf, output_final_state)


@outside_autocast
def chunk_selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
):
    """Chunked form (the training form): 2 chunk_size + T / chunk_size steps over all chunks."""
    check_chunk_size(chunk_size)
    uf, df, Af, Bf, Cf, Df, h0 = _prepare(
        u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state
    )
    y, h = _chunk(uf, df, Af, Bf, Cf, h0, chunk_size)
    return _finish(y, h, u, Df, uf, output_final_state)


@outside_autocast
def selective_scan(*args, form="scan", chunk_size=64, **kwargs):
    """The selective scan in the named form ("recurrent", "scan" or "chunk")."""
    if form == "scan":
        return scan_selective_scan(*args, **kwargs)
    if form == "chunk":
        return chunk_selective_scan(*args, chunk_size=chunk_size, **kwargs)
    if form == "recurrent":
        return recurrent_selective_scan(*args, **kwargs)
    raise ValueError(f"form must be one of 'recurrent', 'scan', 'chunk', got {form!r}")


def selective_scan_flops(
    variant: str = "default",
    form: str = "chunk",
    T: int = 1,
    H: int = 1,
    *,
    D: int,
    N: int,
    chunk_size: int = 64,
) -> Flops:
    """One sequence of T tokens, D channels of N states (H is unused: D counts every channel).

    matmul (what torch's FlopCounterMode sees): the readout y_t = h_t C_t, one [D, N] @ [N, 1]
    product per token (2DN), over the padded length in the chunk form. other: the decay factor
    exp(Δ A) (a multiply and an exp, 2DN), the update h ← e ⊙ h + (Δu) Bᵀ (3DN) and Δ u, D u
    (2D) per token, in the recurrent and the scan form alike; the chunk form forms (Δu) Bᵀ once
    and runs e ⊙ h + · twice (the local pass and the true one), multiplies the chunk's total decay
    (DN per token) and carries the state across chunks (2DN per chunk).
    """
    if form in ("recurrent", "scan"):
        return Flops(2 * D * N * T, (5 * D * N + 2 * D) * T)
    if form != "chunk":
        raise ValueError(f"selective_scan has no form {form!r}")
    L, K = chunk_count(T, chunk_size)
    P = K * L
    return Flops(2 * D * N * P, 8 * D * N * P + 2 * D * T + 2 * D * N * K)


def selective_scan_state_bytes(variant: str = "default", T: int = 0, H: int = 1, *, D: int, N: int):
    """The final state [D, N] of one sequence, float32."""
    return 4 * D * N


def make_selective_scan_inputs(
    variant: str,
    B: int,
    T: int,
    H: int = 1,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    *,
    D: int = 64,
    N: int = 16,
) -> dict:
    """Mamba's parameterisation: Δ = softplus(normal logits + the dt bias init) and the S4D-real
    A = −(1, ..., N) on every channel; u, B, C standard normal; D normal."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    log_dt = torch.rand(D, generator=generator, dtype=torch.float64)
    log_dt = log_dt * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = log_dt.exp().clamp(min=1e-4)
    bias = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
    A = -torch.arange(1, N + 1, dtype=torch.float64).repeat(D, 1)
    return {
        "u": randn(B, T, D),
        "delta": randn(B, T, D),
        "A": A.to(dtype),
        "B": randn(B, T, N),
        "C": randn(B, T, N),
        "D": randn(D),
        "delta_bias": bias.to(dtype),
        "delta_softplus": True,
    }


def _mamba_ssm_peer():
    """mamba-ssm's pure-PyTorch `selective_scan_ref` as fn(**inputs) → y [B, T, D] in seqlab's
    layout, or None where mamba-ssm is not installed.

    Its module imports the CUDA extension `selective_scan_cuda` at the top; a CPU-only install
    (MAMBA_SKIP_CUDA_BUILD=TRUE) has none, so an empty stand-in is put in sys.modules for the
    import and taken out again (selective_scan_ref never touches it).
    """
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    stub = (
        "selective_scan_cuda" not in sys.modules
        and importlib.util.find_spec("selective_scan_cuda") is None
    )
    if stub:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    finally:
        if stub:
            del sys.modules["selective_scan_cuda"]

    def peer(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
        y = selective_scan_ref(
            u.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
        )
        return y.transpose(1, 2)

    return peer


register_family(
    OpFamily(
        name="selective_scan",
        forms={
            "recurrent": recurrent_selective_scan,
            "scan": scan_selective_scan,
            "chunk": chunk_selective_scan,
        },
        reference="recurrent",
        fast="scan",
        make_inputs=make_selective_scan_inputs,
        flops=selective_scan_flops,
        state_bytes=selective_scan_state_bytes,
        dims={"D": 64, "N": 16},
        peers={"mamba-ssm": _mamba_ssm_peer},
        variants=("default",),
        doc="Mamba-1's selective scan (S6): per-channel diagonal decays exp(Δ A)",
    )
)
