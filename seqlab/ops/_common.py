"""Argument checks, dtype policy and variable-length packing shared by the ops.

Shape letters: B batch, T length, H heads, K key dim, V value dim, N packed sequences.
Checks live here, at the boundary of the public ops; the cores they call trust their inputs.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch


def outside_autocast(fn: Callable) -> Callable:
    """fn run with autocast off on its inputs' device. An op casts its inputs to its compute
    dtype itself (float32 for 16-bit inputs); under a bf16 autocast its inner products would go
    back to 16 bits, losing the float32 state and the decays' range, and solves have no bf16
    kernel on a CPU. Outputs keep the dtype the op gives them (its inputs').

    Under autocast, q, k and v (the parameters of those names) in different dtypes are
    promoted to their common one first, as autocast does for its "promote" ops: a mixer whose
    projections autocast put in bf16 may compute one of them in float32 (a float32 bias added,
    a float32 feature map), which outside autocast would be the caller's error.
    """
    names = list(inspect.signature(fn).parameters)
    qkv = [(i, n) for i, n in enumerate(names) if n in ("q", "k", "v")]

    def promoted(args, kwargs):
        got = [(i, n, args[i] if i < len(args) else kwargs.get(n)) for i, n in qkv]
        xs = [(i, n, x) for i, n, x in got if isinstance(x, torch.Tensor) and x.is_floating_point()]
        if len({x.dtype for *_, x in xs}) < 2:
            return args, kwargs
        dtype = functools.reduce(torch.promote_types, (x.dtype for *_, x in xs))
        args, kwargs = list(args), dict(kwargs)
        for i, n, x in xs:
            if i < len(args):
                args[i] = x.to(dtype)
            else:
                kwargs[n] = x.to(dtype)
        return args, kwargs

    @functools.wraps(fn)
    def run(*args, **kwargs):
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor):
                if torch.is_autocast_enabled(x.device.type):
                    args, kwargs = promoted(args, kwargs)
                    with torch.autocast(x.device.type, enabled=False):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return run


def connected_zeros(shape: Sequence[int], *inputs: torch.Tensor | None) -> torch.Tensor:
    """Zeros of `shape` in the first input's dtype and device, in the autograd graph of every
    input that requires grad (their gradients come back as zeros): an op with nothing to
    compute (no rows, no values) still returns an output a loss can be backpropagated through,
    as the same op with rows does."""
    x = next(t for t in inputs if t is not None)
    out = x.new_zeros(shape)
    for t in inputs:
        if t is not None and t.requires_grad:
            out = out + t.sum() * 0
    return out


def refuse_double_backward(op: str, form: str, instead: str) -> None:
    """Called first in a hand-written backward: autograd runs a backward with grad mode on only
    when asked to differentiate it again (create_graph=True: a gradient penalty, a Hessian-vector
    product), which such a backward (in-place buffers, no graph of its own) cannot give. Without
    this the second derivative came back as zero or torch failed deep inside."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}'s {form} form has a hand-written backward that cannot be differentiated "
            f"again (create_graph=True, e.g. a gradient penalty); use form={instead!r}, whose "
            "backward is autograd's"
        )


