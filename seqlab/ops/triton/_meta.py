"""Launch geometry shared by the Triton kernels: chunk tables, block sizes, dot precision.

Shape letters: B batch, T length, H heads, K key dim, V value dim, C chunk size (BT in kernels),
N sequences, NT chunks per sequence, NC chunks in all. Every kernel sees q/k/v as [B·T, H, D]
(contiguous [B, T, H, D]); sequence n spans rows [bos_n, eos_n). Without cu_seqlens the N = B
sequences have length T and the chunk → (sequence, position) map is arithmetic; with cu_seqlens
it is read from `chunk_index` [NC, 2].
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

SUB_CHUNK = 16  # per-channel gates: the diagonal [c, c] blocks are formed elementwise


@dataclass(frozen=True)
class Chunks:
    """Where each chunk lies. `cu_seqlens`, `chunk_index`, `chunk_offsets` are None without
    packing; `T` is then the length of every sequence."""

    N: int  # sequences
    T: int  # per-sequence length (unpacked) or total packed length
    NT: int  # chunks per sequence (unpacked); 0 when packed
    NC: int  # chunks in all
    BT: int
    cu_seqlens: torch.Tensor | None  # [N + 1] int32
    chunk_index: torch.Tensor | None  # [NC, 2] int32: (sequence, chunk within it)
    chunk_offsets: torch.Tensor | None  # [N + 1] int32: first global chunk of each sequence

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def chunks(B: int, T: int, BT: int, cu: torch.Tensor | None, device) -> Chunks:
    """`cu` is the checked CPU int64 offsets tensor, or None."""
    if cu is None:
        NT = triton.cdiv(T, BT)
        return Chunks(B, T, NT, B * NT, BT, None, None, None)
    nt = (cu[1:] - cu[:-1] + BT - 1) // BT
    offsets = torch.cat([nt.new_zeros(1), nt.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(nt)), nt)
    index = torch.stack([seq, torch.arange(int(offsets[-1])) - offsets[seq]], 1)

    def dev(x):
        return x.to(torch.int32).to(device, non_blocking=True)

    return Chunks(
        len(nt), T, 0, int(offsets[-1]), BT, dev(cu), dev(index.contiguous()), dev(offsets)
    )


def block(d: int, cap: int = 64) -> int:
    """Tile width for a head dim of d: a power of two, at least 16 (tl.dot's minimum)."""
    return min(cap, max(16, triton.next_power_of_2(d)))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; half inputs already round at the input."""
    return "ieee" if dtype == torch.float32 else "tf32"


WARPS_ENV = "SEQLAB_TRITON_WARPS"
KERNELS = (  # every kernel's name without "_kernel", for WARPS_ENV
    "chunk_cumsum", "chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv",
    "chunk_bwd_dqk", "wy_fwd", "wy_bwd", "gla_intra_A", "gla_bwd_dA", "gla_intra_dqk",
    "fused_recurrent",
)  # fmt: skip


def warps(kernel: str, default: int) -> int:
    """num_warps for `kernel` (its name without "_kernel"): `default`, unless the environment's
    SEQLAB_TRITON_WARPS names it ("wy_bwd=4,chunk_bwd_dqk=8"). Triton has miscompiled kernels
    on Hopper at one warp count and not another; this tells whether a kernel whose compiled
    result is wrong is such a case, on the GPU, without editing code (the tests and
    benchmarks/compile_triton.py launch with it too)."""
    return _warp_overrides(os.environ.get(WARPS_ENV, "")).get(kernel, default)


@functools.cache
def _warp_overrides(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in KERNELS or value not in ("1", "2", "4", "8", "16"):
            raise ValueError(
                f"{WARPS_ENV} takes kernel=warps pairs separated by commas, a kernel among "
                f"{', '.join(KERNELS)} and warps among 1, 2, 4, 8, 16; got {item!r}"
            )
        out[name] = int(value)
    return out
