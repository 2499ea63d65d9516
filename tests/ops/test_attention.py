"""attention (SDPA) against naive_attention (explicit scores), the KV cache, packing and errors."""

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from seqlab.ops.attention import KVCache, attention, naive_attention

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def make_qkv(B, T, H, Hkv, K, V, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(B, T, h, d, generator=g, dtype=F64) for h, d in ((H, K), (Hkv, K), (Hkv, V))
    )
    return tuple(x.to(dtype).requires_grad_(grad) for x in (q, k, v))


def loop_attention(q, k, v, window=None):
    """A third, per-query oracle: [B, T, H, K] one query at a time, positions 0..T-1."""
    B, T, H, K = q.shape
    group = H // k.shape[2]
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for i in range(T):
        lo = 0 if window is None else max(0, i - window + 1)
        for h in range(H):
            s = torch.einsum("bk,bsk->bs", q[:, i, h], k[:, lo : i + 1, h // group]) / math.sqrt(K)
            o[:, i, h] = torch.einsum("bs,bsv->bv", s.softmax(-1), v[:, lo : i + 1, h // group])
    return o


CASES = {
    "causal": (2, 7, 2, 2, 8, 8, None),
    "window1": (2, 7, 2, 2, 8, 8, 1),
    "window2": (2, 7, 2, 2, 8, 8, 2),
    "window3": (2, 7, 2, 2, 8, 8, 3),
    "window=T": (2, 7, 2, 2, 8, 8, 7),
    "window>T": (2, 7, 2, 2, 8, 8, 50),
    "gqa2": (2, 6, 4, 2, 8, 8, None),
    "gqa1": (2, 6, 4, 1, 8, 8, None),
    "gqa1-window": (2, 6, 4, 1, 8, 8, 3),
    "K!=V": (1, 5, 2, 2, 8, 3, None),
    "K!=V-gqa-window": (2, 5, 4, 2, 3, 6, 2),
    "T=1": (2, 1, 2, 2, 4, 4, None),
    "T=1-window": (2, 1, 4, 2, 4, 5, 1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive_forward_and_backward(case):
    B, T, H, Hkv, K, V, window = case
    q, k, v = make_qkv(B, T, H, Hkv, K, V, grad=True)
    o, cache = attention(q, k, v, window=window)
    ref = naive_attention(q, k, v, window=window)
    assert cache is None
    assert o.shape == (B, T, H, V) and o.dtype == F64
    torch.testing.assert_close(o, ref, **TIGHT)

    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TIGHT, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("case", ["window3", "gqa1-window", "K!=V", "T=1"])
def test_naive_matches_loop(case):
    B, T, H, Hkv, K, V, window = CASES[case]
    q, k, v = make_qkv(B, T, H, Hkv, K, V, seed=1)
    torch.testing.assert_close(
        naive_attention(q, k, v, window=window), loop_attention(q, k, v, window), **TIGHT
    )


def test_window_one_returns_own_value_and_wide_window_is_causal():
    q, k, v = make_qkv(2, 6, 4, 2, 5, 3)
    o, _ = attention(q, k, v, window=1)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=2), **TIGHT)
    torch.testing.assert_close(attention(q, k, v, window=6)[0], attention(q, k, v)[0], **TIGHT)
    assert not torch.allclose(attention(q, k, v, window=2)[0], attention(q, k, v)[0])


def test_scale_is_used():
    q, k, v = make_qkv(1, 5, 2, 2, 4, 4)
    o, _ = attention(q, k, v, scale=0.3)
    torch.testing.assert_close(o, naive_attention(q, k, v, scale=0.3), **TIGHT)
    torch.testing.assert_close(attention(q * 0.6, k, v)[0], o, **TIGHT)  # default 4**-0.5 = 0.5


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 6),
    Tc=st.integers(0, 5),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    K=st.integers(1, 5),
    V=st.integers(1, 5),
    window=st.none() | st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_with_cache_matches_naive(B, T, Tc, Hkv, group, K, V, window, seed):
    q, k, v = make_qkv(B, Tc + T, Hkv * group, Hkv, K, V, seed=seed)
    cache = KVCache(k[:, :Tc], v[:, :Tc])
    q, k, v = q[:, Tc:], k[:, Tc:], v[:, Tc:]
    o, _ = attention(q, k, v, window=window, initial_state=cache)
    torch.testing.assert_close(
        o, naive_attention(q, k, v, window=window, initial_state=cache), **TIGHT
    )


@pytest.mark.parametrize("window", [None, 1, 2, 3, 20])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_prefill_then_decode_equals_full_pass(window, heads):
    T, P = 9, 4
    H, Hkv = heads
    q, k, v = make_qkv(2, T, H, Hkv, 6, 5)
    full, final = attention(q, k, v, window=window, output_final_state=True)

    outs = []
    o, cache = attention(q[:, :P], k[:, :P], v[:, :P], window=window, output_final_state=True)
    outs.append(o)
    for t in range(P, T):
        held = min(t, window - 1) if window is not None else t
        assert cache.k.shape == (2, held, Hkv, 6) and cache.v.shape == (2, held, Hkv, 5)
        assert cache.nbytes == held * 2 * Hkv * (6 + 5) * 8
        step = slice(t, t + 1)
        o, cache = attention(
            q[:, step],
            k[:, step],
            v[:, step],
            window=window,
            initial_state=cache,
            output_final_state=True,
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TIGHT)

    kept = T if window is None else min(T, window - 1)
    for got, want in ((cache.k, k), (cache.v, v), (final.k, k), (final.v, v)):
        torch.testing.assert_close(got, want[:, T - kept :], **TIGHT)


@pytest.mark.parametrize("window", [None, 3])
def test_cache_owns_its_memory(window):
    """The returned cache never aliases the caller's k, v, and a windowed one is not a view of
    the whole prefill (2 tokens, not 8)."""
    q, k, v = make_qkv(1, 8, 2, 2, 4, 4)
    _, cache = attention(q, k, v, window=window, output_final_state=True)
    assert cache.k.shape[1] == (8 if window is None else 2)
    for x, src in zip(cache, (k, v), strict=True):
        assert x.untyped_storage().nbytes() == x.nbytes
        assert x.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()


class CopiedBytes(TorchDispatchMode):
    """Bytes written by the ops that copy tensors."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.cat, torch.ops.aten.clone, torch.ops.aten.copy_):
            self.nbytes += out.nbytes
        return out


def decode_steps(q, k, v, cache, start, window=None):
    """Decode steps start .. T - 1 from `cache`; returns the list of outputs and the last cache."""
    outs = []
    for t in range(start, q.shape[1]):
        step = slice(t, t + 1)
        o, cache = attention(
            q[:, step], k[:, step], v[:, step], window=window, initial_state=cache,
            output_final_state=True,
        )  # fmt: skip
        outs.append(o)
    return outs, cache


def decode(q, k, v, cache, start, window=None):
    outs, cache = decode_steps(q, k, v, cache, start, window)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_decode_copies_each_token_a_bounded_number_of_times(mode):
    """The cache grows into room it keeps (× GROWTH, at least MIN_ROOM tokens more) instead of
    being copied whole at every step: 100 steps after a prefill of 11 write 12 + 77 tokens into
    new buffers (each with the token of its step) and the other 98 tokens in place: 187 tokens,
    1.7× the final cache of 111; a copy of the cache per step would write 6,150, 55×."""
    q, k, v = make_qkv(2, 111, 2, 2, 4, 4)
    with mode():
        _, cache = attention(q[:, :11], k[:, :11], v[:, :11], output_final_state=True)
        with CopiedBytes() as spy:
            _, cache = decode_steps(q, k, v, cache, 11)
    per_token = cache.nbytes // 111
    assert spy.nbytes == (12 + 77 + 98) * per_token
    assert cache.k.untyped_storage().nbytes() < 1.6 * cache.k.nbytes  # room: 141 tokens
    torch.testing.assert_close(cache.k, k, **TIGHT)
    torch.testing.assert_close(cache.v, v, **TIGHT)


def test_windowed_decode_step_copies_only_the_window():
    """old ++ new (window tokens), then its last window - 1 into the returned cache."""
    q, k, v = make_qkv(1, 12, 2, 2, 4, 4)
    _, cache = attention(q[:, :11], k[:, :11], v[:, :11], window=5, output_final_state=True)
    with CopiedBytes() as spy:
        _, cache = decode_steps(q, k, v, cache, 11, window=5)
    step = cache.nbytes // cache.k.shape[1]  # one token's k and v
    assert spy.nbytes == 2 * cache.nbytes + step


def test_two_continuations_of_one_cache_do_not_mix():
    """A cache extended twice: the first continuation writes into its room, the second gets a
    copy, and each sees only its own tokens (the ops are functional)."""
    q, k, v = make_qkv(1, 9, 2, 2, 4, 4)
    q2, k2, v2 = make_qkv(1, 9, 2, 2, 4, 4, seed=1)
    with torch.no_grad():
        _, cache = attention(q[:, :6], k[:, :6], v[:, :6], output_final_state=True)
        _, cache = decode(q[:, :7], k[:, :7], v[:, :7], cache, 6)  # 7 tokens, room after them
        held = cache.k.clone()
        o_a, cache_a = decode(q, k, v, cache, 7)
        o_b, cache_b = decode(q2, k2, v2, cache, 7)
        o_a2, cache_a2 = decode(q, k, v, cache, 7)  # the first continuation again
    assert cache_a.k.data_ptr() == cache.k.data_ptr()  # the first grew in place
    assert cache_b.k.data_ptr() != cache.k.data_ptr() != cache_a2.k.data_ptr()
    assert torch.equal(cache.k, held)
    k_b = torch.cat([k[:, :7], k2[:, 7:]], 1)
    v_b = torch.cat([v[:, :7], v2[:, 7:]], 1)
    torch.testing.assert_close(cache_a.k, k, **TIGHT)
    torch.testing.assert_close(cache_b.k, k_b, **TIGHT)
    torch.testing.assert_close(cache_b.v, v_b, **TIGHT)
    torch.testing.assert_close(o_a2, o_a, rtol=0, atol=0)
    torch.testing.assert_close(o_b, naive_attention(q2, k_b, v_b)[:, 7:], **TIGHT)


@pytest.mark.parametrize("part", ["batch", "heads"])
def test_a_slice_of_a_cache_is_a_cache_of_its_own(part):
    """Decoding from part of a batched cache (one sequence, or some kv heads) must not write into
    the buffer the whole cache views."""
    q, k, v = make_qkv(2, 9, 4, 4, 4, 4)
    with torch.no_grad():
        _, cache = attention(q[:, :6], k[:, :6], v[:, :6], output_final_state=True)
        _, cache = decode(q[:, :7], k[:, :7], v[:, :7], cache, 6)  # room after 7 tokens
        held = cache.k.clone()
        cut = (slice(0, 1),) if part == "batch" else (slice(None), slice(None), slice(0, 2))
        small = KVCache(cache.k[cut], cache.v[cut])
        qs, ks, vs = (x[cut] for x in (q, k, v))
        o, small = decode(qs, ks, vs, small, 7)
        o_full, _ = decode(q, k, v, cache, 7)
    assert torch.equal(cache.k, held)
    torch.testing.assert_close(o, naive_attention(qs, ks, vs)[:, 7:], **TIGHT)
    torch.testing.assert_close(small.k, ks, **TIGHT)
    torch.testing.assert_close(o_full, naive_attention(q, k, v)[:, 7:], **TIGHT)


def test_continuations_in_threads_get_their_own_tokens():
    """The first continuation of a cache object claims its room, atomically and without a lock:
    threads continuing one shared prefix (a server with a prompt cache) never write into each
    other's caches. Each appends 512 tokens
    at once, so the copies (which release the GIL) overlap."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 4098, 8, 64, generator=g)
    with torch.no_grad():
        _, prefix = attention(q[:, :-1], k[:, :-1], v[:, :-1], output_final_state=True)
        _, prefix = attention(  # a decode step: the cache moves to a buffer with room
            q[:, -1:], k[:, -1:], v[:, -1:], initial_state=prefix, output_final_state=True
        )
    assert prefix.k.shape[1] == 4098 and prefix.capacity >= 4098 + 512
    tails = [torch.randn(3, 1, 512, 8, 64, generator=g) for _ in range(4)]
    start = threading.Barrier(len(tails))
    results = [None] * len(tails)

    def run(i):
        qt, kt, vt = tails[i]
        start.wait()
        with torch.no_grad():
            results[i] = attention(qt, kt, vt, initial_state=prefix, output_final_state=True)[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tails))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared = [c for c in results if c.k.data_ptr() == prefix.k.data_ptr()]
    assert len(shared) == 1  # one continuation took the room, the others were copied
    assert len({c.k.data_ptr() for c in results}) == len(tails)
    for (_, kt, vt), cache in zip(tails, results, strict=True):
        assert torch.equal(cache.k[:, 4098:], kt) and torch.equal(cache.v[:, 4098:], vt)
        assert torch.equal(cache.k[:, :4098], prefix.k)


def test_a_query_that_needs_grad_keeps_its_graph():
    """SDPA saves the cache when only q requires grad: a later step must not write over it."""
    q, k, v = make_qkv(1, 9, 2, 2, 4, 4)
    with torch.no_grad():
        _, cache = attention(q[:, :6], k[:, :6], v[:, :6], output_final_state=True)
        _, cache = decode(q[:, :7], k[:, :7], v[:, :7], cache, 6)
    qg = q.clone().requires_grad_(True)
    o_a, cache_a = decode(qg[:, :8], k[:, :8], v[:, :8], cache, 7)
    o_b, _ = decode(qg, k, v, cache_a, 8)
    (g,) = torch.autograd.grad(o_a.sum() + o_b.sum(), qg)
    want = torch.autograd.grad(naive_attention(qg, k, v)[:, 7:].sum(), qg)[0]
    torch.testing.assert_close(g, want, **TIGHT)


def test_decode_under_autograd_concatenates_and_differentiates():
    """With gradients the cache is concatenated (an in-place write would invalidate the tensors
    autograd saved); prefill + decode steps give naive attention's gradients."""
    q, k, v = make_qkv(2, 8, 4, 2, 6, 5, grad=True)
    o, cache = attention(q[:, :5], k[:, :5], v[:, :5], output_final_state=True)
    o_dec, cache = decode(q, k, v, cache, 5)
    o = torch.cat([o, o_dec], 1)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=o.dtype)
    got = torch.autograd.grad((o * w).sum(), (q, k, v))
    want = torch.autograd.grad((naive_attention(q, k, v) * w).sum(), (q, k, v))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, **TIGHT)


