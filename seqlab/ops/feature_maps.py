"""Feature maps φ for linear attention: φ(q)·φ(k) stands in for exp(q·k/√d).

Each map acts on the last dim of a [..., d] tensor. `taylor` is BASED's exact 2nd-order Taylor
expansion; `hedgehog` is Hedgehog's learnable map, trained with `hedgehog_distill_loss` to mimic the
softmax attention weights of given q, k. Maps are looked up by name with `get_feature_map`, and
`feature_dim` gives the size of their output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seqlab.ops._common import check_shape, check_tensor, compute_dtype


def identity(x: Tensor) -> Tensor:
    return x


def elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1


def relu(x: Tensor) -> Tensor:
    return F.relu(x)


def taylor(x: Tensor) -> Tensor:
    """[..., d] → [..., 1 + d + d²] with φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) exactly."""
    d = x.shape[-1]
    r2 = math.sqrt(d)  # r² with r = d^(1/4)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)  # [..., d²]
    ones = torch.ones_like(x[..., :1])
    return torch.cat([ones, x / math.sqrt(r2), outer / (math.sqrt(2) * r2)], dim=-1)


def hedgehog(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """[..., d] → [..., 2m]: z = x W (+ b), φ(x) = [softmax(z), softmax(-z)].

    weight [d, m] is shared by all heads; weight [H, d, m] gives one map per head and then x is
    [..., H, d]. bias is [m] or [H, m] to match.
    """
    check_tensor("x", x)
    check_tensor("weight", weight)
    if weight.dim() == 2:
        if x.shape[-1] != weight.shape[0]:
            raise ValueError(
                f"hedgehog weight [d, m] = {tuple(weight.shape)} needs x [..., d] with "
                f"d = {weight.shape[0]}, got shape {tuple(x.shape)}"
            )
        z = x @ weight
    elif weight.dim() == 3:
        H, d, _ = weight.shape
        if x.dim() < 2 or x.shape[-2:] != (H, d):
            raise ValueError(
                f"hedgehog weight [H, d, m] = {tuple(weight.shape)} needs x [..., H, d] = "
                f"[..., {H}, {d}], got shape {tuple(x.shape)}"
            )
        z = torch.einsum("...hd,hdm->...hm", x, weight)
    else:
        raise ValueError(
            f"hedgehog weight must be [d, m] or [H, d, m], got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        expected = (*weight.shape[:-2], weight.shape[-1])
        if tuple(bias.shape) != expected:
            raise ValueError(f"hedgehog bias must have shape {expected}, got {tuple(bias.shape)}")
        z = z + bias
    return torch.cat([z.softmax(dim=-1), (-z).softmax(dim=-1)], dim=-1)


FEATURE_MAPS: dict[str, Callable[..., Tensor]] = {
    "identity": identity,
    "elu": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
    "hedgehog": hedgehog,
}


def get_feature_map(name: str) -> Callable[..., Tensor]:
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature map {name!r}; valid names: {', '.join(map(repr, FEATURE_MAPS))}"
        )
    return FEATURE_MAPS[name]


def feature_dim(name: str, d: int, hedgehog_dim: int | None = None) -> int:
    """Size of the last dim of `get_feature_map(name)` applied to [..., d] (hedgehog: weight [d, m],
    hedgehog_dim = m)."""
    get_feature_map(name)
    if name == "taylor":
        return 1 + d + d * d
    if name == "hedgehog":
        if hedgehog_dim is None:
            raise ValueError(
                "feature_dim('hedgehog', ...) needs hedgehog_dim, the m of weight [d, m]"
            )
        return 2 * hedgehog_dim
    return d


def hedgehog_distill_loss(
    q: Tensor, k: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """KL(softmax attention ‖ hedgehog linear attention) of causal weights; q, k [B, T, H, d].

    The teacher is softmax(q kᵀ/√d) (detached); the student is φ(q)φ(k)ᵀ normalised over the causal
    keys. KL differs from Hedgehog's cross-entropy by the teacher's entropy, a constant, so the
    gradients are the same, and a perfect map scores 0. Averaged over batch, heads and queries.
    """
    check_tensor("q", q)
    check_tensor("k", k)
    check_shape("q", q, "BTHd", (None, None, None, None))
    check_shape("k", k, "BTHd", tuple(q.shape))
    dt = compute_dtype(q.dtype)
    q, k, weight = q.to(dt), k.to(dt), weight.to(dt)
    bias = None if bias is None else bias.to(dt)
    T, d = q.shape[1], q.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [T, T]

    scores = torch.einsum("bthd,bshd->bhts", q, k).detach() / math.sqrt(d)
    scores = scores.masked_fill(~causal, float("-inf"))
    p = scores.softmax(dim=-1)
    # p = 0 above the diagonal; a finite log p there keeps p · log p at 0, not nan
    log_p = scores.log_softmax(dim=-1).masked_fill(~causal, 0.0)

    fq, fk = hedgehog(q, weight, bias), hedgehog(k, weight, bias)
    a = torch.einsum("bthf,bshf->bhts", fq, fk)  # > 0: both maps are softmaxes
    a_sum = a.masked_fill(~causal, 0.0).sum(dim=-1, keepdim=True)
    log_a = a.masked_fill(~causal, 1.0).log() - a_sum.log()
    return (p * (log_p - log_a)).sum(dim=-1).mean()
