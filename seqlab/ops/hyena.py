"""The order-2 Hyena operator (Poli et al. 2023): long causal convolutions interleaved with gates.

    z⁰ = v
    z¹ = x1 ⊙ (h1 * z⁰ + bias1 ⊙ z⁰)
    y  = x2 ⊙ (h2 * z¹ + bias2 ⊙ z¹)

with (h * z)_t = Σ_{s ≤ t} h_{t−s} z_s along T, per channel. Shapes: v, x1, x2 [B, T, D];
h1, h2 [L, D] (lags 0..L−1; lags ≥ L are zero, so L < T truncates the filter and L ≥ T uses
its first T taps); bias1, bias2 [D].

Forms: "fft" (O(T log T) per channel, the fast one), "direct" (the convolutions summed term by
term, the reference) and "recurrent" (a loop over the new tokens, the decode step). The state is
the cache of every past input of each order, [B, Tc, 2, D] (z⁰ and z¹ of the Tc tokens seen so
far): a long convolution has no finite state, so the cache grows with T. With
`initial_state=cache` the filters' lags count from the start of the cached sequence: token i of
the new input sits at position Tc + i, and h must hold the lags the whole sequence needs
(L ≥ Tc + T for untruncated filters).
"""

from __future__ import annotations

import math

import torch

from seqlab.ops._common import (
    causal_conv_direct,
    causal_conv_fft,
    check_shape,
    check_tensor,
    compute_dtype,
    outside_autocast,
)
from seqlab.ops.registry import Flops, OpFamily, register_family

ORDER = 2


def _check(v, x1, x2, h1, h2, bias1, bias2, initial_state):
    for name, x in (("v", v), ("x1", x1), ("x2", x2), ("h1", h1), ("h2", h2)):
        check_tensor(name, x)
    check_tensor("bias1", bias1)
    check_tensor("bias2", bias2)
    if v.dim() != 3:
        raise ValueError(f"v must have rank 3 [B, T, D], got shape {tuple(v.shape)}")
    B, T, D = v.shape
    if T == 0:
        raise ValueError("the sequence is empty: v has T = 0 time steps")
    check_shape("x1", x1, "BTD", (B, T, D))
    check_shape("x2", x2, "BTD", (B, T, D))
    check_shape("h1", h1, "LD", (None, D))
    check_shape("h2", h2, "LD", (h1.shape[0], D))
    if h1.shape[0] == 0:
        raise ValueError("the filters are empty: h1 has L = 0 lags")
    check_shape("bias1", bias1, "D", (D,))
    check_shape("bias2", bias2, "D", (D,))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_shape("initial_state", initial_state, "BTOD", (B, None, ORDER, D))
    return B, T, D


def _cached(z: torch.Tensor, cache: torch.Tensor | None, order: int) -> torch.Tensor:
    if cache is None or cache.shape[1] == 0:
        return z
    return torch.cat([cache[:, :, order].to(z.dtype), z], dim=1)


def _conv_form(conv):
    @outside_autocast
    def form(v, x1, x2, h1, h2, bias1, bias2, initial_state=None, output_final_state=False, **_):
        _check(v, x1, x2, h1, h2, bias1, bias2, initial_state)
        dtype = compute_dtype(v.dtype)
        Tc = 0 if initial_state is None else initial_state.shape[1]
        T = v.shape[1]
        z0 = v.to(dtype)
        zs = [z0]
        z = z0
        for o, (x, h, b) in enumerate(((x1, h1, bias1), (x2, h2, bias2))):
            full = _cached(z, initial_state, o)  # [B, Tc + T, D]
            hk = h[: Tc + T].to(dtype)
            u = conv(full, hk)[:, Tc:] + b.to(dtype) * z
            z = x.to(dtype) * u
            if o < ORDER - 1:
                zs.append(z)
        y = z.to(v.dtype)
        if not output_final_state:
            return y, None
        new = torch.stack(zs, dim=2).to(v.dtype)  # [B, T, 2, D]
        state = new if initial_state is None else torch.cat([initial_state, new], dim=1)
        return y, state

    return form


hyena_fft = _conv_form(causal_conv_fft)
hyena_fft.__doc__ = "The order-2 Hyena operator with its long convolutions by FFT."
hyena_direct = _conv_form(causal_conv_direct)
hyena_direct.__doc__ = "The order-2 Hyena operator summed term by term (the reference)."


@outside_autocast
def hyena_recurrent(
    v, x1, x2, h1, h2, bias1, bias2, initial_state=None, output_final_state=False, **_
):
    """One token at a time: token i reads the cache of every earlier input of each order (the
    decode step; O(T (Tc + T)) for T new tokens)."""
    B, T, D = _check(v, x1, x2, h1, h2, bias1, bias2, initial_state)
    dtype = compute_dtype(v.dtype)
    L = h1.shape[0]
    Tc = 0 if initial_state is None else initial_state.shape[1]
    past = [[] for _ in range(ORDER)]  # per order: the inputs [B, D] by position
    if Tc:
        for o in range(ORDER):
            past[o] = list(initial_state[:, :, o].to(dtype).unbind(1))
    hs = (h1.to(dtype), h2.to(dtype))
    bs = (bias1.to(dtype), bias2.to(dtype))
    xs = (x1.to(dtype), x2.to(dtype))
    ys = []
    for i in range(T):
        p = Tc + i  # absolute position
        z = v[:, i].to(dtype)
        lo = max(0, p - L + 1)  # the oldest input a lag < L reaches
        for o in range(ORDER):
            past[o].append(z)
            taps = hs[o][: p - lo + 1].flip(0)  # lag p − s for s = lo..p
            conv = (torch.stack(past[o][lo:], dim=1) * taps).sum(1)
            z = xs[o][:, i] * (conv + bs[o] * z)
        ys.append(z)
    y = torch.stack(ys, dim=1).to(v.dtype)
    if not output_final_state:
        return y, None
    cache = torch.stack([torch.stack(past[o], dim=1) for o in range(ORDER)], dim=2)
    return y, cache.to(v.dtype)


