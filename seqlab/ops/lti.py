"""Linear time-invariant state-space models: S4D (diagonal, complex) and the LMU's Legendre memory.

Both have a recurrent form (the reference and the decode step) and an FFT form: the impulse
response over T lags is built once per call and convolved with the input by `causal_conv_fft`.
An initial state adds its free response (Ā^{t+1} h₀ read out) and the final state is computed in
closed form, h_T = Ā^T h₀ + Σ_s Ā^{T−1−s} B̄ u_s, by one product over time.

s4d — per channel h (H channels, N/2 complex modes):
    Ā = exp(Δ A), B̄ = (Ā − 1) / A · B       (ZOH, Δ = exp(log_dt))
    h_t = Ā h_{t−1} + B̄ u_t,   y_t = 2 Re(Σ_n C_n h_t,n) + D u_t
  u [B, T, H]; log_dt [H]; A_re (< 0), A_im [H, N/2]; B, C [H, N/2, 2] (complex as (re, im));
  D [H]. The state is held as real pairs: [B, H, N/2, 2] (float32, float64 for float64 inputs).
  S4D-Lin and S4D-Inv are initialisations of A (seqlab.mixers.s4d), not different ops, so the
  family has one variant.

lmu — the LMU's linear memory (Voelker et al. 2019; parallel form as in Chilkuri & Eliasmith
2021), given its discretised matrices (`lmu_matrices(d, theta)`):
    m_t = Ā m_{t−1} + B̄ u_t      per input channel, m [d]
  u [B, T, H]; Abar [d, d]; Bbar [d]; output m [B, T, H, d]; state [B, H, d].

FLOPs: `Flops.matmul` is what torch's FlopCounterMode counts (tests/ops/test_lti.py checks it)
for a call without an initial state and with output_final_state; `Flops.other` holds the FFTs,
counted as FFT_C · n · log2(n) per real transform of padded length n (FFT_C = 2.5, a radix-2
real FFT), and the elementwise work.
"""

from __future__ import annotations

import math

import torch

from seqlab.ops._common import (
    _fft_size,
    causal_conv_fft,
    check_shape,
    check_tensor,
    compute_dtype,
    outside_autocast,
)
from seqlab.ops.registry import Flops, OpFamily, register_family

FFT_C = 2.5  # FLOPs per n·log2(n) of one real FFT of length n (documented estimate)


def _fft_flops(n_transforms: int, T: int, L: int) -> int:
    n = _fft_size(T + L - 1)
    return int(FFT_C * n * math.log2(n)) * n_transforms


# ---------------------------------------------------------------------------------------- s4d


def _check_s4d(u, log_dt, A_re, A_im, B, C, D, initial_state):
    for name, x in (("u", u), ("log_dt", log_dt), ("A_re", A_re), ("A_im", A_im)):
        check_tensor(name, x)
    check_tensor("B", B), check_tensor("C", C), check_tensor("D", D)
    if u.dim() != 3:
        raise ValueError(f"u must have rank 3 [B, T, H], got shape {tuple(u.shape)}")
    Bn, T, H = u.shape
    if T == 0:
        raise ValueError("the sequence is empty: u has T = 0 time steps")
    N2 = A_re.shape[-1] if A_re.dim() == 2 else None
    check_shape("log_dt", log_dt, "H", (H,))
    check_shape("A_re", A_re, "HN", (H, N2))
    check_shape("A_im", A_im, "HN", (H, N2))
    check_shape("B", B, "HN2", (H, N2, 2))
    check_shape("C", C, "HN2", (H, N2, 2))
    check_shape("D", D, "H", (H,))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BHN2", (Bn, H, N2, 2))
    return Bn, T, H, N2


def _s4d_discrete(log_dt, A_re, A_im, B, C, dtype):
    """Ā, B̄, C as complex [H, N/2] and Δ·A."""
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    A = torch.complex(A_re.to(dtype), A_im.to(dtype))
    dtA = log_dt.to(dtype).exp()[:, None] * A
    Abar = dtA.exp()
    Bc = torch.view_as_complex(B.to(dtype).contiguous())
    Cc = torch.view_as_complex(C.to(dtype).contiguous())
    Bbar = (Abar - 1) / A * Bc
    return Abar.to(cdt), Bbar.to(cdt), Cc.to(cdt), dtA


