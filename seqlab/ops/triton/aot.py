"""Compile the Triton kernels for a GPU target on a machine without one, and read what each costs.

Triton ships its own ptxas and cuobjdump, so every kernel the ops launch can be compiled to a
CUDA binary here (sm_90 is the H100) exactly as the GPU would compile it. What that shows and the
interpreter cannot: that the kernel compiles at all for bfloat16 at real head dims, its
registers per thread and any spill to local memory, its shared memory (227 KiB at most per block
on sm_90), whether tl.dot became Hopper's wgmma, the resident blocks per SM those allow, and
how long compilation takes (most of a kernel's first call).

    with compile_only(arch=90) as log:
        gated_linear(q, k, v, g, backend="triton")   # CPU tensors: compiled, never launched
    for kernel in log.kernels: print(kernel.as_dict())

Inside the block every `kernel[grid](...)` compiles (once per specialisation, as on a GPU) and
returns without launching, so outputs hold whatever torch.empty gave; only shapes flow on,
backward included. The block swaps Triton's active driver and JITFunction.run process-wide: one
thread, nothing else using Triton meanwhile. Triton must not be in interpreter mode (then the
kernels are interpreted functions, not compiled ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import subprocess
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

# Per-SM limits of compute capability 9.0 (CUDA occupancy rules): registers are allocated per
# warp in units of 256, shared memory per block with 1 KiB reserved by the system.
SM_LIMITS = {
    90: dict(regs=65536, smem=233472, smem_block=232448, warps=64, blocks=32, reserved=1024),
}
SMS = {90: 132}  # SMs of the GPU taken for each target (H100 SXM)


@dataclasses.dataclass
class CompiledKernel:
    """One compiled specialisation of a kernel and what it needs on the SM."""

    name: str
    constants: dict[str, object]  # the kernel's constexpr arguments
    dtypes: str  # element types of its pointer arguments, e.g. "bf16,bf16,fp32"
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill: int  # bytes per thread of local memory and stack frame (register spills go there)
    mma: str  # "wgmma" (Hopper), "mma" (Ampere-style), "none"
    mma_transposes: int  # tl.trans of a matmul result in its accumulator layout (see below)
    compile_s: float
    arch: int
    call: str = ""  # what the caller was doing (CompileLog.call when it compiled)

    def _caps(self) -> dict[str, int]:
        """Blocks per SM that each resource allows on its own."""
        lim = SM_LIMITS[self.arch]
        warp_regs = -(-self.registers * 32 // 256) * 256
        fits = self.shared <= lim["smem_block"]
        return {
            "registers": lim["regs"] // warp_regs // self.num_warps,
            "shared": lim["smem"] // (self.shared + lim["reserved"]) if fits else 0,
            "warps": lim["warps"] // self.num_warps,
            "blocks": lim["blocks"],
        }

    @property
    def blocks_per_sm(self) -> int:
        """Blocks of this kernel resident on one SM at once (0: it cannot launch)."""
        return min(self._caps().values())

    @property
    def limited_by(self) -> str:
        """What caps blocks_per_sm: "registers", "shared", "warps" or "blocks" (the first of
        them on a tie)."""
        caps = self._caps()
        return min(caps, key=caps.get)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["constants"] = {k: str(v) for k, v in self.constants.items()}
        return d | {"blocks_per_sm": self.blocks_per_sm, "limited_by": self.limited_by}


@dataclasses.dataclass
class CompileLog:
    arch: int
    kernels: list[CompiledKernel] = dataclasses.field(default_factory=list)
    call: str = ""  # set by the caller; copied into each kernel compiled meanwhile


class _CompileOnlyDriver:
    """Enough of a Triton driver for JITFunction.run to compile for `target`. Its device key is
    new for every block, so each block compiles afresh and never meets a real device's cache."""

    blocks = itertools.count()

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"compile-only-sm{arch}-{next(self.blocks)}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        """For triton.autotune: runs (so compiles) each config and reports the same time for
        all, so every config compiles, as on a GPU's first call, and the first one is kept."""

        def bench(fn, quantiles=None, **kwargs):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    @property
    def utils(self):
        """Device properties as Triton's CUDA driver reports them, for the target's GPU."""
        lim, sms = SM_LIMITS[self.target.arch], SMS[self.target.arch]
        props = dict(max_shared_mem=lim["smem_block"], multiprocessor_count=sms)
        props |= dict(max_num_regs=lim["regs"], warpSize=32)
        return types.SimpleNamespace(get_device_properties=lambda device=None: dict(props))


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the one function in `cubin`, as cuobjdump reports."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next((x for x in out.splitlines() if "REG:" in x), None)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}


# `tt.trans` whose operand is still in a tensor-core accumulator layout (#mma, #mma1, ...):
# transposing a tl.dot result in registers. Triton 3.4 to 3.7.0 miscompiles a later tl.dot on
# such a tensor on Hopper (flash-linear-attention #640/#826 and #984; triton #6124 is the same
# pattern in 3.2), and the GPU image pins 3.6.0; the kernels go through memory instead.
MMA_TRANSPOSE = re.compile(r"tt\.trans\b[^\n]*?:\s*tensor<[^>\n]*,\s*#mma\d*>\s*->")


def mma_transposes(ttgir: str) -> int:
    """How many transposes of a tl.dot result in its accumulator layout `ttgir` holds."""
    return len(MMA_TRANSPOSE.findall(ttgir))


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "none"


