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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from seqlab.parallel.lasp2 import group_rank


def split_sequence(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Set `group` (None: undo) as the sequence group of every token mixer in `module`; returns
    `module`. Every mixer must declare `sequence_parallel`, else ValueError naming those that
    do not."""
    from seqlab.mixers import MIXERS, TokenMixer

    mixers = [m for m in module.modules() if isinstance(m, TokenMixer)]
    if not mixers:
        raise ValueError(f"{type(module).__name__} holds no token mixer to split the sequence of")
    unsupported = sorted({type(m).__name__ for m in mixers if not m.sequence_parallel})
    if group is not None and unsupported:
        covered = [name for name, cls in MIXERS.items() if cls.sequence_parallel]
        raise ValueError(
            f"these mixers cannot run on a slice of the sequence: {', '.join(unsupported)}; "
            f"sequence parallelism covers {', '.join(covered)}"
        )
    if group is not None:
        group_rank(group)  # a clear error without a process group
    for m in mixers:
        m.sequence_group = group
    return module


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