@pytest.mark.parametrize("window", [None, 1, 2, 4])
def test_packed_equals_each_sequence_alone(window):
    lens = [3, 1, 5, 2]
    cu = torch.tensor([0, 3, 4, 9, 11])
    q, k, v = make_qkv(1, sum(lens), 4, 2, 6, 3, grad=True)
    o, state = attention(q, k, v, window=window, cu_seqlens=cu)
    assert state is None
    alone = torch.cat(
        [
            attention(q[:, a:b], k[:, a:b], v[:, a:b], window=window)[0]
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ],
        dim=1,
    )
    torch.testing.assert_close(o, alone, **TIGHT)
    torch.testing.assert_close(
        naive_attention(q, k, v, window=window, cu_seqlens=cu), alone, **TIGHT
    )

    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(alone, (q, k, v), do)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TIGHT)


def test_packed_accepts_a_list_and_a_single_sequence():
    q, k, v = make_qkv(1, 5, 2, 2, 4, 4)
    ref = attention(q, k, v)[0]
    torch.testing.assert_close(attention(q, k, v, cu_seqlens=[0, 5])[0], ref, **TIGHT)
    torch.testing.assert_close(
        attention(q, k, v, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))[0], ref, **TIGHT
    )


# bf16 keeps 8 mantissa bits (eps 3.9e-3), fp16 11 (eps 4.9e-4); outputs are O(1) averages of
# N(0, 1) values, so a few eps of rounding in scores, weights and output is expected.
LOW_PRECISION = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("window", [None, 3])
def test_low_precision_close_to_float64(dtype, window):
    q, k, v = make_qkv(2, 16, 4, 2, 16, 16, dtype=dtype, seed=3)
    cache = KVCache(k[:, :5], v[:, :5])
    tol = LOW_PRECISION[dtype]
    for args in ((q, k, v), (q[:, 5:], k[:, 5:], v[:, 5:])):
        init = None if args[0].shape[1] == 16 else cache
        o, new_cache = attention(*args, window=window, initial_state=init, output_final_state=True)
        ref = naive_attention(
            *(x.to(F64) for x in args),
            window=window,
            initial_state=None if init is None else KVCache(*(x.to(F64) for x in init)),
        )
        assert o.dtype == dtype and new_cache.k.dtype == dtype
        torch.testing.assert_close(o.to(F64), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(
            naive_attention(*args, window=window, initial_state=init).to(F64),
            ref,
            atol=tol,
            rtol=tol,
        )


def test_kv_cache_nbytes():
    cache = KVCache(torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16), torch.zeros(2, 3, 4, 7))
    assert cache.nbytes == 2 * 3 * 4 * 5 * 2 + 2 * 3 * 4 * 7 * 4


