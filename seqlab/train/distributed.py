"""Data-parallel training: one run in several processes under torchrun, with DDP or FSDP2, and
optionally sequence parallelism (LASP-2) inside groups of ranks.

    torchrun --nproc-per-node 4 -m seqlab.cli train --distributed ddp --batch-size 256 ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host:29500 \\
        -m seqlab.cli train --distributed fsdp ...
    torchrun --nproc-per-node 4 -m seqlab.cli train --distributed ddp --sequence-parallel 2 ...

`TrainConfig.distributed` picks how: "ddp" (DistributedDataParallel: every rank holds the whole
model, gradients are averaged) or "fsdp" (FSDP2's `fully_shard` on each block, then on the root:
parameters, gradients and optimizer state are sharded across the ranks, for models that do not
fit one device). "none" under torchrun (WORLD_SIZE > 1) is an error rather than a silent choice:
N undistributed copies of one run would compete for its out folder. Run in one process (no
torchrun, or WORLD_SIZE 1), "ddp" and "fsdp" train exactly like "none".

The process group is made with backend "nccl" on CUDA devices and "gloo" on the CPU (each rank
on cuda:LOCAL_RANK when the device is "auto" or "cuda"), from torchrun's environment; one made by
the caller beforehand is used as it is and left to the caller.

Exact sharding of one stream: `batch_size` stays the global batch. Every rank draws the same
global batch from the task's seeded training stream and trains on its contiguous slice of
batch_size / world rows (in grad_accum micro-batches), so the N ranks together see exactly the
samples of the one-process run, and the loss curve and the weights equal that run's to float
round-off. The cost: each rank generates the whole global batch, which is cheap for the
synthetic tasks (a streamed text task reads all of it on every rank). Each rank's loss is its
summed token losses over the global batch's scored tokens, times the world size, so that the
ranks' averaged gradient is the gradient of the global token mean, however unevenly the scored
tokens fall between the ranks; the loss logged is its mean over the ranks. (A MoE balance loss is
the ranks' mean of the per-shard balance losses, as with grad_accum.)

Sequence parallelism (`TrainConfig.sequence_parallel` N > 1, `--sequence-parallel N`) adds a
second dimension: the W ranks form W / N sequence groups of N consecutive ranks (rank r is rank
r % N of group r // N; every rank makes every group with `new_group`, and keeps its own), and
group g trains the rows that data-parallel replica g of W / N would, each of its ranks on its
T / N tokens of every row (seqlab.parallel: LASP-2 state exchanges for the recurrent mixers,
keys and values gathered for attention, in the group's own process group). The parameters are
still replicated (DDP) or sharded (FSDP2) over all W ranks, and their gradient reduction over
the whole job averages every rank's share: each rank's loss is weighted by W over the global
batch's scored tokens as above, so the result is again the one-process gradient of the global
token mean. "none" under torchrun stays an error ("ddp" with N = W is pure sequence parallelism);
N > 1 in one process and N not dividing W are errors before any work, and the trainer refuses a
mixer that cannot split before the process group is made; a batch whose T is not a multiple of N
is padded at its end with unscored targets. N = 1 is plain data parallelism.

Evaluation is not split: every rank evaluates the whole held-out split with the same weights and
gets the same figures as the one-process run (with FSDP the ranks must run every forward together
anyway; with sequence parallelism the mixers' group is unset while it runs). Only rank 0 touches
the out folder: it holds the lock, writes checkpoints, TensorBoard events and curves.json, logs to
MLflow and W&B, shows progress, and (in `seqlab train`) records the run. A checkpoint holds the
full, unsharded weights and optimizer state (gathered to rank 0's CPU), in the format of a
one-process run: a checkpoint of a W-process run resumes in M processes, with DDP, FSDP or
neither, and with or without sequence parallelism. On resume rank 0 reads it and broadcasts it,
so the ranks need no shared file system.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

Distributed = Literal["none", "ddp", "fsdp"]
T = TypeVar("T")


@dataclass(frozen=True)
class Place:
    """This process's place in the job."""

    rank: int
    size: int
    local_rank: int


def place() -> Place:
    """From the default process group if one is initialised, else from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK), else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Place(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
    rank = _env_int("RANK", 0)
    return Place(rank, _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", rank))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"environment variable {name}={value!r}: expected an int >= 0")
    return number


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (or runs alone)."""
    return place().rank == 0


