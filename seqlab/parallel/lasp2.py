"""LASP-2 sequence parallelism (Sun et al. 2025) for the chunked recurrences and attention.

Each rank r of a process group of N holds the r-th slice of T of every sequence (B, H and the
feature dims are whole on every rank). A linear recurrence is an affine map of its state over a
slice, S_out = A_r(S_in) + F_r, with F_r the slice's state from a zero start:

    gated linear    A_r(S) = D_r ⊙ S,   D_r = exp(Σ_t g_t)            [B, H] or [B, H, K]
    delta rule      A_r(S) = M_r S,     M_r = Π_t γ_t (I − β_t k_t k_tᵀ)  [B, H, K, K]

so every rank runs its chunk form locally, then ONE all-gather of (F_r, D_r or M_r), whose size
does not depend on T, gives each rank the state entering its slice, S_in,r = A_{r−1}(… A_0(S0) +
F_0 …) + F_{r−1}, and its outputs gain the S_in term. Attention layers (LASP-2H) all-gather
their keys and values instead and attend with the rank's position offset; a short convolution
needs the previous rank's last W − 1 inputs (one all-gather of the tails).

Backward: every exchange is `_GatherCombine`, an autograd function whose forward is the
all-gather followed by a local `combine`, and whose backward recomputes `combine` to get the
gradient of every gathered piece and sends each piece's gradient back to its owner with one
all-to-all (gloo has no reduce-scatter). Its output is used by every rank (a zero state on rank 0
still enters the output), so every rank runs each backward collective in the same order.

`initial_state` is the state before the whole sequence: rank 0 reads it, the other ranks must
pass None. The final state a rank returns is the state after its own slice (the last rank's is
the whole sequence's), as the op would give for its slice started from S_in,r.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from seqlab.ops._common import (
    check_initial_state,
    check_qkv,
    check_scale,
    compute_dtype,
    floor_log_gate,
)
from seqlab.ops.attention import KVCache, attention
from seqlab.ops.delta_rule import delta_rule
from seqlab.ops.gated_linear import gated_linear


@dataclass
class CommLog:
    """What a rank sent in its collectives: one (name, bytes, seconds) row per call.

    bytes: what this rank puts on the wire for the call, from the tensors' sizes (an all-gather
    sends its piece to N − 1 ranks, an all-to-all sends N − 1 of its N parts); seconds: the
    wall time of the blocking call (waiting for slower ranks included).
    """

    rows: list[tuple[str, int, float]] = field(default_factory=list)

    def add(self, name: str, nbytes: int, seconds: float) -> None:
        self.rows.append((name, nbytes, seconds))

    @property
    def bytes(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def seconds(self) -> float:
        return sum(r[2] for r in self.rows)

    def clear(self) -> None:
        self.rows.clear()


def group_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group` (None: the default group); a clear error without one."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sequence parallelism needs an initialised process group: call "
            "torch.distributed.init_process_group first (seqlab.parallel.spawn.run_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(x: torch.Tensor, group, log: CommLog | None) -> torch.Tensor:
    """[N, *x.shape]: every rank's x, in rank order."""
    _, N = group_rank(group)
    parts = [torch.empty_like(x) for _ in range(N)]
    t0 = time.perf_counter()
    dist.all_gather(parts, x.contiguous(), group=group)
    if log is not None:
        log.add("all_gather", x.numel() * x.element_size() * (N - 1), time.perf_counter() - t0)
    return torch.stack(parts)


def _sum_to_owners(dX: torch.Tensor, group, log: CommLog | None) -> torch.Tensor:
    """dX [N, ...] on every rank → Σ over ranks of their dX[r], on rank r."""
    _, N = group_rank(group)
    out = torch.empty_like(dX)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, dX.contiguous(), group=group)
    if log is not None:
        log.add("all_to_all", dX[0].numel() * dX.element_size() * (N - 1), time.perf_counter() - t0)
    return out.sum(0)


class _GatherCombine(torch.autograd.Function):
    """combine(all_gather(local)) with the gradient sent back to each piece's owner."""

    @staticmethod
    def forward(ctx, local, combine, group, log):
        X = _all_gather(local, group, log)
        ctx.combine, ctx.group, ctx.log = combine, group, log
        ctx.save_for_backward(X)
        return combine(X)

    @staticmethod
    def backward(ctx, grad):
        (X,) = ctx.saved_tensors
        with torch.enable_grad():
            Xg = X.detach().requires_grad_()
            out = ctx.combine(Xg)
            dX = None
            if out.requires_grad:
                (dX,) = torch.autograd.grad(out, Xg, grad, allow_unused=True)
        dX = torch.zeros_like(X) if dX is None else dX
        return _sum_to_owners(dX, ctx.group, ctx.log), None, None, None