def _describe(fn, constexprs, signature, kernel, seconds: float, arch: int) -> CompiledKernel:
    names = [p.name for p in fn.params]
    constants = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    pointers = ",".join(t[1:] for t in signature.values() if isinstance(t, str) and t[0] == "*")
    use = resource_usage(kernel.asm["cubin"])
    md = kernel.metadata
    return CompiledKernel(
        name=fn.__name__,
        constants=constants,
        dtypes=pointers,
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        shared=md.shared,
        registers=use["REG"],
        spill=use.get("LOCAL", 0) + use.get("STACK", 0),
        mma=_mma_kind(kernel.asm["ptx"]),
        mma_transposes=mma_transposes(kernel.asm["ttgir"]),
        compile_s=seconds,
        arch=arch,
    )


@contextlib.contextmanager
def compile_only(arch: int = 90, cache_dir: str | None = None) -> Iterator[CompileLog]:
    """Within the block the seqlab ops take CPU tensors with backend="triton" and compile each
    kernel they launch for sm_`arch` without running it; the log lists what was compiled (each
    specialisation once per block, with the time its compilation took). Triton's on-disk cache
    still serves kernels compiled before; an empty `cache_dir` (used for the block) makes every
    compilation cold, as on a fresh machine."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if arch not in SM_LIMITS:
        raise ValueError(f"arch must be one of {sorted(SM_LIMITS)}, got {arch!r}")
    from seqlab.ops.triton import COMPILE_ONLY
    from seqlab.ops.triton.chunk import chunk_fwd_h_kernel

    if not isinstance(chunk_fwd_h_kernel, JITFunction):
        raise RuntimeError(
            "compile_only needs Triton's compiler, but the kernels were defined for its "
            "interpreter (TRITON_INTERPRET=1 when seqlab.ops.triton was imported); run it in a "
            "process without TRITON_INTERPRET"
        )

    log = CompileLog(arch)
    saved_driver, run, do_compile = driver._active, JITFunction.run, JITFunction._do_compile

    def compile_run(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def timed_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        start = time.perf_counter()
        kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        seconds = time.perf_counter() - start
        described = _describe(self, constexprs, signature, kernel, seconds, arch)
        log.kernels.append(dataclasses.replace(described, call=log.call))
        return kernel

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run, JITFunction._do_compile = compile_run, timed_compile
    token = COMPILE_ONLY.set(True)
    try:
        with triton.knobs.cache.scope():
            if cache_dir is not None:
                triton.knobs.cache.dir = cache_dir
            yield log
    finally:
        COMPILE_ONLY.reset(token)
        JITFunction.run, JITFunction._do_compile = run, do_compile
        driver._active = saved_driver


FAMILIES = ("linear", "simple_gla", "gla", "delta", "gated_delta")


def inputs(
    family: str, B: int, T: int, H: int, K: int, V: int, dtype, grad: bool, beta_dtype=None
) -> dict:
    """Shapes and dtypes as the mixers pass them: q, k, v and β in dtype (β in beta_dtype if
    given), gates float32. Values do not matter: nothing runs."""
    x = {
        "q": torch.zeros(B, T, H, K, dtype=dtype),
        "k": torch.zeros(B, T, H, K, dtype=dtype),
        "v": torch.zeros(B, T, H, V, dtype=dtype),
    }
    if family == "simple_gla" or family == "gated_delta":
        x["g"] = torch.zeros(B, T, H)
    if family == "gla":
        x["g"] = torch.zeros(B, T, H, K)
    if family in ("delta", "gated_delta"):
        x["beta"] = torch.zeros(B, T, H, dtype=beta_dtype or dtype)
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def _call(family: str, x: dict, **kw):
    from seqlab.ops import delta_rule, gated_linear

    op = delta_rule if "beta" in x else gated_linear
    return op(**x, backend="triton", check_values=False, **kw)


CALLS = ("training", "packed", "prefill", "decode")


def compile_call(
    family: str, call: str, dtype, B: int, T: int, H: int, K: int, V: int, chunk_size: int = 64
) -> None:
    """Inside compile_only, make one of the calls a model makes with an op family:
    "training"  chunk form, forward and backward, no states;
    "packed"    cu_seqlens, an initial state and the final state; forward and backward;
    "prefill"   chunk form without grad, returning the final state;
    "decode"    one recurrent step from a state."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}, got {call!r}")
    if call == "training":
        x = inputs(family, B, T, H, K, V, dtype, grad=True)
        o, _ = _call(family, x, chunk_size=chunk_size)
        o.float().sum().backward()
    elif call == "packed":
        x = inputs(family, 1, B * T, H, K, V, dtype, grad=True)
        h0 = torch.zeros(B, H, K, V, requires_grad=True)
        o, s = _call(
            family, x, chunk_size=chunk_size, cu_seqlens=torch.arange(0, B * T + 1, T),
            initial_state=h0, output_final_state=True,
        )  # fmt: skip
        (o.float().sum() + s.sum()).backward()
    else:
        with torch.no_grad():
            if call == "prefill":
                x = inputs(family, B, T, H, K, V, dtype, grad=False)
                _call(family, x, chunk_size=chunk_size, output_final_state=True)
            else:
                x = inputs(family, B, 1, H, K, V, dtype, grad=False)
                h = torch.zeros(B, H, K, V)
                _call(family, x, form="recurrent", initial_state=h, output_final_state=True)
