"""The one interface every token mixer implements.

    y, state = mixer(x, state=None)      # x [B, T, D] → y [B, T, D]
    state = mixer.init_state(batch_size) # what a stream starts from
    mixer.state_bytes(state)             # bytes of the tensors the state really holds

A state is a dict of tensors and cache objects (an object that grows, such as attention's
`KVCache`, says which tensors it holds through `tensors()`; nothing is stored on a tensor).
`forward` with T > 1 runs the parallel/chunk form (training, prefill);
with T = 1 and a state it runs the recurrent step (decode). Both return the state after x.

What the shared suites (tests/mixers, seqlab.profile) read from a mixer, declared on its class:
`core_op` (the op family in seqlab.ops.registry that forward runs), `state_grows` (its state
grows with T: a KV cache, a cache of inputs), `examples` (small option sets, by id, that the
conformance suite builds at d_model 32), `flops(T)` (its FLOPs per token and in the core op) and
`op_call()` (how the op level of `seqlab bench` calls its core op). Parameters are counted from
the module itself.

A mixer that reads what an earlier layer of the same model computed on the same tokens declares
`takes_context = True`: `CausalLM.forward` makes one dict per call and each such mixer gets it as
`forward(x, state, context=context)` (RWKV-7's value residual: the first rwkv7 layer stores its v,
the later ones read it). The context holds tensors of the current call only, never state: prefill
plus decode still equals one pass. Called alone, such a mixer gets no context (None).

Initialisation follows seqlab.init_policy, applied once the mixer is built (a subclass adds
layers after its parent's __init__): every nn.Linear N(0, init_std²) with zero bias, the one named
`output_proj` N(0, out_init_std²); the Linear layers under the names in `paper_init`, and every
parameter that is not a Linear, keep the init the mixer gives them. Every norm inside a mixer
takes `config.norm_eps`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from pydantic import PositiveFloat
from torch import nn

from seqlab.config import check_positive_int
from seqlab.init_policy import NORM_EPS, InitOptions, init_linears
from seqlab.ops.registry import Flops


class Cache(Protocol):
    """A state entry that is not one tensor: a cache with room to grow."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of what it holds (not its room), by name."""
        ...

    def copy(self) -> Cache:
        """The same contents in memory of its own."""
        ...


State = dict[str, "torch.Tensor | Cache"]


def state_tensors(state: State) -> dict[str, torch.Tensor]:
    """The tensors a state holds, a cache's under "name.part" (its contents, not its room)."""
    out = {}
    for name, x in state.items():
        if isinstance(x, torch.Tensor):
            out[name] = x
        else:
            out |= {f"{name}.{part}": t for part, t in x.tensors().items()}
    return out


def copy_state(state: State) -> State:
    """A state that shares no memory with `state` (beam search, two continuations)."""
    return {
        name: x.clone() if isinstance(x, torch.Tensor) else x.copy() for name, x in state.items()
    }


class LayerFlops(NamedTuple):
    """FLOPs of one mixer on one sequence (seqlab.ops.registry.Flops)."""

    per_token: Flops  # projections, short convs, feature maps: the same for every token
    prefill: Flops  # the core op over T tokens, in the form forward runs for them
    decode: Flops  # the core op's step for one more token at context T


class OpCall(NamedTuple):
    """The core op as this mixer calls it: family variant, heads, per-head dims, and options
    passed to the forms (chunk_size, window, scale, ...)."""

    variant: str
    H: int
    dims: dict[str, int]
    options: dict[str, Any]


class MixerConfig(InitOptions):
    """Options shared by every token mixer's config (each mixer subclasses it): the init policy's
    init_std, out_init_std, and the eps of the norms inside the mixer."""

    norm_eps: PositiveFloat = NORM_EPS


class _InitOnceBuilt(type):
    """Applies the init policy after the outermost __init__, so that it sees every layer."""

    def __call__(cls, *args: Any, **kwargs: Any):
        mixer = super().__call__(*args, **kwargs)
        mixer.reset_linears()
        return mixer


class TokenMixer(nn.Module, metaclass=_InitOnceBuilt):
    """Subclasses set `Config`, take (d_model, config) and implement the three calls."""

    Config: ClassVar[type[MixerConfig]] = MixerConfig
    core_op: ClassVar[str]
    output_proj: ClassVar[str] = "o_proj"  # the Linear that writes into the residual stream
    paper_init: ClassVar[tuple[str, ...]] = ()  # submodules whose Linear layers keep their init
    state_grows: ClassVar[bool] = False
    takes_context: ClassVar[bool] = False  # forward(x, state, context=...) in a model
    examples: ClassVar[dict[str, dict[str, Any]]] = {}
    # Sequence parallelism (seqlab.parallel.split_sequence): a mixer whose forward can run on
    # one rank's slice of T declares `sequence_parallel`; `sequence_group` is then the process
    # group T is split over (None: the whole sequence is here).
    sequence_parallel: ClassVar[bool] = False
    sequence_group: Any = None

    def __init__(self, d_model: int, config: MixerConfig | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.config = self.Config.for_component(type(self), config)

    def reset_linears(self) -> None:
        c = self.config
        init_linears(self, c.init_std, c.output_std, self.output_proj, self.paper_init)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def init_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def sequence_split(self, state: State | None) -> Any:
        """The process group this forward's T is split over, or None. A split sequence starts
        from nothing: each rank gets the state entering its slice from the others."""
        if self.sequence_group is not None and state is not None:
            raise ValueError(
                f"{type(self).__name__} runs on a slice of the sequence (sequence_group is set) "
                "and takes no state: pass state=None"
            )
        return self.sequence_group

    @staticmethod
    def state_bytes(state: State) -> int:
        return sum(t.numel() * t.element_size() for t in state_tensors(state).values())

    def state_bytes_for(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the state after `seq_len` tokens. Mixers whose state grows override this."""
        return self.state_bytes(self.init_state(batch_size))

    def flops(self, T: int) -> LayerFlops:
        raise NotImplementedError(f"{type(self).__name__} declares no flops(T)")

    def projection_flops(self) -> Flops:
        """Per token: 2 FLOPs per weight of every Linear and Conv1d in the mixer (a projection,
        a depthwise short conv); bias adds are not counted."""
        kinds = (nn.Linear, nn.Conv1d)
        return Flops(2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, kinds)))

    def op_call(self) -> OpCall:
        raise NotImplementedError(f"{type(self).__name__} declares no op_call()")

    def core_bytes(self, T: int, grad: bool) -> int:
        """Bytes the core op holds at once beyond its inputs on one sequence of T tokens (kept
        for the backward pass with `grad`): a coarse bound for `seqlab bench`'s memory guard."""
        return 0