@outside_autocast
def s4d_recurrent(u, log_dt, A_re, A_im, B, C, D, initial_state=None, output_final_state=False):
    """The S4D recurrence step by step (the reference and the decode step)."""
    Bn, T, H, N2 = _check_s4d(u, log_dt, A_re, A_im, B, C, D, initial_state)
    dtype = compute_dtype(u.dtype)
    Abar, Bbar, Cc, _ = _s4d_discrete(log_dt, A_re, A_im, B, C, dtype)
    if initial_state is None:
        h = torch.zeros(Bn, H, N2, dtype=Abar.dtype, device=u.device)
    else:
        h = torch.view_as_complex(initial_state.to(dtype).contiguous())
    uc = u.to(dtype)
    ys = []
    for t in range(T):
        h = Abar * h + Bbar * uc[:, t, :, None]
        ys.append(2 * (Cc * h).real.sum(-1))
    y = torch.stack(ys, 1) + D.to(dtype) * uc
    S = torch.view_as_real(h).to(dtype) if output_final_state else None
    return y.to(u.dtype), S


def _powers(dtA: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """exp(l · dtA) for l = 0..L−1, complex [..., L], as exp(jb · dtA) · exp(i · dtA) with
    l = jb + i, b ≈ √L: about 2√L complex exps and L complex products instead of L exps (a
    CPU's complex exp took 13 ms for [4, 8, 8192], this 1.2 ms; same error against float64)."""
    b = max(1, math.isqrt(L))
    nb = -(-L // b)
    i = torch.arange(b, dtype=dtype, device=dtA.device)
    j = torch.arange(nb, dtype=dtype, device=dtA.device) * b
    lo, hi = (dtA[..., None] * i).exp(), (dtA[..., None] * j).exp()
    return (hi[..., :, None] * lo[..., None, :]).reshape(*dtA.shape, nb * b)[..., :L]


@outside_autocast
def s4d_fft(u, log_dt, A_re, A_im, B, C, D, initial_state=None, output_final_state=False):
    """Kernel K_l = 2 Re(C Ā^l B̄) by a Vandermonde product, then `causal_conv_fft`."""
    Bn, T, H, N2 = _check_s4d(u, log_dt, A_re, A_im, B, C, D, initial_state)
    dtype = compute_dtype(u.dtype)
    Abar, Bbar, Cc, dtA = _s4d_discrete(log_dt, A_re, A_im, B, C, dtype)
    L = T + 1 if initial_state is not None else T
    # Vandermonde Ā^l = exp(l Δ A), l = 0..L−1, as real pairs [H, 2·N/2, L]
    P = _powers(dtA, L, dtype)
    Pr = torch.cat([P.real, P.imag], dim=1)
    CB = Cc * Bbar
    W = torch.cat([CB.real, -CB.imag], dim=-1)[:, None, :]  # [H, 1, N]: Re(CB · P)
    k = 2 * torch.bmm(W, Pr[..., :T])[:, 0].transpose(0, 1)  # [T, H]
    uc = u.to(dtype)
    y = causal_conv_fft(uc, k) + D.to(dtype) * uc
    h0 = None
    if initial_state is not None:
        h0 = torch.view_as_complex(initial_state.to(dtype).contiguous())  # [B, H, N2]
        Ch = Cc * h0
        Wh = torch.cat([Ch.real, -Ch.imag], dim=-1).transpose(0, 1)  # [H, B, N]
        y = y + 2 * torch.bmm(Wh, Pr[..., 1:]).permute(1, 2, 0)  # Σ C Ā^{t+1} h₀
    S = None
    if output_final_state:
        # Σ_s Ā^{T−1−s} u_s as one product [H, N, T] @ [H, T, B]
        acc = torch.bmm(Pr[..., :T].flip(-1), uc.permute(2, 1, 0))  # [H, N, B]
        acc = torch.complex(acc[:, :N2], acc[:, N2:]).permute(2, 0, 1)  # [B, H, N2]
        h = Bbar * acc
        if h0 is not None:
            h = h + (T * dtA).exp() * h0
        S = torch.view_as_real(h).to(dtype)
    return y.to(u.dtype), S


def s4d_inputs(variant, B, T, H, dtype=torch.float32, generator=None, N=16, **_):
    """S4D-Lin A (−1/2 + iπn) with Δ log-uniform in [1e-3, 1e-1]; random complex B, C."""
    g = generator
    N2 = N // 2

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    log_dt = torch.rand(H, generator=g, dtype=torch.float64) * math.log(100) + math.log(1e-3)
    A_re = torch.full((H, N2), -0.5, dtype=torch.float64)
    A_im = math.pi * torch.arange(N2, dtype=torch.float64).expand(H, N2)
    out = {
        "u": r(B, T, H),
        "log_dt": log_dt,
        "A_re": A_re,
        "A_im": A_im.contiguous(),
        "B": r(H, N2, 2) * 0.5**0.5,
        "C": r(H, N2, 2) * 0.5**0.5,
        "D": r(H),
    }
    return {k: v.to(dtype) for k, v in out.items()}


def s4d_flops(variant, form, T, H, N=16, **_):
    """Per sequence. recurrent: per step and mode a complex multiply-add for h (8) and the real
    part of C h (4); fft: Vandermonde product 2·T·N per channel (N = 2·N/2 real columns), the
    final-state product 2·T·N, three FFTs per channel and exp/elementwise 8·N·T."""
    if form == "recurrent":
        return Flops(0, 12 * (N // 2) * T * H + 2 * T * H)
    matmul = 2 * (2 * (N // 2)) * T * H * 2
    other = _fft_flops(3 * H, T, T) + 8 * (N // 2) * T * H + 2 * T * H
    return Flops(matmul, other)


def s4d_state_bytes(variant, T, H, N=16, **_):
    return H * (N // 2) * 2 * 4


# ---------------------------------------------------------------------------------------- lmu


def lmu_continuous(d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LMU's continuous (A [d, d], B [d]) in float64 (Voelker et al. 2019, eq. 2)."""
    i = torch.arange(d, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    sign = torch.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    A = (2 * i + 1) / theta * sign
    Bv = (2 * i[:, 0] + 1) * (-1.0) ** i[:, 0] / theta
    return A, Bv


def lmu_matrices(d: int, theta: float, dt: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ZOH discretisation (Ā [d, d], B̄ [d]), float64: expm([[A, B], [0, 0]] · dt)."""
    A, Bv = lmu_continuous(d, theta)
    M = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    M[:d, :d], M[:d, d] = A, Bv
    E = torch.linalg.matrix_exp(M * dt)
    return E[:d, :d].contiguous(), E[:d, d].contiguous()


def _check_lmu(u, Abar, Bbar, initial_state):
    for name, x in (("u", u), ("Abar", Abar), ("Bbar", Bbar)):
        check_tensor(name, x)
    if u.dim() != 3:
        raise ValueError(f"u must have rank 3 [B, T, H], got shape {tuple(u.shape)}")
    Bn, T, H = u.shape
    if T == 0:
        raise ValueError("the sequence is empty: u has T = 0 time steps")
    d = Bbar.shape[0] if Bbar.dim() == 1 else None
    check_shape("Bbar", Bbar, "d", (d,))
    check_shape("Abar", Abar, "dd", (d, d))
    if d == 0:
        raise ValueError("the memory order d must be ≥ 1, got d = 0 (Bbar has shape (0,))")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BHd", (Bn, H, d))
    return Bn, T, H, d


@outside_autocast
def lmu_recurrent(u, Abar, Bbar, initial_state=None, output_final_state=False):
    """m_t = Ā m_{t−1} + B̄ u_t step by step; returns m [B, T, H, d]."""
    Bn, T, H, d = _check_lmu(u, Abar, Bbar, initial_state)
    dtype = compute_dtype(u.dtype)
    A, Bv, uc = Abar.to(dtype), Bbar.to(dtype), u.to(dtype)
    m = uc.new_zeros(Bn, H, d) if initial_state is None else initial_state.to(dtype)
    ms = []
    for t in range(T):
        m = m @ A.T + uc[:, t, :, None] * Bv
        ms.append(m)
    S = m if output_final_state else None
    return torch.stack(ms, 1).to(u.dtype), S


def _doubling_steps(L: int) -> list[int]:
    """Block sizes n of `_apply_powers`' doubling steps for L powers (1, 2, 4, ... capped)."""
    steps, n = [], 1
    while n < L:
        steps.append(min(n, L - n))
        n *= 2
    return steps


def _apply_powers(A: torch.Tensor, X: torch.Tensor, L: int) -> torch.Tensor:
    """[Ā^l X for l < L] as [L, d, M], X [d, M], by doubling: with the first n known, the next
    n are Ā^n times them (Ā^n by repeated squaring): log2 L products, O(d² L M + d³ log L)."""
    out = X[None]
    An = A
    for i, n in enumerate(_doubling_steps(L)):
        out = torch.cat([out, torch.matmul(An, out[:n])], 0)
        if i + 1 < len(_doubling_steps(L)):
            An = An @ An
    return out


@outside_autocast
def lmu_fft(u, Abar, Bbar, initial_state=None, output_final_state=False):
    """Impulse response H_l = Ā^l B̄ [T, d] by doubling, then `causal_conv_fft`."""
    Bn, T, H, d = _check_lmu(u, Abar, Bbar, initial_state)
    dtype = compute_dtype(u.dtype)
    A, Bv, uc = Abar.to(dtype), Bbar.to(dtype), u.to(dtype)
    k = _apply_powers(A, Bv[:, None], T)[..., 0]  # [T, d]
    y = causal_conv_fft(uc[..., None], k[:, None, :])  # [B, T, H, d]
    free = None
    if initial_state is not None:
        m0 = initial_state.to(dtype).reshape(Bn * H, d).T  # [d, B·H]
        free = _apply_powers(A, m0, T + 1)  # [T + 1, d, B·H]: Ā^l m₀
        y = y + free[1:].reshape(T, d, Bn, H).permute(2, 0, 3, 1)
    S = None
    if output_final_state:
        S = torch.matmul(uc.transpose(1, 2), k.flip(0))  # [B, H, T] @ [T, d]
        if free is not None:
            S = S + free[T].T.reshape(Bn, H, d)
    return y.to(u.dtype), S


def lmu_inputs(variant, B, T, H, dtype=torch.float32, generator=None, d=8, theta=32.0, **_):
    Abar, Bbar = lmu_matrices(d, theta)
    u = torch.randn(B, T, H, generator=generator, dtype=torch.float64)
    return {"u": u.to(dtype), "Abar": Abar.to(dtype), "Bbar": Bbar.to(dtype)}


def lmu_flops(variant, form, T, H, d=8, **_):
    """Per sequence. recurrent: m Āᵀ (2d² per step and channel, a matmul) and B̄ u (2d);
    fft: the doubling products, the final-state product 2·T·d per channel, FFTs of u (H), the
    kernel (d) and the output (H·d)."""
    if form == "recurrent":
        return Flops(2 * d * d * T * H, 2 * d * T * H)
    steps = _doubling_steps(T)
    matmul = sum(2 * d * d * n for n in steps) + 2 * d**3 * max(0, len(steps) - 1)
    matmul += 2 * T * d * H
    other = _fft_flops(H + d + H * d, T, T) + d * T * H
    return Flops(matmul, other)


def lmu_state_bytes(variant, T, H, d=8, **_):
    return H * d * 4


def _fft_buffers(T: int, channels: int, grad: bool) -> int:
    """`causal_conv_fft`'s spectra (input, kernel, product: complex64) and real output, float32;
    twice with `grad` (autograd keeps the spectra)."""
    n = _fft_size(2 * T - 1)
    return (3 * (n // 2 + 1) * 8 + n * 4) * channels * (2 if grad else 1)


def s4d_workspace_bytes(variant, form, T, H, grad, N=16, **_):
    """The fft form: the Vandermonde powers [H, N, T] (complex and as real pairs) and the FFT
    buffers; the recurrent form: a few states per step, kept for backward."""
    if form == "recurrent":
        return H * N * 4 * (2 * T if grad else 4)
    return H * N * T * 12 + _fft_buffers(T, H, grad)


def lmu_workspace_bytes(variant, form, T, H, grad, d=8, **_):
    """The fft form: the FFT buffers of the H·d memory channels; the recurrent form: the memory
    at every step, kept for backward."""
    if form == "recurrent":
        return H * d * 4 * (2 * T if grad else 4)
    return T * d * 4 + _fft_buffers(T, H * d, grad)


register_family(
    OpFamily(
        name="s4d",
        forms={"recurrent": s4d_recurrent, "fft": s4d_fft},
        make_inputs=s4d_inputs,
        flops=s4d_flops,
        state_bytes=s4d_state_bytes,
        dims={"N": 16},
        fast="fft",
        workspace_bytes=s4d_workspace_bytes,
        doc="S4D: diagonal complex SSM per channel, ZOH (Gu et al. 2022)",
    )
)
register_family(
    OpFamily(
        name="lmu",
        forms={"recurrent": lmu_recurrent, "fft": lmu_fft},
        make_inputs=lmu_inputs,
        flops=lmu_flops,
        state_bytes=lmu_state_bytes,
        dims={"d": 8},
        fast="fft",
        workspace_bytes=lmu_workspace_bytes,
        doc="LMU linear memory: Legendre delay system, ZOH (Voelker et al. 2019)",
    )
)
