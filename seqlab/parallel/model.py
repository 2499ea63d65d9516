"""A model over a sequence split along T across a process group (LASP-2 / LASP-2H).

    split_sequence(model, group)              # every token mixer now runs on a slice of T
    ids_r = local_slice(ids, group)           # rank r's tokens [r·T/N, (r+1)·T/N) of every row
    out = model(ids_r)                        # logits of those tokens
    loss_r = cross_entropy(out.logits, targets_r, reduction="sum") / (B · T)
    loss_r.backward(); all_reduce(p.grad) for every parameter   # = the single-process gradients

Recurrent mixers exchange their chunk states (seqlab.parallel.lasp2), attention gathers keys and
values, short convolutions take the previous rank's last inputs; everything else in a model
(embedding, norms, channel mixers, head) acts on each token alone. A channel mixer whose loss
reads statistics over the batch's tokens (MoE load balancing) sees only the rank's tokens.
`seqlab train --sequence-parallel N` trains a model this way under torchrun, beside DDP or FSDP2
(seqlab.train.distributed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from seqlab.parallel.lasp2 import group_rank


def split_sequence(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Set `group` (None: undo) as the sequence group of every token mixer in `module`; returns
    `module`. Every mixer must declare `sequence_parallel`, else ValueError naming those that
    do not."""
    mixers = token_mixers(module)
    if group is not None:
        refuse_unsplittable({type(m).__name__: type(m) for m in mixers})
        group_rank(group)  # a clear error without a process group
    for m in mixers:
        m.sequence_group = group
    return module


def refuse_unsplittable(mixers: dict[str, type]) -> None:
    """A ValueError naming the mixers (name → TokenMixer class) that do not declare
    `sequence_parallel`, and those that do; nothing if all declare it."""
    from seqlab.mixers import MIXERS

    unsupported = sorted({name for name, cls in mixers.items() if not cls.sequence_parallel})
    if unsupported:
        covered = [name for name, cls in MIXERS.items() if cls.sequence_parallel]
        raise ValueError(
            f"these mixers cannot run on a slice of the sequence: {', '.join(unsupported)}; "
            f"sequence parallelism covers {', '.join(covered)}"
        )


def token_mixers(module: nn.Module) -> list[nn.Module]:
    from seqlab.mixers import TokenMixer

    mixers = [m for m in module.modules() if isinstance(m, TokenMixer)]
    if not mixers:
        raise ValueError(f"{type(module).__name__} holds no token mixer to split the sequence of")
    return mixers


@contextlib.contextmanager
def whole_sequence(module: nn.Module) -> Iterator[nn.Module]:
    """Within it, every token mixer of `module` runs on whole sequences (its sequence group
    unset); on leaving, each gets its group back. For a split model that must also run on a
    rank alone, e.g. to evaluate."""
    mixers = token_mixers(module)
    groups = [m.sequence_group for m in mixers]
    for m in mixers:
        m.sequence_group = None
    try:
        yield module
    finally:
        for m, group in zip(mixers, groups, strict=True):
            m.sequence_group = group


def local_slice(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This rank's equal share of x along `dim` (T): [r·T/N, (r+1)·T/N). T must divide by N."""
    rank, N = group_rank(group)
    T = x.shape[dim]
    if T % N:
        raise ValueError(
            f"the sequence length {T} (dim {dim} of shape {tuple(x.shape)}) must be a multiple "
            f"of the group's {N} ranks"
        )
    return x.narrow(dim, rank * (T // N), T // N)