def gather_combine(
    local: torch.Tensor,
    combine: Callable[[torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None = None,
    log: CommLog | None = None,
) -> torch.Tensor:
    """combine(X) with X [N, *local.shape] every rank's `local` (one all-gather), differentiable:
    the gradient of X[s] on every rank is summed into rank s's `local` (one all-to-all).
    Every rank of the group must call it, in the same order, with same-shaped `local`."""
    return _GatherCombine.apply(local, combine, group, log)


def _check_initial_state(initial_state, rank: int) -> None:
    if initial_state is not None and rank != 0:
        raise ValueError(
            f"initial_state is the state before the whole sequence and is read on rank 0 only; "
            f"rank {rank} got one of shape {tuple(initial_state.shape)}: pass None there"
        )


def _prefix_state(F: torch.Tensor, A: torch.Tensor | None, apply, rank: int, group, log):
    """S_in for this rank: the scan S ← apply(A_s, S) + F_s over the ranks s < rank, from 0.

    F [B, H, K, V] and A (None: the identity map) are this rank's; one all-gather of both."""
    shapes = [F.shape] + ([] if A is None else [A.shape])
    sizes = [F.numel()] + ([] if A is None else [A.numel()])
    local = F.reshape(-1) if A is None else torch.cat([F.reshape(-1), A.reshape(-1)])

    def combine(X):
        S = torch.zeros_like(F)
        for s in range(rank):
            parts = X[s].split(sizes)
            F_s = parts[0].view(shapes[0])
            S = F_s + (S if A is None else apply(parts[1].view(shapes[1]), S))
        return S

    return gather_combine(local, combine, group, log)


def lasp2_gated_linear(
    q,
    k,
    v,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    *,
    form="chunk",
    chunk_size=64,
    backend="auto",
    group: dist.ProcessGroup | None = None,
    log: CommLog | None = None,
    check_values=True,
):
    """`seqlab.ops.gated_linear` over a sequence split along T across `group` (the same
    arguments, no cu_seqlens, the options after output_final_state by keyword).

    q, k [B, T_r, H, K], v [B, T_r, H, V], g None, [B, T_r, H] or [B, T_r, H, K]: this rank's
    slice (T_r may differ between ranks). Returns o [B, T_r, H, V] and, with
    `output_final_state`, the state [B, H, K, V] after this rank's slice.

    The local op runs once from rank 0's initial state or zero, giving o₀ and F_r; the gathered
    (F_s, D_s) give S_in, whose contribution to o_t is scale · (q_t ⊙ exp(b_t))ᵀ S_in with
    b_t = Σ_{u ≤ t} g_u the slice's cumulative log-decay (exact: the state at t is
    diag(exp(b_t)) S_in plus the zero-start state).
    """
    rank, _ = group_rank(group)
    _check_initial_state(initial_state, rank)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    gf = None if g is None else g.to(dt)
    o, F = gated_linear(
        qf,
        kf,
        vf,
        gf,
        scale,
        initial_state,
        True,
        form=form,
        chunk_size=chunk_size,
        backend=backend,
        check_values=check_values,
    )
    scale = check_scale(scale, q.shape[-1])
    if gf is None:
        D = b = None
        S_in = _prefix_state(F, None, None, rank, group, log)
        q_in = qf
    else:
        b = floor_log_gate(gf, dt).cumsum(1)  # [B, T_r, H] or [B, T_r, H, K]
        D = b[:, -1].exp()  # [B, H] or [B, H, K]

        def decay(D_s, S):
            return (D_s[..., None, None] if D_s.dim() == 2 else D_s[..., None]) * S

        S_in = _prefix_state(F, D, decay, rank, group, log)
        q_in = qf * (b.exp()[..., None] if b.dim() == 3 else b.exp())
    o = o + torch.einsum("bthk,bhkv->bthv", q_in, S_in) * scale
    S = None
    if output_final_state:
        S = F + (S_in if D is None else decay(D, S_in))
    return o.to(q.dtype), S


def lasp2_delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    *,
    allow_neg_eigval=False,
    form="chunk",
    chunk_size=64,
    backend="auto",
    group: dist.ProcessGroup | None = None,
    log: CommLog | None = None,
    check_values=True,
):
    """`seqlab.ops.delta_rule` over a sequence split along T across `group` (the same
    arguments, no cu_seqlens, the options after output_final_state by keyword).

    q, k [B, T_r, H, K], v [B, T_r, H, V], beta [B, T_r, H], g None or [B, T_r, H]: this rank's
    slice. Returns o [B, T_r, H, V] and, with `output_final_state`, the state after the slice.

    The recurrence acts on each column of S alone, so one run of the local chunk form over
    K + V columns, v' = [v | 0] from S0' = [S0 | I], gives everything: its first V columns are
    the zero-start output o₀ and state F_r, its last K the transition M_r (final state) and
    scale · M_{≤t}ᵀ q_t (output), the map of S_in into o_t. Exact, and the local work is one
    chunk pass over K + V columns instead of two over V (a rerun from S_in).
    """
    rank, _ = group_rank(group)
    _check_initial_state(initial_state, rank)
    B, _, H, K, V = check_qkv(q, k, v)  # before v and the state are widened (β, g: by the op)
    check_initial_state(initial_state, B, H, K, V, None)
    dt = compute_dtype(q.dtype)
    vf = v.to(dt)
    v2 = torch.cat([vf, vf.new_zeros(*vf.shape[:-1], K)], -1)
    S0 = vf.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    eye = torch.eye(K, dtype=dt, device=v.device).expand(B, H, K, K)
    o2, S2 = delta_rule(
        q.to(dt),
        k.to(dt),
        v2,
        beta.to(dt),
        None if g is None else g.to(dt),
        scale,
        torch.cat([S0, eye], -1),
        True,
        allow_neg_eigval=allow_neg_eigval,
        form=form,
        chunk_size=chunk_size,
        backend=backend,
        check_values=check_values,
    )
    o, q_map = o2.split([V, K], -1)  # q_map [B, T_r, H, K]: scale · M_{≤t}ᵀ q_t
    F, M = S2.split([V, K], -1)
    S_in = _prefix_state(F, M, torch.matmul, rank, group, log)
    o = o + torch.einsum("bthk,bhkv->bthv", q_map, S_in)
    S = torch.baddbmm(F.flatten(0, 1), M.flatten(0, 1), S_in.flatten(0, 1)).view(B, H, K, V)
    return o.to(q.dtype), (S if output_final_state else None)


def lasp2_attention(
    q,
    k,
    v,
    scale=None,
    window=None,
    initial_state=None,
    output_final_state=False,
    *,
    group: dist.ProcessGroup | None = None,
    log: CommLog | None = None,
):
    """`seqlab.ops.attention` over a sequence split along T across `group` (LASP-2H).

    q [B, T_r, H, K], k [B, T_r, Hkv, K], v [B, T_r, Hkv, V]: this rank's slice, every rank the
    same T_r (the gathered keys are [N, B, T_r, ...]). One all-gather of [k | v]; the earlier
    ranks' keys and values are the cache this slice attends after, so the mask is offset by
    r · T_r. Positional encodings (RoPE) must already be at the global positions. With
    `output_final_state` the returned cache holds the keys and values up to the slice's end.
    """
    rank, _ = group_rank(group)
    if initial_state is not None:
        raise ValueError(
            "lasp2_attention takes no initial_state: the earlier ranks' keys and values are its "
            f"cache; got a {type(initial_state).__name__}"
        )
    K = check_qkv(q, k, v, kv_heads_may_differ=True)[3]  # before k and v are joined
    kv = torch.cat([k, v], -1)  # [B, T_r, Hkv, K + V]

    def combine(X):  # [N, B, T_r, Hkv, K + V] → the earlier ranks' tokens [B, r·T_r, Hkv, K + V]
        return X[:rank].movedim(0, 1).flatten(1, 2)

    earlier = gather_combine(kv, combine, group, log)
    cache = KVCache(*earlier.split([K, v.shape[-1]], -1))
    return attention(
        q, k, v, scale, window, initial_state=cache, output_final_state=output_final_state
    )


def previous_tail(x: torch.Tensor, n: int, *, group=None, log: CommLog | None = None):
    """The previous rank's last n time steps of x [B, T_r, C] → [B, n, C] (zeros on rank 0):
    the state a short convolution of width n + 1 starts this rank's slice from. T_r ≥ n."""
    rank, _ = group_rank(group)
    if x.shape[1] < n:
        raise ValueError(
            f"each rank's slice must hold at least {n} steps (a short convolution's tail), got "
            f"x of shape {tuple(x.shape)}"
        )

    def combine(X):  # [N, B, n, C]
        return X[rank - 1] if rank > 0 else torch.zeros_like(X[0])

    return gather_combine(x[:, x.shape[1] - n :], combine, group, log)


LASP2 = {gated_linear: lasp2_gated_linear, delta_rule: lasp2_delta_rule, attention: lasp2_attention}


def sequence_op(op: Callable, group: dist.ProcessGroup | None) -> Callable:
    """`op` itself when the whole sequence is here (group None), else its LASP-2 form over
    `group` (the same arguments; no cu_seqlens)."""
    return op if group is None else functools.partial(LASP2[op], group=group)


def slice_start(T: int, group: dist.ProcessGroup | None) -> int:
    """The position of this rank's first token when every rank holds T of them (0 without a
    group)."""
    return 0 if group is None else group_rank(group)[0] * T
