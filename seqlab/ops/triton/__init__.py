"""Triton kernels behind the op signatures of seqlab.ops (GPU; CPU through TRITON_INTERPRET=1).

`use_triton` decides the backend without importing Triton; the kernels load on first use:
    chunk form      gated_linear (no gate, g [B, T, H], g [B, T, H, K]) and delta_rule
                    (no gate, g [B, T, H]): forward and backward, chunk size 16, 32 or 64
    recurrent form  one fused launch over time for both families: forward only (decode)
`seqlab.ops.triton.aot.compile_only` compiles them for a GPU target without one (resource report).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
_DEFAULT = contextvars.ContextVar("seqlab_ops_backend", default="auto")
# True inside seqlab.ops.triton.aot.compile_only: CPU tensors go to kernels that only compile
COMPILE_ONLY = contextvars.ContextVar("seqlab_triton_compile_only", default=False)
_WARNED: set[str] = set()  # fallback reasons already reported
CHUNK_SIZES = (16, 32, 64)
# The delta rule's state pass and the fused recurrent step hold all K rows of a state tile in
# one block; V is tiled everywhere, so value heads of any width run.
MAX_KEY_DIM = 256


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _on_gpu(x: torch.Tensor) -> bool:
    """Where backend="auto" picks Triton (a seam for the tests, which run on CPU)."""
    return x.is_cuda


def unsupported(form: str, chunk_size: int, q: torch.Tensor, v: torch.Tensor, needs_grad: bool):
    """Why the Triton backend cannot run this call, or None if it can."""
    if form == "parallel":
        return "it has no parallel form (use form='chunk')"
    if form == "chunk" and chunk_size not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}"
    if form == "recurrent" and needs_grad:
        return "its recurrent form is forward-only (decode); use form='chunk' for gradients"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"it takes float16, bfloat16 or float32 inputs, got {q.dtype}"
    if q.shape[-1] > MAX_KEY_DIM:
        return f"the key head dim K must be at most {MAX_KEY_DIM}, got {q.shape[-1]}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not q.is_cuda and not (_interpreting() or COMPILE_ONLY.get()):
        return "it needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return None


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        names = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    return backend


@contextlib.contextmanager
def default_backend(backend: str) -> Iterator[None]:
    """Within the block, an op called with backend="auto" (as the mixers call them) runs as if
    called with `backend`: "torch" keeps a model on PyTorch on a GPU (to compare or debug),
    "triton" runs it through the kernels (on CPU too, under TRITON_INTERPRET=1)."""
    token = _DEFAULT.set(_check_backend(backend))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def _choose(backend: str, form: str, chunk_size: int, tensors) -> tuple[bool, str | None]:
    """(run Triton?, why not where "triton" or "auto" on a GPU wanted it)."""
    if _check_backend(backend) == "auto":
        backend = _DEFAULT.get()
    q, v = tensors[0], tensors[2]
    if backend == "torch" or not (isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False, None  # the PyTorch path names the bad argument
    if backend == "auto" and not _on_gpu(q):
        return False, None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    reason = unsupported(form, chunk_size, q, v, needs_grad)
    if reason is not None and backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    return reason is None, reason


def use_triton(backend: str, form: str, chunk_size: int, tensors) -> bool:
    """ "auto": Triton for CUDA tensors when it supports the call, else PyTorch (with a warning,
    once per reason, on CUDA); "torch" and "triton" force one ("triton" raises if it cannot run
    the call). An explicit "auto" takes the `default_backend` in force."""
    triton_, reason = _choose(backend, form, chunk_size, tensors)
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"seqlab.ops: this CUDA call runs the PyTorch {form} form, not the Triton kernels, "
            f"because {reason}",
            stacklevel=3,
        )
    return triton_


def family_backend(form: str, inputs, chunk_size: int = 64, **_) -> str:
    """`OpFamily.backend` of the chunked families: `describe_backend` on their keyword inputs."""
    tensors = [inputs.get(n) for n in ("q", "k", "v", "beta", "g")]
    return describe_backend(form, chunk_size, tensors)


def describe_backend(form: str, chunk_size: int, tensors, backend: str = "auto") -> str:
    """What an op would run these tensors on: "triton", "torch", or "torch (because ...)"."""
    triton_, reason = _choose(backend, form, chunk_size, tensors)
    return "triton" if triton_ else "torch" if reason is None else f"torch (because {reason})"
