"""Parallelism over the sequence: LASP-2 for the chunked recurrences and attention (lasp2),
and a launcher of local gloo process groups (spawn)."""

from seqlab.parallel.lasp2 import (
    CommLog,
    gather_combine,
    lasp2_attention,
    lasp2_delta_rule,
    lasp2_gated_linear,
    previous_tail,
)
from seqlab.parallel.model import (
    local_slice,
    refuse_unsplittable,
    split_sequence,
    whole_sequence,
)
from seqlab.parallel.spawn import run_group

__all__ = [
    "CommLog",
    "gather_combine",
    "lasp2_attention",
    "lasp2_delta_rule",
    "lasp2_gated_linear",
    "local_slice",
    "previous_tail",
    "refuse_unsplittable",
    "run_group",
    "split_sequence",
    "whole_sequence",
]