def _cache(B=2, Tc=3, Hkv=2, K=3, V=6, Tv=None, dtype=F64):
    return KVCache(
        torch.zeros(B, Tc, Hkv, K, dtype=dtype), torch.zeros(B, Tv or Tc, Hkv, V, dtype=dtype)
    )


q0, k0, v0 = make_qkv(2, 5, 4, 2, 3, 6)  # valid: B=2, T=5, H=4, Hkv=2, K=3, V=6
BAD = [
    (
        "q rank 3",
        {"q": q0[0]},
        ValueError,
        r"q must have rank 4 \[B, T, H, D\], got shape \(5, 4, 3\)",
    ),
    ("k rank 5", {"k": k0[None]}, ValueError, r"k must have rank 4"),
    (
        "v heads != k heads",
        {"v": v0.repeat(1, 1, 2, 1)},
        ValueError,
        r"v has shape \(2, 5, 4, 6\), expected",
    ),
    (
        "H not multiple of Hkv",
        {"k": k0[:, :, :1].repeat(1, 1, 3, 1), "v": v0[:, :, :1].repeat(1, 1, 3, 1)},
        ValueError,
        r"q has 4 heads, which is not a multiple of k/v's 3 heads",
    ),
    (
        "k dim != q dim",
        {"k": k0[..., :2]},
        ValueError,
        r"k has shape \(2, 5, 2, 2\), expected \[B, T, H, K\]",
    ),
    ("k length != q length", {"k": k0[:, :4]}, ValueError, r"k has shape \(2, 4, 2, 3\)"),
    ("batch mismatch", {"v": v0[:1]}, ValueError, r"v has shape \(1, 5, 2, 6\)"),
    (
        "integer q",
        {"q": q0.long()},
        TypeError,
        r"q must be a floating-point tensor.*got dtype torch.int64",
    ),
    ("integer v", {"v": v0.int()}, TypeError, r"v must be a floating-point tensor"),
    ("not a tensor", {"k": k0.tolist()}, TypeError, r"k must be a torch.Tensor, got list"),
    ("mixed dtypes", {"k": k0.float()}, TypeError, r"q, k, v must share one dtype"),
    ("window 0", {"window": 0}, ValueError, r"window must be a positive int .* got 0"),
    ("window -2", {"window": -2}, ValueError, r"window must be a positive int .* got -2"),
    ("window float", {"window": 2.0}, ValueError, r"window must be a positive int .* got 2.0"),
    ("window bool", {"window": True}, ValueError, r"window must be a positive int .* got True"),
    ("window str", {"window": "3"}, ValueError, r"window must be a positive int .* got '3'"),
    ("scale str", {"scale": "0.5"}, TypeError, r"scale must be a float or None, got str"),
    (
        "cache not KVCache",
        {"initial_state": (k0, v0)},
        TypeError,
        r"initial_state must be a KVCache\(k, v\)",
    ),
    (
        "cache batch",
        {"initial_state": _cache(B=1)},
        ValueError,
        r"initial_state.k has shape \(1, 3, 2, 3\), expected \[B, T, H, K\] = \[2, T, 2, 3\]",
    ),
    (
        "cache heads",
        {"initial_state": _cache(Hkv=4)},
        ValueError,
        r"initial_state.k has shape \(2, 3, 4, 3\)",
    ),
    (
        "cache key dim",
        {"initial_state": _cache(K=4)},
        ValueError,
        r"initial_state.k has shape \(2, 3, 2, 4\)",
    ),
    (
        "cache value dim",
        {"initial_state": _cache(V=5)},
        ValueError,
        r"initial_state.v has shape \(2, 3, 2, 5\), expected \[B, T, H, V\] = \[2, 3, 2, 6\]",
    ),
    (
        "cache k/v lengths",
        {"initial_state": _cache(Tv=4)},
        ValueError,
        r"initial_state.v has shape \(2, 4, 2, 6\)",
    ),
    (
        "cache rank",
        {"initial_state": KVCache(k0[0], v0[0])},
        ValueError,
        r"initial_state.k must have rank 4",
    ),
    (
        "cache dtype",
        {"initial_state": _cache(dtype=torch.float32)},
        TypeError,
        r"initial_state must match q's dtype torch.float64",
    ),
    (
        "cache integer",
        {"initial_state": KVCache(k0.long(), v0)},
        TypeError,
        r"initial_state.k must be a floating-point tensor",
    ),
]
ONE = {"q": q0[:1], "k": k0[:1], "v": v0[:1]}
BAD_PACKED = [
    (
        "B != 1",
        {},
        [0, 2, 5],
        ValueError,
        r"packed sequences \(cu_seqlens\) need batch size 1, got B = 2",
    ),
    ("not increasing", ONE, [0, 3, 3, 5], ValueError, r"strictly increasing"),
    ("decreasing", ONE, [0, 4, 2, 5], ValueError, r"strictly increasing"),
    ("not ending at T", ONE, [0, 2, 4], ValueError, r"must end at T = 5, got last offset 4"),
    ("not starting at 0", ONE, [1, 5], ValueError, r"must start at 0"),
    ("float offsets", ONE, torch.tensor([0.0, 5.0]), TypeError, r"int32/int64"),
]


@pytest.mark.parametrize("fn", [attention, naive_attention])
@pytest.mark.parametrize(
    ("changes", "error", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_raises(fn, changes, error, match):
    with pytest.raises(error, match=match):
        fn(**{"q": q0, "k": k0, "v": v0, **changes})


@pytest.mark.parametrize(
    ("changes", "cu", "error", "match"), [b[1:] for b in BAD_PACKED], ids=[b[0] for b in BAD_PACKED]
)
def test_bad_cu_seqlens_raises(changes, cu, error, match):
    with pytest.raises(error, match=match):
        attention(**{"q": q0, "k": k0, "v": v0, **changes}, cu_seqlens=cu)


@pytest.mark.parametrize(
    "extra", [{"initial_state": _cache(B=1)}, {"output_final_state": True}], ids=["cache", "final"]
)
def test_packed_with_cache_is_not_supported(extra):
    q, k, v = make_qkv(1, 5, 4, 2, 3, 6)
    with pytest.raises(
        ValueError,
        match=r"cu_seqlens together with initial_state or output_final_state is not supported",
    ):
        attention(q, k, v, cu_seqlens=[0, 2, 5], **extra)