FORMS = ("recurrent", "chunk", "parallel")


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_tensor(name: str, x: object) -> torch.Tensor:
    """`x` must be a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    return x


def check_shape(name: str, x: torch.Tensor, letters: str, expected: Sequence[int | None]) -> None:
    """`x` must have one dim per letter of `letters`, matching `expected` where it is not None."""
    if x.dim() != len(letters):
        raise ValueError(
            f"{name} must have rank {len(letters)} [{', '.join(letters)}], got shape {_shape(x)}"
        )
    wanted = [letter if e is None else str(e) for letter, e in zip(letters, expected, strict=True)]
    for e, s in zip(expected, x.shape, strict=True):
        if e is not None and e != s:
            raise ValueError(
                f"{name} has shape {_shape(x)}, expected [{', '.join(letters)}] = "
                f"[{', '.join(wanted)}]"
            )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads_may_differ: bool = False
) -> tuple[int, int, int, int, int]:
    """q, k [B, T, H, K] and v [B, T, H, V] on one device and dtype; returns B, T, H, K, V."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {_shape(x)}")
    B, T, H, K = q.shape
    Hk = k.shape[2] if kv_heads_may_differ else H
    check_shape("k", k, "BTHK", (B, T, Hk, K))
    check_shape("v", v, "BTHV", (B, T, Hk, None))
    if kv_heads_may_differ and (H % Hk if Hk else H) != 0:
        raise ValueError(f"q has {H} heads, which is not a multiple of k/v's {Hk} heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if T == 0:
        raise ValueError("the sequence is empty: q has T = 0 time steps")
    if K == 0:
        raise ValueError(
            f"q and k have K = 0 channels (shape {_shape(q)}): a key needs at least one channel"
        )
    return B, T, H, K, v.shape[-1]


def check_scale(scale: float | None, K: int) -> float:
    """K^-1/2 by default; any finite number, 0 and negative ones included."""
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_gate_dtype(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    """Gates and β take q's dtype or float32: a bf16 model may keep its log-decays exact."""
    if x.dtype not in (q.dtype, torch.float32) or x.device != q.device:
        raise TypeError(
            f"{name} must have q's dtype ({q.dtype}) or float32 and q's device ({q.device}), "
            f"got {x.dtype}, {x.device}"
        )


def value_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor: one pass (`aminmax`) and one read back to the host,
    where a check built of comparisons took several passes (~40x the time for 32K values).
    NaN anywhere makes both NaN, so a range check written as `lo >= a and hi <= b` fails."""
    lo, hi = torch.aminmax(x)
    return tuple(torch.stack([lo, hi]).tolist())  # in x's dtype: no float32 overflow


def check_log_gate(name: str, g: torch.Tensor, q: torch.Tensor, values: bool = True) -> None:
    """A log-space gate must be finite and ≤ 0: decay, never growth (−30 means exp ≈ 1e-13).
    The value check reads the tensor back to the host (a GPU caller waits for its queue);
    `values=False` skips it, for callers whose gates are valid by construction."""
    check_gate_dtype(name, g, q)
    if not values or not g.numel():
        return
    lo, hi = value_range(g)
    if not (lo > -math.inf and hi <= 0):
        raise ValueError(
            f"{name} is a log-space decay and must be finite and ≤ 0 (decay factor exp({name}) "
            f"in (0, 1]); got min {lo:.4g}, max {hi:.4g}"
        )


def floor_log_gate(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """g with every value below where exp underflows to 0 in `dtype` (the dtype the exp is taken
    in) raised to just under that point.

    exp of both is exactly 0, so no form's result changes, but the chunk forms' cumulative sums
    of a gate stay far from overflow: a finite gate such as −1e30 (or −1e38 in float32) would
    otherwise sum to −inf, and −inf − (−inf) is NaN, and huge sums would swamp the mild decays
    between them.
    """
    if g is None:
        return None
    info = torch.finfo(dtype)
    return g.clamp(min=math.log(info.smallest_normal * info.eps) - 8.0)


def check_cu_seqlens(cu_seqlens: object, B: int, T: int) -> torch.Tensor:
    """Offsets [0, T_0, T_0 + T_1, ..., T] of sequences packed along T of a batch of one."""
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = torch.tensor(cu_seqlens)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D int32/int64 tensor, got dtype {cu_seqlens.dtype} "
            f"and shape {_shape(cu_seqlens)}"
        )
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got B = {B}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() < 2 or cu[0] != 0:
        raise ValueError(
            f"cu_seqlens must start at 0 and hold at least 2 offsets, got {cu.tolist()}"
        )
    if not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu.tolist()}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got last offset {int(cu[-1])}")
    return cu


def check_initial_state(
    initial_state: torch.Tensor | None, B: int, H: int, K: int, V: int, cu: torch.Tensor | None
) -> None:
    """[B, H, K, V], or [N, H, K, V] with one state per packed sequence when `cu` is given."""
    if initial_state is None:
        return
    check_tensor("initial_state", initial_state)
    if cu is None:
        check_shape("initial_state", initial_state, "BHKV", (B, H, K, V))
    else:
        check_shape("initial_state", initial_state, "NHKV", (len(cu) - 1, H, K, V))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for exact tests); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, ...] → [N·B·H, C, ...], chunk-major, N = ⌈T / C⌉, zero-padded at the end.

    Chunk-major order makes chunk n of every sequence and head one contiguous slice
    (`x.view(N, B·H, C, ...)[n]`) for the sequential state pass; the rest of the chunk form
    is batched matmuls over the flat leading dimension (3-D, so transposes stay views).
    Always a new tensor (never a view of `x`), so callers may modify it in place.
    """
    c = chunked(x, C)
    y = c.reshape(-1, C, *c.shape[4:])
    same = y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    return y.clone() if same else y


def chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, ...] → [N, B, H, C, ...] (`to_chunks`'s order), a view where T = N·C.

    For writing chunks straight into a buffer (or a product) without an intermediate copy.
    """
    B, T, H = x.shape[:3]
    N = -(-T // C)
    if N * C != T:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
    return x.view(B, N, C, H, *x.shape[3:]).movedim((1, 3), (0, 2))


def from_chunks(o: torch.Tensor, B: int, T: int, H: int, out: torch.Tensor | None = None):
    """Inverse of `to_chunks`: [N·B·H, C, ...] → [B, T, H, ...], padding dropped.

    With `out` ([B, T, H, ...], may be a slice of a larger tensor) the result is written there,
    in one copy when T is a whole number of chunks.
    """
    C = o.shape[1]
    x = o.view(-1, B, H, C, *o.shape[2:]).movedim((0, 2), (1, 3))  # [B, N, C, H, ...]
    if out is None:
        return x.reshape(B, -1, H, *o.shape[2:])[:, :T]
    if x.shape[1] * C == T:
        out.view(x.shape).copy_(x)
    else:
        out.copy_(x.reshape(B, -1, H, *o.shape[2:])[:, :T])
    return out


# The CPU exp of PyTorch leaves its vectorised path where the result is not a normal number:
# float32 arguments below about −87.3 (a denormal result took 35x, an underflow to 0 12x the time
# of a normal one on the project's AMD EPYC VM; float64 likewise below about −708), so a chunk form
# whose log-decays reach −87 inside a chunk slowed down with the gate values. Every exp of a
# log-decay in the chunk forms clamps its argument to [EXP_FLOOR, 0] instead: exp(−80) ≈ 1.8e-35
# is a normal float32, and the decay factors it stands in for are smaller still, so each such
# factor (≤ 1, multiplying values of the inputs' scale) changes by less than 1.8e-35 of that
# scale: below float32 and float64 round-off (tests/ops compare against the recurrent form at
# log-decay −20, −100 and −1e4 per step).
# Products are the second cliff. On an Intel Xeon VM (2026-12-05) a float32 matmul or multiply whose
# operands or results are denormal ran 6-8x slower (the gated delta rule's chunk form at T = 8192
# under strong gates: 488 ms, 58 ms with flush-to-zero set), while the AMD VM showed no such
# penalty. A factor of exp(−80) times a value of 1e-4 is already denormal, and the chunk forms
# multiply decay factors by inputs and by each other. So in float32 (the compute dtype of float16
# and bfloat16 too) the floor is EXP_FLOOR_32 = −30: exp(−30) ≈ 9.4e-14, and a product of two such
# factors with a value of 1e-12 is still a normal float32. The factors it stands in for change by
# less than 9.4e-14 of the scale of what they multiply, far below float32's round-off (1.2e-7);
# float64, whose denormals start near 1e-308, keeps −80.
EXP_FLOOR = -80.0
EXP_FLOOR_32 = -30.0


def exp_floor(dtype: torch.dtype) -> float:
    """The lowest exp argument the chunk forms take in `dtype` (see EXP_FLOOR)."""
    return EXP_FLOOR if dtype == torch.float64 else EXP_FLOOR_32


def decay_exp(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """exp(x) for a log-decay x ≤ 0, its argument clamped to [exp_floor(dtype), 0] (EXP_FLOOR).

    `inplace`: x is a fresh intermediate that may be overwritten (only without autograd).
    """
    floor = exp_floor(x.dtype)
    if inplace:
        return x.clamp_(floor, 0.0).exp_()
    return x.clamp(floor, 0.0).exp()


def causal_decay(b: torch.Tensor) -> torch.Tensor:
    """Γ_ij = exp(b_i − b_j) for j ≤ i and 0 above the diagonal; b [..., C] → [..., C, C].

    Exponents are clamped to [exp_floor(dtype), 0] before the exp, so nothing overflows and exp
    stays on its fast path, and the upper part is zeroed after it (exp of a −inf mask is several
    times slower than exp of finite values on a CPU). Without autograd every step is in place on
    the one fresh [..., C, C] tensor.
    """
    d = b[..., :, None] - b[..., None, :]
    inplace = not torch.is_grad_enabled()
    gam = decay_exp(d, inplace)
    return gam.tril_() if inplace else gam.tril()


# Without autograd, chunk forms run over time slices of whole chunks holding about this many
# (token, head) rows each, carrying the state: the [C, C] intermediates of a slice stay in
# cache and reuse freed memory (measured: ~0.6x the time of one pass at T = 8192, B·H = 4).
SLICE_ROWS = 8192


def run_sliced(core: Callable, xs: Sequence, S0, scale: float, chunk_size: int):
    """core(*xs, S0, scale, chunk_size) → (o in chunks, S); returns (o as [B, T, H, ·], S).

    Without autograd the input runs in time slices of whole chunks, the state carried and each
    slice's output written straight into one output tensor. Exact: the chunk form is exact for
    any cut into whole chunks. With autograd on (or a slice as long as the input) it is one
    call.
    """
    B, T, H = xs[0].shape[:3]
    if B * H == 0 or xs[2].shape[-1] == 0:  # nothing to compute (the cores need rows and V)
        K, V = xs[0].shape[-1], xs[2].shape[-1]
        S = xs[0].new_zeros(B, H, K, V) if S0 is None else S0
        return connected_zeros((B, T, H, V), *xs, S0), S
    L = chunk_size * max(1, SLICE_ROWS // (B * H * chunk_size))
    if torch.is_grad_enabled() or T <= L:
        o, S = core(*xs, S0, scale, chunk_size)
        return from_chunks(o, B, T, H), S
    out, S = None, S0
    for t in range(0, T, L):
        o, S = core(*(None if x is None else x[:, t : t + L] for x in xs), S, scale, chunk_size)
        if out is None:
            out = o.new_empty(B, T, H, *o.shape[2:])
        from_chunks(o, B, min(L, T - t), H, out=out[:, t : t + L])
    return out, S


def pad_packed(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """[1, ΣT_n, ...] → [N, max T_n, ...], zero-padded at the end of each sequence.

    Zero keys, values, β and log-gates leave a recurrent state unchanged, so trailing padding
    changes neither outputs nor final states.
    """
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(int(lens.max()))
    idx = cu[:-1, None] + pos[None]
    valid = (pos[None] < lens[:, None]).to(x.device)
    idx = idx.clamp(max=x.shape[1] - 1).to(x.device)
    gathered = x[0][idx]
    mask = valid.view(*valid.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def unpad_packed(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad_packed`: [N, max T_n, ...] → [1, ΣT_n, ...]."""
    lens = cu[1:] - cu[:-1]
    valid = (torch.arange(x.shape[1])[None] < lens[:, None]).to(x.device)
    return x[valid][None]


def run_packed(
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    cu: torch.Tensor | None,
    per_token: Sequence[torch.Tensor | None],
    *args,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `core(*per_token, *args, **kwargs)`, unpacking `cu_seqlens` into a padded batch first."""
    if cu is None:
        return core(*per_token, *args, **kwargs)
    padded = [None if x is None else pad_packed(x, cu) for x in per_token]
    o, state = core(*padded, *args, **kwargs)
    return unpad_packed(o, cu), state


def check_form(form: str, allowed: Sequence[str] = FORMS) -> str:
    if form not in allowed:
        raise ValueError(f"form must be one of {', '.join(map(repr, allowed))}, got {form!r}")
    return form


def chunk_count(T: int, chunk_size: int) -> tuple[int, int]:
    """(C, N) as the chunk forms cut T: C = min(chunk_size, T), N = ⌈T / C⌉ (last one padded)."""
    C = min(chunk_size, T)
    return C, -(-T // C)


def causal_conv_fft(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{s ≤ t} k_{t−s} u_s along dim 1, by FFT in O(T log T).

    u [B, T, ...], k [L, ...] or [B, L, ...] (L ≤ T lags; the trailing dims broadcast with u's).
    Zero-padded to a length ≥ T + L − 1 that torch's FFT does fast (2^a 3^b 5^c), so nothing
    wraps around. Float64 stays float64; other dtypes are computed in float32.
    """
    T, L = u.shape[1], k.shape[-u.dim() + 1]
    dtype = compute_dtype(u.dtype)
    if u.numel() == 0 or L == 0:  # MKL's FFT rejects an empty batch; nothing to transform
        return causal_conv_direct(u.to(dtype), k.to(dtype))
    n = _fft_size(T + L - 1)
    U = torch.fft.rfft(u.to(dtype), n=n, dim=1)
    kdim = 0 if k.dim() == u.dim() - 1 else 1
    Kf = torch.fft.rfft(k.to(dtype), n=n, dim=kdim)
    return torch.fft.irfft(U * Kf, n=n, dim=1)[:, :T]


def causal_conv_direct(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`causal_conv_fft` summed term by term (the reference): O(T L)."""
    T, L = u.shape[1], k.shape[-u.dim() + 1]
    kb = k if k.dim() == u.dim() else k.unsqueeze(0)
    shape = torch.broadcast_shapes(u.shape, (kb.shape[0], T, *kb.shape[2:]))
    y = u.new_zeros(shape, dtype=torch.promote_types(u.dtype, k.dtype))
    for lag in range(min(L, T)):
        y[:, lag:] += kb[:, lag : lag + 1] * u[:, : T - lag]
    return y


def _fft_size(n: int) -> int:
    """The smallest m ≥ n whose only prime factors are 2, 3 and 5."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1