def check_world(
    distributed: Distributed, batch_size: int, grad_accum: int, size: int, sequence: int = 1
) -> None:
    """A ValueError, before any work, for a setting that cannot run in `size` processes, with
    `sequence` ranks sharing each sequence (sequence parallelism)."""
    if sequence > 1 and size == 1:
        raise ValueError(
            f"train.sequence_parallel is {sequence} but this process runs alone: sequence "
            "parallelism splits every sequence across the ranks of a torchrun job, e.g. "
            f"torchrun --nproc-per-node {sequence} -m seqlab.cli train --distributed ddp "
            f"--sequence-parallel {sequence} ..."
        )
    if size > 1 and distributed == "none":
        why = (
            "; sequence parallelism needs one of them too: the parameters live on every rank "
            "and their gradients are summed over all ranks"
            if sequence > 1
            else ""
        )
        raise ValueError(
            f"this process is one of {size} (WORLD_SIZE={size}, e.g. started by torchrun) but "
            'train.distributed is "none": pick --distributed ddp (every rank holds the model) '
            f"or --distributed fsdp (the model sharded across the ranks){why}"
        )
    if size % sequence:
        raise ValueError(
            f"train.sequence_parallel ({sequence}) must divide the world size ({size}): the "
            f"ranks form world size / {sequence} sequence groups of {sequence} consecutive ranks"
        )
    replicas = size // sequence
    if batch_size % (replicas * grad_accum):
        what = (
            "world size"
            if sequence == 1
            else f"data-parallel size (world size {size} / sequence_parallel {sequence})"
        )
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of {what} × grad_accum "
            f"({replicas} × {grad_accum} = {replicas * grad_accum}): batch_size is the global "
            "batch, split into equal shards per "
            f"{'rank' if sequence == 1 else 'sequence group'} and equal micro-batches per shard"
        )


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: its shard of a DTensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole of a (possibly distributed) tensor: a collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's) as
    `Optimizer.state_dict()` keys it: parameters numbered in param-group order."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def optimizer_by_name(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """The inverse of `optimizer_by_index`: `names[g]` lists the names of group g's parameters."""
    flat = [n for group in names for n in group]
    groups = state["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g) for g in names]:
        raise ValueError(
            f"optimizer state for param groups of {[len(g['params']) for g in groups]} "
            f"parameters; this optimizer has {[len(g) for g in names]}"
        )
    return {
        "state": {flat[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": n} for g, n in zip(groups, names, strict=True)],
    }


class World:
    """The ranks of one run and what they do together. With one process every method is the
    plain one-process operation and no process group exists.

    With sequence parallelism (`sequence` > 1) the ranks form size / sequence groups of
    `sequence` consecutive ranks: rank r is rank r % sequence of sequence group r // sequence
    (`sequence_group`, its process group), which trains the share of the global batch that data
    parallel replica r // sequence of size / sequence would."""

    def __init__(
        self,
        distributed: Distributed,
        device: torch.device,
        where: Place,
        owned: bool,
        sequence: int = 1,
        sequence_group: dist.ProcessGroup | None = None,
    ):
        self.kind: Distributed = distributed if where.size > 1 else "none"
        self.rank, self.size = where.rank, where.size
        self.device = device
        self.owned = owned  # this object made the process group, so it destroys it
        self.sequence = sequence  # ranks per sequence group
        self.sequence_group = sequence_group  # this rank's; None without sequence parallelism

    @property
    def replica(self) -> int:
        """Which share of the global batch this rank trains on (its sequence group's index)."""
        return self.rank // self.sequence

    @property
    def replicas(self) -> int:
        """Into how many shares the global batch is split: the data-parallel size."""
        return self.size // self.sequence

    @classmethod
    def join(
        cls,
        distributed: Distributed,
        batch_size: int,
        grad_accum: int,
        device: torch.device,
        sequence: int = 1,
    ) -> tuple[World, torch.device]:
        """Check the setting against the job, make the process group if the job has several
        processes and none exists yet (and the sequence groups if `sequence` > 1), and return
        the world and this rank's device."""
        where = place()
        check_world(distributed, batch_size, grad_accum, where.size, sequence)
        if where.size == 1:
            return cls(distributed, device, where, owned=False), device
        if device.type == "cuda" and device.index is None:
            if where.local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {where.local_rank}: only {torch.cuda.device_count()} CUDA "
                    "devices here; start at most that many processes per node"
                )
            device = torch.device("cuda", where.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owned = not dist.is_initialized()
        if owned:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        group = None
        if sequence > 1:
            # Every rank takes part in making every group (new_group is a collective of the
            # whole job); each keeps its own. The LASP-2 exchanges run in it, apart from the
            # gradient reduction over the whole job.
            for start in range(0, where.size, sequence):
                made = dist.new_group(list(range(start, start + sequence)))
                if start <= where.rank < start + sequence:
                    group = made
        return cls(distributed, device, where, owned, sequence, group), device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def leave(self) -> None:
        """Destroy the process group if this world made it, else only the sequence group it
        made (idempotent)."""
        if dist.is_initialized():
            if self.owned:
                dist.destroy_process_group()  # with every group made after it
            elif self.sequence_group is not None:
                dist.destroy_process_group(self.sequence_group)
        self.owned = False
        self.sequence_group = None

    # collectives
    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.size

    def first(self, value: str | None) -> str | None:
        """The first rank's `value` that is not None (the ranks' FSDP shards differ)."""
        if self.kind != "fsdp":
            return value  # replicas: every rank holds the same
        flag = torch.tensor([value is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        values: list[str | None] = [None] * self.size
        dist.all_gather_object(values, value)
        return next(v for v in values if v is not None)

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (pickled: for small objects)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 only; its result on every rank, or its exception raised on every
        rank, so that no rank goes on waiting for one that failed."""
        if self.size == 1:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        error: Exception | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as e:
                error, outcome = e, (False, _portable(e))
        ok, value = self.broadcast(outcome if self.is_main else None)
        if error is not None:
            raise error
        if not ok:
            raise value
        return value

    # the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs: DDP around `model`, or `model` itself sharded
        in place with FSDP2 (each block, then the root), or `model` alone in one process."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Every parameter gets a gradient in every step (tests/mixers checks it of each
            # mixer; MoE experts are stacked tensors), so no find_unused_parameters.
            return DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # The blocks return views (x + h reshaped); the model never changes them in place,
            # which is what this warning is about.
            warnings.filterwarnings(
                "ignore", message=r"FSDP2-wrapped module .* returned a view tensor"
            )
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        return model

    def no_sync(self, train_module: nn.Module, last: bool) -> AbstractContextManager:
        """DDP: skip the gradient all-reduce on every micro-batch but the last. (FSDP2 reduces
        each micro-batch's gradients into the shards: keeping whole gradients would undo its
        memory saving.)"""
        if self.kind == "ddp" and not last:
            return train_module.no_sync()
        return nullcontext()

    def full_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The whole state dict of a sharded model on rank 0's CPU (None on the other ranks);
        a collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        return weights if self.is_main else None

    def full_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """The whole optimizer state of a sharded model on rank 0's CPU, keyed as
        `Optimizer.state_dict()` keys it (None on the other ranks); a collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return optimizer_by_index(state) if self.is_main else None

    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, Tensor] | None,
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        """Load rank 0's whole weights and optimizer state (as `Optimizer.state_dict()` keys
        it) into every rank's model and optimizer, sharding them under FSDP; the other ranks
        pass None."""
        if self.size == 1:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights if self.is_main else {}, options=options)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        state = optimizer_by_name(optimizer_state, groups) if self.is_main else {}
        set_optimizer_state_dict(model, optimizer, state, options=options)
        # Its broadcast hands hyperparameters back as lists where the optimizer keeps tuples
        # (AdamW's betas): restore its own types, so that a checkpoint written after a resume
        # is the one-process format to the letter.
        for group in optimizer.param_groups:
            for key, default in optimizer.defaults.items():
                if isinstance(default, tuple) and isinstance(group.get(key), list):
                    group[key] = tuple(group[key])


def local_tensors(named: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    for name, t in named:
        yield name, local(t)


def _portable(e: BaseException) -> BaseException:
    """`e` as rank 0 raised it, or a RuntimeError with its text if it did not survive pickling
    (broadcast_object_list unpickles it on the other ranks)."""
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
