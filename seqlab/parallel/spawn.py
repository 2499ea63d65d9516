"""Run a function on N local processes joined in a gloo process group (tests, benchmarks).

    results = run_group(fn, 2, *args)   # fn(rank, world_size, *args) on ranks 0, 1; their returns

Each child runs one intra-op thread (N processes share the machine's cores), joins the group
through a FileStore in a fresh temporary directory (no port to pick), calls fn, and hands back
what it returned (saved with torch.save). An exception in any child is raised here with its
traceback (torch.multiprocessing's ProcessRaisedException).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world_size: int, root: str, fn: Callable, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=world_size
    )
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_group(fn: Callable, world_size: int, *args: Any, timeout: float | None = None) -> list:
    """[fn(0, N, *args), …, fn(N − 1, N, *args)], each run in its own process of a gloo group.

    fn must be importable by name (a module-level function): children are spawned, not forked.
    timeout: seconds to wait for the children (None: no limit)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory(prefix="seqlab-group-") as root:
        ctx = mp.start_processes(
            _child,
            (world_size, root, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ctx.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the {world_size} processes did not finish in {timeout} s")
        return [
            torch.load(Path(root) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
