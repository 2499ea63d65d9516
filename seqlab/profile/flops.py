"""FLOPs of the ops in seqlab.ops, counted for the code as written, for one sequence.

A multiply-add is 2 FLOPs. `Flops.matmul` is the work done in matrix products (mm, bmm, SDPA,
convolution): exactly what `torch.utils.flop_counter.FlopCounterMode` reports for these ops,
padding of the last chunk included, except that attention here counts only the causally visible
query–key pairs, where the counter counts the dense score matrix (`causal=False` gives its count).
Without autograd the chunk forms run a long input in time slices (`seqlab.ops._common.SLICE_ROWS`):
a short last slice is then not padded to a whole chunk, and the count there can be lower.
`Flops.other` is the leading work the counter does not see: triangular solves, the elementwise
work of per-channel gates (the [C, C, K] tensor of the parallel form; the diagonal and the
scaled halves of the chunk form's recursive halving), the elementwise state update of a
recurrent step.
Gates, norms, activations and casts, O(width) per token, are left out of both.

Shape letters: T new tokens, Tc cached tokens, H heads, K key dim, V value dim, C chunk size,
N = ⌈T / C⌉ chunks, P the chunk size rounded up to a power of two (per-channel gates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from seqlab.ops.delta_rule import INVERSE_LEAF, inverts_in_blocks

Gate = Literal["none", "head", "channel"]


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
    so ≈ 2C(K + V) + 4KV per token, MATH.md §6. Per-channel gates: the chunk form forms A V by
    recursive halving of the chunk padded to P rows (`_intra_channel_av`): at block size 2s,
    P / 2s products [s, K] @ [K, s] @ [s, V], P(P − 1)(K + V) over all levels, elementwise the
    diagonal qᵢ·kᵢ vᵢ and the scaled halves (PK per level); the parallel form forms A from an
    elementwise [C, C, K] tensor. The recurrent form reads out Sᵀq by a matmul (2KV) and updates
    S elementwise.
    """
    if form == "recurrent":
        update = (3 if gate != "none" else 2) * K * V  # decay, outer product k vᵀ, add
        return Flops(2 * K * V, update) * (H * T)
    C, N = _chunks(T, T if form == "parallel" else chunk_size)
    matmul = 4 * C * K * V
    other = 0
    if gate == "channel" and form == "chunk":
        P = 1 << (C - 1).bit_length()
        matmul += P * (P - 1) * (K + V)
        other = P * (2 * K + V) + (P.bit_length() - 1) * P * K
    elif gate == "channel":
        matmul += 2 * C * C * V
        other = 3 * C * C * K  # [C, C, K]: products, products, sums
    else:
        matmul += 2 * C * C * K + 2 * C * C * V
    return Flops(matmul, other) * (H * N)


def unit_lower_inverse_flops(C: int, leaf: int = INVERSE_LEAF) -> Flops:
    """`seqlab.ops.delta_rule.unit_lower_inverse` of one [C, C] matrix.

    Where C = leaf · 2^j (j ≥ 1): a solve per [leaf, leaf] diagonal block, C · leaf(leaf − 1),
    then at each block size s = leaf, 2·leaf, …, C/2 the C / 2s pairs take two [s, s] products,
    2C s² in all per level. Other C: one solve against I, C²(C − 1).
    """
    if not inverts_in_blocks(C, leaf):
        return Flops(0, C * C * (C - 1))
    matmul, s = 0, leaf
    while s < C:
        matmul += 2 * C * s * s
        s *= 2
    return Flops(matmul, C * leaf * (leaf - 1))


def delta_rule_flops(
    T: int,
    H: int,
    K: int,
    V: int,
    form: str = "chunk",
    chunk_size: int = 64,
    autograd: bool = False,
    gated: bool = False,
) -> Flops:
    """`delta_rule` over T tokens, without a gate or with one (`gated`).

    Per chunk and head: Q Kᵀ and diag(β) K Kᵀ (4C²K); for C ≤ K + V, and in a gated chunk form
    for any C, the inverse T = M⁻¹ (`unit_lower_inverse_flops`: block solves and products),
    W = T βγK and U' = T βV (2C²(K + V)), else one solve against [βγK | βV]
    (C(C − 1)(K + V)); then
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
    if C <= K + V or (gated and form == "chunk"):  # the inverse, then W = T βγK and U' = T βV
        inverse = unit_lower_inverse_flops(C)
        matmul += 2 * C * C * (K + V) + inverse.matmul
        solve = inverse.other
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
