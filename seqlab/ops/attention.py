"""Causal softmax attention (full or sliding window, grouped-query, KV cache, packed sequences).

`attention` runs on `torch.nn.functional.scaled_dot_product_attention`, so it picks up the fused
kernels of whatever device it runs on; `naive_attention` forms the scores and the mask by hand and
is the oracle the tests compare it to. Decoding is `attention` with T = 1 and the cache of the
earlier tokens; with a window the returned cache keeps only the last `window - 1` tokens.

The cache is an explicit object, `KVCache`: buffers [B, capacity, Hkv, ·] and the number of
tokens they hold. A full (unwindowed) cache keeps room to grow, so a decode step writes its token
after the others instead of copying the whole cache (which would cost O(T) per token, more memory
traffic than the attention itself). A buffer that is full grows to GROWTH times its tokens (at
least MIN_ROOM more), so tokens are copied O(1) times each on average. The ops stay functional: a
cache's tokens are never changed. Only the first continuation of a cache object writes into its
room (the cache records it, atomically, without a lock); a second continuation of the same cache,
in any thread, gets a copy, and so does a cache made from tensors (`KVCache(k, v)`, which has no
room). With grad mode on, or any input requiring grad, a step concatenates instead, since an
in-place write could invalidate tensors autograd saved. `KVCache.copy()` is a cache of its own
(beam search, a prompt cache): its continuations never touch the original's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from seqlab.ops._common import check_cu_seqlens, check_qkv, check_scale, check_shape, check_tensor
from seqlab.ops.registry import Flops, OpFamily, register_family

GROWTH = 2  # a full buffer grows to GROWTH times its tokens
MIN_ROOM = 64  # tokens


@dataclass(eq=False)
class KVCache:
    """Keys and values of the earlier tokens of each sequence, oldest first: the first `length`
    tokens of the buffers (all of them when None); the rest is room for later tokens.

    KVCache(k, v) wraps k [B, Tc, Hkv, K], v [B, Tc, Hkv, V] as a cache without room.
    """

    k_buffer: Tensor  # [B, capacity, Hkv, K]
    v_buffer: Tensor  # [B, capacity, Hkv, V]
    length: int | None = None
    # One token per continuation, appended (atomic in CPython): the first owns the room.
    _continuations: list[object] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.length is None:
            self.length = self.k_buffer.shape[1]

    @property
    def k(self) -> Tensor:  # [B, Tc, Hkv, K]
        return self.k_buffer[:, : self.length]

    @property
    def v(self) -> Tensor:  # [B, Tc, Hkv, V]
        return self.v_buffer[:, : self.length]

    def __iter__(self):
        return iter((self.k, self.v))

    @property
    def capacity(self) -> int:
        return self.k_buffer.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (not of the room)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def allocated_bytes(self) -> int:
        return self.k_buffer.nbytes + self.v_buffer.nbytes

    def tensors(self) -> dict[str, Tensor]:
        return {"k": self.k, "v": self.v}

    def copy(self) -> KVCache:
        """A cache of the same tokens in buffers of its own, with the same room."""
        return KVCache(self.k_buffer.clone(), self.v_buffer.clone(), self.length)

    def claim(self) -> bool:
        """True for the first continuation of this cache: it may write into the room."""
        token = object()
        self._continuations.append(token)
        return self._continuations[0] is token


def _check_window(window: object) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"window must be a positive int (the number of keys a query sees, itself included) "
            f"or None for full causal attention, got {window!r}"
        )
    return window


def _check_cache(cache: object, q: Tensor, B: int, Hkv: int, K: int, V: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"initial_state must be a KVCache(k, v) or None, got {type(cache).__name__}"
        )
    check_tensor("initial_state.k", cache.k)
    check_tensor("initial_state.v", cache.v)
    check_shape("initial_state.k", cache.k, "BTHK", (B, None, Hkv, K))
    check_shape("initial_state.v", cache.v_buffer, "BTHV", (B, cache.capacity, Hkv, V))
    if not 0 <= cache.length <= cache.capacity:
        raise ValueError(
            f"initial_state.length must lie in [0, {cache.capacity}] (its buffers' tokens), "
            f"got {cache.length}"
        )
    if cache.k.dtype != q.dtype or cache.v.dtype != q.dtype:
        raise TypeError(
            f"initial_state must match q's dtype {q.dtype}, "
            f"got k {cache.k.dtype}, v {cache.v.dtype}"
        )
    if cache.k.device != q.device or cache.v.device != q.device:
        raise ValueError(
            f"initial_state must be on q's device {q.device}, "
            f"got {cache.k.device}, {cache.v.device}"
        )


def _check_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    window: object,
    initial_state: object,
    output_final_state: bool,
    cu_seqlens: object,
) -> tuple[float, int | None, Tensor | None]:
    B, T, H, K, V = check_qkv(q, k, v, kv_heads_may_differ=True)
    scale = check_scale(scale, K)
    window = _check_window(window)
    cu = None
    if cu_seqlens is not None:
        if initial_state is not None or output_final_state:
            raise ValueError(
                "cu_seqlens together with initial_state or output_final_state is not supported: "
                "run packed sequences without a KV cache, or decode each sequence in its own "
                "batch row"
            )
        cu = check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        _check_cache(initial_state, q, B, k.shape[2], K, V)
    return scale, window, cu


def _visible(T: int, Tc: int, window: int | None, cu: Tensor | None, device) -> Tensor:
    """[T, Tc + T] bool: query i, at position Tc + i, sees keys j with Tc + i - w < j <= Tc + i."""
    visible = torch.ones(T, Tc + T, dtype=torch.bool, device=device).tril(Tc)
    if window is not None:
        visible = visible.triu(Tc - window + 1)
    if cu is not None:
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff()).to(device)  # [T]
        visible = visible & (seq[:, None] == seq[None, :])
    return visible


def _buffer(parts: list[Tensor], capacity: int) -> Tensor:
    """The tokens of `parts` (concatenated along T) at the start of a new [B, capacity, H, D]
    buffer."""
    B, _, H, D = parts[0].shape
    buf = parts[0].new_empty(B, capacity, H, D)
    n = 0
    for p in parts:
        buf[:, n : n + p.shape[1]] = p
        n += p.shape[1]
    return buf


def _extend(old: KVCache, k: Tensor, v: Tensor, in_place: bool) -> KVCache:
    """old ++ (k, v) along T: written into old's room when `in_place`, the room is there and this
    is old's first continuation, else into new buffers with room (`in_place` False: a plain
    concatenation, which autograd can differentiate)."""
    if not in_place:
        return KVCache(torch.cat([old.k, k], dim=1), torch.cat([old.v, v], dim=1))
    n, T = old.length, k.shape[1]
    if old.capacity >= n + T and old.claim():
        old.k_buffer[:, n : n + T] = k
        old.v_buffer[:, n : n + T] = v
        return KVCache(old.k_buffer, old.v_buffer, n + T)
    capacity = max(GROWTH * (n + T), n + T + MIN_ROOM)
    return KVCache(_buffer([old.k, k], capacity), _buffer([old.v, v], capacity), n + T)


def _cache(kv: Tensor, keep: int, fresh: bool) -> Tensor:
    """A windowed cache to return: the last `keep` tokens of kv = old ++ new along T; `kv`
    itself when it is `fresh` (a concatenation made by this call) and nothing is trimmed,
    otherwise a copy, so the cache neither aliases the caller's k, v nor pins the whole prefill
    in memory through a view."""
    if kv.shape[1] > keep:
        return kv[:, kv.shape[1] - keep :].clone()
    return kv if fresh else kv.clone()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    window: int | None = None,
    initial_state: KVCache | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, KVCache | None]:
    """Causal attention. q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] → o [B, T, H, V].

    The new tokens follow the `initial_state` cache of length Tc (positions Tc .. Tc + T - 1).
    Query head h reads key/value head h // (H // Hkv). With `output_final_state` the cache of
    cache ++ new tokens is returned, trimmed to the last `window - 1` tokens when windowed.
    `scale` (default K^-1/2) may be any finite number: 0 weighs the visible keys equally, a
    negative one favours the least similar.

    Under autocast q, k and v of different dtypes go to the autocast dtype first, as SDPA
    would take them there (a mixer may hand over a float32 k beside bf16 projections).
    """
    if torch.is_autocast_enabled(q.device.type) and len({q.dtype, k.dtype, v.dtype}) > 1:
        low = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(low) if t.is_floating_point() else t for t in (q, k, v))
    scale, window, cu = _check_args(
        q, k, v, scale, window, initial_state, output_final_state, cu_seqlens
    )
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    cache = None
    if initial_state is None:
        k_all, v_all = k, v
    elif window is None:
        # in place only outside autograd: with grad mode on a graph may hold the cache (SDPA
        # saves it when q requires grad), and a cache made under autograd stays concatenated
        inputs = (q, k, v, *initial_state)
        in_place = not torch.is_grad_enabled() and not any(t.requires_grad for t in inputs)
        cache = _extend(initial_state, k, v, in_place)
        k_all, v_all = cache.k, cache.v
    else:  # the window bounds the cache: concatenate, then trim below
        k_all = torch.cat([initial_state.k, k], dim=1)
        v_all = torch.cat([initial_state.v, v], dim=1)
    Tc = k_all.shape[1] - T

    if scale <= 0:  # SDPA multiplies q and k by √scale each: 0 and negative scales go on q
        q, scale = q * scale, 1.0
    plain_causal = Tc == 0 and window is None and cu is None
    mask = None if plain_causal else _visible(T, Tc, window, cu, q.device)
    # enable_gqa is only passed when needed: it exists from torch 2.5 on
    gqa = {"enable_gqa": True} if H != Hkv else {}
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_all.transpose(1, 2),
        v_all.transpose(1, 2),
        attn_mask=mask,
        is_causal=plain_causal,
        scale=scale,
        **gqa,
    ).transpose(1, 2)
    o = o.contiguous()  # [B, T, H, V] in memory too, like every other op's output

    if not output_final_state:
        return o, None
    if window is None:  # a prefill's cache is a buffer of its own (never the caller's k, v)
        if initial_state is None:
            return o, KVCache(_buffer([k], T), _buffer([v], T))
        return o, cache
    fresh = initial_state is not None
    return o, KVCache(_cache(k_all, window - 1, fresh), _cache(v_all, window - 1, fresh))


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    window: int | None = None,
    initial_state: KVCache | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Reference for `attention`: explicit scores, mask and softmax in the input dtype."""
    scale, window, cu = _check_args(q, k, v, scale, window, initial_state, False, cu_seqlens)
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    if initial_state is not None:
        k = torch.cat([initial_state.k, k], dim=1)
        v = torch.cat([initial_state.v, v], dim=1)
    Tc = k.shape[1] - T
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)

    scores = torch.einsum("bthk,bshk->bhts", q, k) * scale  # [B, H, T, Tc + T]
    q_pos = torch.arange(Tc, Tc + T, device=q.device)[:, None]
    k_pos = torch.arange(Tc + T, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    if cu is not None:
        same = torch.zeros(T, T, dtype=torch.bool, device=q.device)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            same[start:end, start:end] = True
        visible &= same
    p = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshv->bthv", p, v)


def _sum_min(lo: int, hi: int, cap: int | None) -> int:
    """Σ_{x = lo}^{hi} min(x, cap) (cap None: no cap)."""
    if hi < lo:
        return 0
    if cap is None or hi <= cap:
        return (lo + hi) * (hi - lo + 1) // 2
    if lo > cap:
        return cap * (hi - lo + 1)
    return (lo + cap) * (cap - lo + 1) // 2 + cap * (hi - cap)


def attention_flops(
    T: int,
    H: int,
    K: int,
    V: int,
    cached: int = 0,
    window: int | None = None,
    causal: bool = True,
) -> Flops:
    """Softmax attention of T new queries after `cached` tokens: 2(K + V) per query–key pair.

    causal: only the pairs a query sees (itself and earlier tokens, at most `window`), the work of
    a kernel that skips masked blocks; False: the dense T × (cached + T) score matrix, as the flop
    counter (and an explicit mask) counts it. H is the number of query heads.
    """
    if causal:
        pairs = _sum_min(cached + 1, cached + T, window)
    else:
        pairs = T * (cached + T)
    return Flops(2 * pairs * (K + V) * H)


def _family_inputs(variant, B, T, H, dtype=torch.float32, generator=None, K=64, V=64, Hkv=None):
    """q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] (Hkv: grouped-query heads, default H)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    Hkv = Hkv or H
    return {"q": randn(B, T, H, K), "k": randn(B, T, Hkv, K), "v": randn(B, T, Hkv, V)}


def sdpa_peer():
    """torch's F.scaled_dot_product_attention, causal, on the same q, k, v (other inputs ignored).

    Read through a transposed view of the [B, T, H, ·] inputs, as `attention` does: the peer
    every op with q, k, v is timed against, at its shapes."""

    def run(q, k, v, **_):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    return run


def sdpa_workspace_bytes(T, H, K, V, window=None):
    """A fused causal kernel holds no T × T tensor where q/k and v share a head dim (and there
    is no window mask); else (on a CPU) the math path holds T × T scores and weights in float32
    (with a window: a bool mask and the scores, measured)."""
    if window is not None:
        return T * T * (1 + 2 * H)
    return 0 if K == V else 12 * H * T * T


register_family(
    OpFamily(
        name="attention",
        forms={"parallel": attention},  # SDPA; its KV cache is the decode state
        reference="parallel",
        fast="parallel",
        make_inputs=_family_inputs,
        flops=lambda variant, form, T, H, K=64, V=64, window=None, **_: attention_flops(
            T, H, K, V, window=window
        ),
        state_bytes=lambda variant, T, H, K=64, V=64, Hkv=None, **_: T * (Hkv or H) * (K + V) * 4,
        dims={"K": 64, "V": 64},
        packed=True,
        peers={"sdpa": sdpa_peer},
        workspace_bytes=lambda variant, form, T, H, grad, K=64, V=64, window=None, **_: (
            sdpa_workspace_bytes(T, H, K, V, window)
        ),
        backend=lambda form, inputs, **_: "sdpa",
        doc="causal softmax attention (SDPA), optional sliding window, grouped-query heads",
    )
)
