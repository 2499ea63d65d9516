"""Op families, each declared once: `register_family(OpFamily(...))` at the end of its module.

    fam = family("delta_rule")
    x = fam.make_inputs("gated", B=2, T=100, H=3, dtype=torch.float64)   # the forms' kwargs
    o, S = fam.forms["chunk"](**x, output_final_state=True)
    ref, S_ref = fam.forms[fam.reference](**x, output_final_state=True)
    fam.flops("gated", "chunk", T=100, H=3, **fam.dims)                 # one sequence

The shared suites (op equivalence, FLOPs against torch's counter, `seqlab ops`, the op level of
`seqlab bench`, the CPU peer benchmark) iterate `FAMILIES` and skip what a family does not
claim. A new family is one module in seqlab/ops and one line in `FAMILY_MODULES`.

Form names: "recurrent" (a loop over time, the decode step; every family with a state has it),
"chunk" (chunkwise parallel), "parallel" (the full T × T form), "scan" (a parallel scan),
"fft" (a long convolution by FFT), "direct" (a long convolution summed term by term),
"fused" (the recurrence in one fused call: PyTorch's fused RNN kernels, or one autograd node
whose forward loops in place and whose backward is the adjoint loop).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# The modules that register a family, imported on first use of the registry.
FAMILY_MODULES = (
    "seqlab.ops.attention",
    "seqlab.ops.gated_linear",
    "seqlab.ops.delta_rule",
    "seqlab.ops.lti",
    "seqlab.ops.hyena",
    "seqlab.ops.selective_scan",
    "seqlab.ops.mlstm",
    "seqlab.ops.slstm",
    "seqlab.ops.rnn",
    "seqlab.ops.dplr",
)

FORMS = ("recurrent", "chunk", "parallel", "scan", "fft", "direct", "fused")


@dataclass(frozen=True)
class Flops:
    """`matmul`: work in matrix products (mm, bmm, SDPA, convolution), what torch's
    FlopCounterMode counts; `other`: the work it does not see (solves, FFTs, scans, elementwise
    state updates). A multiply-add is 2 FLOPs."""

    matmul: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.other

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.other + other.other)

    def __mul__(self, n: int) -> Flops:
        return Flops(self.matmul * n, self.other * n)

    __rmul__ = __mul__


@dataclass(frozen=True)
class OpFamily:
    """One op family.

    forms: form name → fn(**inputs, initial_state=None, output_final_state=False) → (o, state)
        (stateless families: fn(**inputs) → (o, None)); `reference` names the one the others are
        held to (in float64).
    variants: what the family computes in more than one way (e.g. no gate, a per-head gate, a
        per-channel gate); every callable below takes the variant first.
    make_inputs(variant, B, T, H, dtype=float32, generator=None, **dims) → the forms' keyword
        inputs, valid by construction (realistic gates: strong decays included).
    dims: per-head sizes for tests and benchmarks, e.g. {"K": 64, "V": 64}; make_inputs, flops
        and state_bytes take them as keywords.
    flops(variant, form, T, H, **dims) → Flops of one sequence of T tokens in that form, its final
        state included (work on the parameters alone, such as an LTI kernel, included too: a
        batch of B sequences does it once, so B × flops is an upper bound there).
    state_bytes(variant, T, H, **dims) → bytes of the final state of one sequence, float32.
    fast: the form a model trains with and the benchmarks time.
    packed: the forms take `cu_seqlens` (variable-length sequences packed in a batch of one).
    peers: peer name → loader; the loader returns fn(**inputs) → o, or None where the peer is
        not installed or cannot run here (peers are optional extras; a peer needing CUDA
        returns None without a CUDA device).
    workspace_bytes(variant, form, T, H, grad, **dims, **options) → bytes a form (or a peer, by
        its name) holds at once beyond its inputs, output and their float32 copies, on one
        sequence of T tokens; with `grad`, what it keeps for the backward pass. A coarse bound
        for `seqlab bench`'s memory guard. None (the default): four states per token
        (4 · T · state_bytes), what a form that materialises every step's state holds, a
        generous bound; declare a formula for a tighter one.
    backend(form, inputs, **options) → what the form runs these inputs on ("torch", "triton",
        "sdpa", "torch (because ...)"); None (the default): "torch".
    targets: the speed-ups the fast form is held to by benchmarks/bench_families.py, as ratios of
        times (other / fast): "recurrent" → the slow form's forward+backward time at the shorter
        length over the fast form's (default 10: a chunk form beats its loop); "peer:NAME" → that
        peer's time over the fast form's in every pass measured (2.0: at most half the peer's
        time; 1/1.2: within 1.2x of it). A family whose fast form is itself a loop (an LSTM) has
        no "recurrent" target; FFT forms are also held to 20x at the longer length.
    """

    name: str
    forms: Mapping[str, Callable]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    flops: Callable[..., Flops]
    state_bytes: Callable[..., int]
    dims: Mapping[str, int]
    reference: str = "recurrent"
    variants: tuple[str, ...] = ("default",)
    fast: str = "chunk"
    stateful: bool = True
    packed: bool = False
    peers: Mapping[str, Callable[[], Callable | None]] = field(default_factory=dict)
    workspace_bytes: Callable[..., int] | None = None
    backend: Callable[..., str] | None = None
    targets: Mapping[str, float] = field(default_factory=lambda: {"recurrent": 10.0})
    doc: str = ""

    def __post_init__(self):
        unknown = set(self.forms) - set(FORMS)
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown forms {sorted(unknown)}; use {FORMS}")
        known = {"recurrent"} | {f"peer:{p}" for p in self.peers}
        for key, ratio in self.targets.items():
            if key not in known or not ratio > 0:
                raise ValueError(
                    f"family {self.name!r}: target {key!r}: {ratio!r} must name one of "
                    f"{sorted(known)} with a positive ratio"
                )
        for role, form in (("reference", self.reference), ("fast", self.fast)):
            if form not in self.forms:
                raise ValueError(
                    f"family {self.name!r}: {role} form {form!r} is not one of its forms "
                    f"{', '.join(self.forms)}"
                )

    def check_variant(self, variant: str) -> str:
        if variant not in self.variants:
            valid = ", ".join(self.variants)
            raise ValueError(f"family {self.name!r} has no variant {variant!r}; valid: {valid}")
        return variant

    def workspace(self, variant: str, form: str, T: int, H: int, grad: bool, **kw) -> int:
        """`workspace_bytes`, or its default: four states per token (dims and options in `kw`
        that a callable does not take are left out)."""
        if self.workspace_bytes is not None:
            return call_with(self.workspace_bytes, variant, form, T, H, grad, **kw)
        if not self.stateful:
            return 0
        return 4 * T * call_with(self.state_bytes, variant, T, H, **kw)

    def describe_backend(self, form: str, inputs: Mapping, **options) -> str:
        if self.backend is None:
            return "torch"
        return call_with(self.backend, form, inputs, **options)


def call_with(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) without the keywords fn does not take (all of them where it takes
    **kwargs): dims and options meant for some forms reach each callable that knows them."""
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return fn(*args, **kwargs)


_FAMILIES: dict[str, OpFamily] = {}
_loaded = False


def register_family(fam: OpFamily) -> OpFamily:
    if fam.name in _FAMILIES and _FAMILIES[fam.name] is not fam:
        raise ValueError(f"op family {fam.name!r} is registered twice")
    _FAMILIES[fam.name] = fam
    return fam


def families() -> dict[str, OpFamily]:
    """Every registered family by name, in the order they registered."""
    global _loaded
    if not _loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True
    return dict(_FAMILIES)


def family(name: str) -> OpFamily:
    fams = families()
    if name not in fams:
        raise ValueError(f"unknown op family {name!r}; valid: {', '.join(fams)}")
    return fams[name]
