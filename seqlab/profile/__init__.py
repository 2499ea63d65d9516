"""Cost of sequence models: analytic (params, FLOPs, state bytes) and measured (time, memory).

    from seqlab.profile import model_cost, BenchConfig, run_bench
    cost = model_cost(ModelConfig(vocab_size=256, pattern="gdn*3,attn", n_layers=4), seq_len=4096)
    result = run_bench(BenchConfig(archs=("attn", "gdn"), seq_lens=(512, 1024)))

flops: FLOPs of the ops; cost: params, FLOPs and state of mixers and models; measure: timing and
peak memory; peers: core ops and the peers they are timed against; bench: the `seqlab bench`
run; report: its tables and `write_results`; plot: its PNGs (report and plot load matplotlib, so
they are imported from their modules, not from here).
"""

from seqlab.profile.bench import BenchConfig, fit_slope, parse_seq_lens, run_bench
from seqlab.profile.cost import Cost, block_cost, channel_cost, mixer_cost, model_cost
from seqlab.profile.flops import (
    Flops,
    attention_flops,
    delta_rule_flops,
    gated_linear_flops,
    linear_flops,
)
from seqlab.profile.measure import Timing, memory_method, peak_memory, time_call

__all__ = [
    "BenchConfig",
    "Cost",
    "Flops",
    "Timing",
    "attention_flops",
    "block_cost",
    "channel_cost",
    "delta_rule_flops",
    "fit_slope",
    "gated_linear_flops",
    "linear_flops",
    "memory_method",
    "mixer_cost",
    "model_cost",
    "parse_seq_lens",
    "peak_memory",
    "run_bench",
    "time_call",
]
