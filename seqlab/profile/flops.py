"""FLOPs of the ops in seqlab.ops, counted for the code as written, for one sequence.

A multiply-add is 2 FLOPs. `Flops.matmul` is the work done in matrix products (mm, bmm, SDPA,
convolution): exactly what `torch.utils.flop_counter.FlopCounterMode` reports for these ops,
padding of the last chunk included, except that attention here counts only the causally visible
query–key pairs, where the counter counts the dense score matrix (`causal=False` gives its count).
Without autograd the chunk forms run a long input in time slices (`seqlab.ops._common.SLICE_ROWS`):
a short last slice is then not padded to a whole chunk, and the count there can be lower.
`Flops.other` is the leading work the counter does not see: triangular solves, the elementwise
[c, c, K] diagonal blocks of per-channel gates, the elementwise state update of a recurrent step.
Gates, norms, activations and casts, O(width) per token, are left out of both.

Shape letters: T new tokens, Tc cached tokens, H heads, K key dim, V value dim, C chunk size,
N = ⌈T / C⌉ chunks, c sub-chunk size (per-channel gates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Gate = Literal["none", "head", "channel"]
SUB_CHUNK = 16  # seqlab.ops.gated_linear.SUB_CHUNK


@dataclass(frozen=True)
class Flops:
    matmul: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.other

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.other + other.other)

    def __mul__(self, n: int) -> Flops:
        return Flops(self.matmul * n, self.other * n)

    __rmul__ = __mul__


def linear_flops(d_in: int, d_out: int) -> Flops:
    """One token through a [d_in → d_out] linear map (a bias add is not counted)."""
    return Flops(2 * d_in * d_out)


def _chunks(T: int, chunk_size: int) -> tuple[int, int]:
    """(C, N) as the chunk forms cut T: C = min(chunk_size, T), N = ⌈T / C⌉ (last one padded)."""
    C = min(chunk_size, T)
    return C, -(-T // C)


def gated_linear_flops(
    T: int, H: int, K: int, V: int, gate: Gate = "none", form: str = "chunk", chunk_size: int = 64
) -> Flops:
    """`gated_linear` over T tokens in the named form ("chunk", "parallel" or "recurrent").

    Per chunk and head: A = Q Kᵀ [C, C] (2C²K), dS = Kᵀ V (2CKV), O = Q S₀ + A V (2CKV + 2C²V);
    so ≈ 2C(K + V) + 4KV per token, MATH.md §6. Per-channel gates form A from sub-chunk blocks:
    one broadcast matmul over all [C/c]² blocks when C/c > 1, elementwise [c, c, K] diagonals.
    The recurrent form reads out Sᵀq by a matmul (2KV) and updates S elementwise.
    """
    if form == "recurrent":
        update = (3 if gate != "none" else 2) * K * V  # decay, outer product k vᵀ, add
        return Flops(2 * K * V, update) * (H * T)
    C, N = _chunks(T, T if form == "parallel" else chunk_size)
    matmul = 4 * C * K * V + 2 * C * C * V
    other = 0
    if gate == "channel":
        c = (SUB_CHUNK if C % SUB_CHUNK == 0 else C) if form == "chunk" else C
        if C // c > 1:
            matmul += 2 * C * C * K
        other = 3 * C * c * K  # C/c diagonal blocks: [c, c, K] products, products, sums
    else:
        matmul += 2 * C * C * K
    return Flops(matmul, other) * (H * N)


def delta_rule_flops(
    T: int,
    H: int,
    K: int,
    V: int,
    form: str = "chunk",
    chunk_size: int = 64,
    autograd: bool = False,
) -> Flops:
    """`delta_rule` over T tokens (with or without a gate: the matmuls are the same).

    Per chunk and head: Q Kᵀ and diag(β) K Kᵀ (4C²K); for C ≤ K + V the inverse T = M⁻¹ (a
    unit-triangular solve against I: C²(C − 1), not a matmul), W = T βγK and U' = T βV
    (2C²(K + V)), for longer chunks one solve against [βγK | βV] (C(C − 1)(K + V)); then
    O = Q S₀ + A U (2CKV + 2C²V). The state pass differs by mode. Inference (no autograd):
    U = U' − W S₀ and S₁ = γS₀ + K̃ᵀU step by step (4CKV). With autograd (`autograd=True`, the
    training forward): the affine maps P = γI − K̃ᵀW, R = K̃ᵀU' batched (2CK(K + V)), the
    step S₁ = P S₀ + R (2K²V), and U = U' − W S₀ batched (2CKV).
    The recurrent form has two matmuls per step, kᵀS and qᵀS (4KV), and an elementwise update.
    """
    if form == "recurrent":
        return Flops(4 * K * V, 3 * K * V) * (H * T)
    C, N = _chunks(T, T if form == "parallel" else chunk_size)
    matmul = 4 * C * C * K + 2 * C * K * V + 2 * C * C * V
    if C <= K + V:  # the inverse, then W = T βγK and U' = T βV
        matmul += 2 * C * C * (K + V)
        solve = C * C * (C - 1)
    else:  # one solve against [βγK | βV]
        solve = C * (C - 1) * (K + V)
    if autograd:
        matmul += 2 * C * K * (K + V) + 2 * K * K * V + 2 * C * K * V
    else:
        matmul += 4 * C * K * V
    return Flops(matmul, solve) * (H * N)


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
