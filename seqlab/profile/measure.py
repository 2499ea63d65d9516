"""Measured cost: latency with the first call reported apart, and peak memory of one call.

    timing = time_call(fn, device, warmup=1, repeats=5)   # first call, then `repeats` samples
    timing.median_s, timing.q1_s, timing.q3_s, timing.first_call_s
    extra = peak_memory(fn, device)                       # bytes above what was live before

The device is synchronised before every clock read. The first call is timed on its own: it pays
for lazy initialisation, compilation and autotuning, which the steady state does not.

Peak memory is the memory a call needs above what was already live (parameters, inputs, state):
- CUDA: `torch.cuda.max_memory_allocated` above `memory_allocated` before the call — tensor
  bytes from torch's allocator.
- CPU (Linux): the process's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs) above its RSS before the call, after `malloc_trim` has handed freed heap
  back to the OS, so memory freed by an earlier call is not silently reused. It sees everything
  the process touches — tensors, allocator slack, thread stacks — so it reads a little above the
  tensor bytes. tracemalloc would not see torch's allocations at all.
Elsewhere `peak_memory` returns None and `memory_method` says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.metadata
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

_CLEAR_REFS = "/proc/self/clear_refs"


def meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable); None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on `device`: the GPU's free memory, or the machine's MemAvailable; None
    where that is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return meminfo("MemAvailable")
    return None


@dataclass(frozen=True)
class Timing:
    """Seconds of the first call and of the steady-state samples after the warm-up."""

    first_call_s: float
    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def q1_s(self) -> float:
        return self._quartiles()[0]

    @property
    def q3_s(self) -> float:
        return self._quartiles()[2]

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def max_s(self) -> float:
        return max(self.samples_s)

    def _quartiles(self) -> list[float]:
        if len(self.samples_s) == 1:
            return [self.samples_s[0]] * 3
        return statistics.quantiles(self.samples_s, n=4, method="inclusive")

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s,
            "q1_s": self.q1_s,
            "q3_s": self.q3_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "first_call_s": self.first_call_s,
            "repeats": len(self.samples_s),
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5
) -> Timing:
    """Time `fn`: the first call alone, `warmup` untimed calls, then `repeats` timed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}")

    def timed() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    first = timed()
    for _ in range(warmup):
        fn()
    return Timing(first, tuple(timed() for _ in range(repeats)))


def interleaved_times(
    calls: Mapping[str, Callable[[], object]], rounds: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds of every call in each of `rounds` rounds: each round runs every call once, in an
    order shuffled anew each round (seeded, so a rerun takes the same orders).

    Calls taking turns share the load of other processes alike; the shuffle keeps any one call
    from always following the same one. A call's time on a CPU depends on what ran before it:
    on the 2-core VM (2026-12-06), mlstm_kernels' chunkwise forward+backward took 37 ms after
    seqlab's call and 26 ms after a long recurrent loop (6,600 page faults per call against none:
    the allocator's heap state the previous call left), and an A/B of two codes in a fixed order
    read 0.61-0.92x where the shuffled order read 0.96x.
    """
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1, got {rounds}")
    names = list(calls)
    order = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def package_versions(names: list[str] | tuple[str, ...]) -> str:
    """ "name version, ..." of installed distributions ("name not installed" for a missing one),
    for a benchmark's header: a peer's speed changes between its releases (transformers' gated
    delta function, fla's naive forms), so a ratio is only reproducible with the versions."""
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def _libc() -> ctypes.CDLL | None:
    """The C library if it has malloc_trim (glibc; musl and macOS lack it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def memory_method(device: torch.device) -> str:
    """How `peak_memory` measures on `device`, or why it cannot."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above memory_allocated before the call"
    if device.type != "cpu":
        return f"unavailable: no peak-memory measure for device type {device.type!r}"
    if not os.access(_CLEAR_REFS, os.W_OK) or _LIBC is None:
        return "unavailable: needs Linux /proc/self/clear_refs and glibc malloc_trim"
    return "RSS high-water mark (VmHWM) above RSS before the call, after malloc_trim"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM missing from /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes `fn` needs above what is live before it (see the module doc); None where
    `memory_method` says unavailable."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if memory_method(device).startswith("unavailable"):
        return None
    gc.collect()
    _LIBC.malloc_trim(0)
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_bytes()
    fn()
    return max(0, _hwm_bytes() - before)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA OOM, or the CPU allocator failing to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
