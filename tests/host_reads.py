"""A spy for reads of tensor values back to the host.

On a GPU such a read (`.item()`, `bool(t)`, `if t:`, data-dependent output sizes) makes the host
wait until the device has run everything queued before it; one per decode step serialises the
launches of the whole model. The spy sees them on CPU tensors too, as the aten calls they
dispatch to, so CI can check that a code path has none. It cannot see `Tensor.tolist()`,
`.numpy()` or a copy to the CPU (on CPU tensors these dispatch nothing it could tell apart), so
code that needs those is checked by other means (the MoE tests spy on which path ran).
"""

from __future__ import annotations

import traceback

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read values to the host or size their output by the values
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount")


class HostReads(TorchDispatchMode):
    """`with HostReads() as spy: ...`; then `spy.reads` lists (aten op, where it was called)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(f"aten.{op}." in name for op in HOST_READS):
            frames = [f for f in traceback.extract_stack() if "/seqlab/" in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.reads.append((name, where))
        return func(*args, **(kwargs or {}))
