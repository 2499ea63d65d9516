"""Op-level cases: the core op of each mixer at its shapes, and the peers it is timed against.

    spec = op_spec(mixer)                          # e.g. delta_rule/gated H=6 K=256 V=512 ...
    impls = implementations(spec, peers_available(device))
    inputs = make_inputs(spec, B, T, dtype, device, generator)
    o = impls["seqlab"](inputs)                    # and impls[peer] for each available peer

Everything comes from the op-family registry (seqlab.ops.registry): the spec is the mixer's
`core_op` family with its `op_call()` (variant, heads, per-head dims, options); the inputs are the
family's `make_inputs` (realistic gates); seqlab's implementation is the family's fast form,
called with the options as the mixer calls it (no value checks, which would sync); the peers are
the family's `peers`, each timed where its loader finds it installed and runnable here (fla's
Triton kernels need CUDA; on CPU they are reported unavailable, never imported). The predicted
memory adds the family's `workspace_bytes` to the inputs, output and their float32 copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from seqlab.mixers.base import TokenMixer
from seqlab.ops.registry import Flops, OpFamily, call_with, families, family

Inputs = dict[str, Tensor]


def _items(d: dict) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(d.items()))


@dataclass(frozen=True)
class OpSpec:
    """A family's op at one call's shapes: variant, heads H, per-head dims and the options the
    forms are called with (chunk_size, scale, window, ...), as sorted (name, value) pairs so
    equal calls are one spec."""

    family: str
    variant: str
    heads: int
    dims: tuple[tuple[str, int], ...]
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def make(cls, family: str, variant: str, H: int, dims: dict, options: dict) -> OpSpec:
        return cls(family, variant, H, _items(dims), _items(options))

    @property
    def fam(self) -> OpFamily:
        return family(self.family)

    @cached_property
    def kwargs(self) -> dict[str, object]:
        """The dims and options, as the family's callables take them."""
        return {**dict(self.dims), **dict(self.options)}

    @property
    def name(self) -> str:
        fam = self.fam
        head = fam.name + (f"/{self.variant}" if len(fam.variants) > 1 else "")
        parts = [head, f"H={self.heads}"]
        parts += [f"{k}={v}" for k, v in self.dims]
        parts += [f"{_short(k)}={v}" for k, v in self.options]
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "variant": self.variant,
            "H": self.heads,
            "dims": dict(self.dims),
            "options": dict(self.options),
            "form": self.fam.fast,
        }

    def flops(self, T: int) -> Flops:
        """Forward FLOPs of the fast form on one sequence of T tokens."""
        fam = self.fam
        return call_with(fam.flops, self.variant, fam.fast, T, self.heads, **self.kwargs)

    def memory_bytes(
        self, T: int, batch_size: int, element_size: int, impl: str = "seqlab"
    ) -> dict[str, int]:
        """Predicted peak bytes of the op's inputs (made in float32, then cast), its output, their
        float32 copies and the family's workspace for `impl` (the fast form, or a peer by name)
        on a batch, "forward" and "forward_backward": a coarse bound, like
        seqlab.profile.cost.memory_bytes, to skip a length before its inputs are made."""
        fam = self.fam
        fixed, per_token = self._io_bytes
        io = batch_size * (fixed + per_token * T)  # float32 inputs and output
        made = io * (4 + element_size) // 4
        form = fam.fast if impl == "seqlab" else impl
        work = {
            grad: batch_size * fam.workspace(self.variant, form, T, self.heads, grad, **self.kwargs)
            for grad in (False, True)
        }
        forward = made + io + work[False]
        backward = 2 * made + 3 * io + work[True]
        return {"forward": int(1.25 * forward), "forward_backward": int(1.25 * backward)}

    @cached_property
    def _io_bytes(self) -> tuple[int, int]:
        """(bytes that do not grow with T, bytes per token) of one sequence's float32 inputs and
        output, from the fast form run at T = 1 and T = 2 (parameters sized by T, such as a
        long filter, count as per token)."""
        sizes = []
        for T in (1, 2):
            x = self.make_inputs(1, T, torch.float32, torch.device("cpu"), torch.Generator())
            o = self.seqlab()(x)
            sizes.append(sum(_nbytes(t) for t in (*x.values(), o)))
        return 2 * sizes[0] - sizes[1], sizes[1] - sizes[0]

    def make_inputs(
        self, B: int, T: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
    ) -> Inputs:
        x = self.fam.make_inputs(
            self.variant, B, T, self.heads, dtype=dtype, generator=gen, **dict(self.dims)
        )
        return {n: t.to(device) if torch.is_tensor(t) else t for n, t in x.items()}

    def seqlab(self) -> Callable[[Inputs], Tensor]:
        """The fast form with the options, as mixers call it: no value checks where it has them
        (they read gates back to the host)."""
        fn = self.fam.forms[self.fam.fast]
        options = {**dict(self.options), "check_values": False}

        def run(x: Inputs) -> Tensor:
            return call_with(fn, **x, **options)[0]

        return run

    def backend(self, x: Inputs) -> str:
        """What seqlab's fast form runs these inputs on (its backend="auto" choice)."""
        return self.fam.describe_backend(self.fam.fast, x, **dict(self.options))


def _short(option: str) -> str:
    return {"chunk_size": "C"}.get(option, option)


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def op_spec(mixer: TokenMixer) -> OpSpec:
    """The core op a mixer runs, at the mixer's shapes (its `core_op` and `op_call()`)."""
    call = mixer.op_call()
    fam = family(mixer.core_op)
    fam.check_variant(call.variant)
    return OpSpec.make(fam.name, call.variant, call.H, call.dims, call.options)


def peer_names() -> list[str]:
    """Every peer any registered family declares, in registration order."""
    names: list[str] = []
    for fam in families().values():
        names += [p for p in fam.peers if p not in names]
    return names


def peers_available(device: torch.device, specs: list[OpSpec] | None = None) -> dict[str, str]:
    """Each peer of these specs' families (default: of every family) → what it is, or why it is
    not in this run (the text starts 'unavailable')."""
    fams = families().values() if specs is None else [s.fam for s in specs]
    peers: dict[str, str] = {}
    for fam in fams:
        for name, loader in fam.peers.items():
            if name in peers and not peers[name].startswith("unavailable"):
                continue
            fn = loader()
            if fn is None:
                peers[name] = f"unavailable: not installed or not runnable here (for {fam.name})"
            else:
                doc = (loader.__doc__ or name).strip().split("\n")[0]
                peers[name] = doc
    return peers


def implementations(spec: OpSpec, peers: dict[str, str]) -> dict[str, Callable[[Inputs], Tensor]]:
    """ "seqlab" and each available peer of the spec's family, all on the same inputs."""
    impls = {"seqlab": spec.seqlab()}
    for name, loader in spec.fam.peers.items():
        if peers.get(name, "unavailable").startswith("unavailable"):
            continue
        fn = loader()
        if fn is not None:
            impls[name] = _peer(fn)
    return impls


def _peer(fn: Callable) -> Callable[[Inputs], Tensor]:
    return lambda x: fn(**x)