FORMS_ = {"fft": hyena_fft, "direct": hyena_direct, "recurrent": hyena_recurrent}


@outside_autocast
def hyena(*args, form: str = "fft", **kwargs):
    """`form` ∈ fft, direct, recurrent; see the module docstring."""
    if form not in FORMS_:
        raise ValueError(f"hyena: unknown form {form!r}; valid: {', '.join(FORMS_)}")
    return FORMS_[form](*args, **kwargs)


# Registry ---------------------------------------------------------------------------------------

DIMS = {"D": 16}  # channels per head: the op is per channel, H · D channels in all


def make_inputs(variant, B, T, H, dtype=torch.float32, generator=None, D=DIMS["D"], **_):
    """v and the gates ~ N(0, 1); filters decaying like the mixer's (exp(−α t), α from fast
    to slow) over L = T lags, scaled so each order keeps the scale of its input."""
    C = H * D

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    t = torch.arange(T, dtype=torch.float64)[:, None]
    alpha = torch.linspace(0.5, 8.0, C, dtype=torch.float64) / max(T, 1)
    window = torch.exp(-alpha * t * 8)
    out = {
        "v": randn(B, T, C),
        "x1": randn(B, T, C),
        "x2": randn(B, T, C),
        "h1": randn(T, C) * window * 0.3,
        "h2": randn(T, C) * window * 0.3,
        "bias1": randn(C),
        "bias2": randn(C),
    }
    return {k: x.to(dtype) for k, x in out.items()}


def fft_flops(n: int) -> int:
    """A real FFT of length n (forward or inverse): 2.5 n log₂ n, half the 5 n log₂ n of a
    complex FFT (the usual radix-2 count)."""
    return int(round(2.5 * n * math.log2(n))) if n > 1 else 0


def flops(variant, form, T, H, D=DIMS["D"], L=None, Tc=0, **_):
    """One sequence of T new tokens after Tc cached ones, filters of L lags (L = Tc + T when
    None). Nothing runs as a matrix product (matmul = 0, which torch's counter agrees with).

    other: per order and channel, the bias and gate (3 FLOPs per token: bias multiply-add,
    gate multiply) plus the convolution:
      fft: rfft of the input and of the filter and one irfft, each `fft_flops(n)` with n the
           5-smooth FFT length ≥ (Tc + T) + L' − 1 (L' = min(L, Tc + T)), and the complex
           product of n/2 + 1 bins (6 FLOPs each);
      direct: 2 FLOPs per (output, lag) pair, lag < L';
      recurrent: the same pairs as direct (each new token against every cached one).
    """
    from seqlab.ops._common import _fft_size

    C = H * D
    N = Tc + T
    Lk = N if L is None else min(L, N)
    elementwise = 3 * T
    if form == "fft":
        n = _fft_size(N + Lk - 1)
        conv = 3 * fft_flops(n) + 6 * (n // 2 + 1)
    elif form in ("direct", "recurrent"):
        # pairs (t, lag) with t in [Tc, N), lag ≤ t, lag < Lk
        pairs = sum(min(t + 1, Lk) for t in range(Tc, N))
        conv = 2 * pairs
    else:
        raise ValueError(f"hyena has no form {form!r}")
    return Flops(0, ORDER * C * (conv + elementwise))


def state_bytes(variant, T, H, D=DIMS["D"], **_):
    """The cache of both orders' inputs: T · 2 · H · D float32s (grows with T)."""
    return T * ORDER * H * D * 4


def workspace_bytes(variant, form, T, H, grad, D=DIMS["D"], L=None, **_):
    """Per order, the FFT buffers of the H·D channels at the padded length (complex64, twice
    with `grad`); the direct form's [T, L] lag products per channel block; the recurrent form's
    cache."""
    L = T if L is None else L
    if form == "fft":
        return ORDER * H * D * 2 * T * 8 * (2 if grad else 1)
    if form == "direct":
        return ORDER * H * D * T * 4 * (3 if grad else 2)
    return ORDER * H * D * (T + L) * 4 * (2 if grad else 1)


register_family(
    OpFamily(
        name="hyena",
        forms=FORMS_,
        make_inputs=make_inputs,
        flops=flops,
        state_bytes=state_bytes,
        dims=DIMS,
        reference="direct",
        fast="fft",
        workspace_bytes=workspace_bytes,
        doc="Order-2 Hyena: gated long causal convolutions (Poli et al. 2023); the state is "
        "the cache of past inputs of each order.",
    )
)
