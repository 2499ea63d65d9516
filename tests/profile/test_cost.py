"""Analytic cost of mixers and models against the real thing: parameters against the modules,
matmul FLOPs against FlopCounterMode (prefill in the chunk form, then one decode step), state bytes
against the tensors a model holds after prefill.

Attention is counted causally (the visible pairs); the counter sees SDPA's dense score matrix, so
the comparison adds the difference, `attention_flops(causal=False) − attention_flops()`.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import MIXERS, Attention, build_mixer
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.profile.cost import memory_bytes, meta_model, mixer_cost, model_cost
from seqlab.profile.flops import attention_flops
from seqlab.profile.peers import OpSpec, op_spec
from tests.mixers.conftest import CASES
from tests.profile.conftest import count_flops

D, B, VOCAB = 32, 2, 37
MIXER_CASES = CASES  # the examples each registered mixer declares
CHANNELS = [
    "swiglu",
    "mlp",
    None,
    "swiglu(bias=True)",
    "mlp(bias=True, expand=2)",
    "moe(num_experts=4, top_k=2)",
    "moe(num_experts=3, top_k=1, shared_expert=True, expert_type='mlp')",
]


def dense_attention_correction(mixer, T: int, decode: bool) -> int:
    """What the counter adds to the causal count: SDPA's masked-out score entries."""
    if not isinstance(mixer, Attention):
        return 0
    H, d, w = mixer.num_heads, mixer.head_dim, mixer.config.window
    cached = 0
    if decode:
        cached = T if w is None else min(T, w - 1)
    n = 1 if decode else T
    dense = attention_flops(n, H, d, d, cached, w, causal=False)
    return (dense.matmul - attention_flops(n, H, d, d, cached, w).matmul) * B


def model_correction(model: CausalLM, T: int, decode: bool) -> int:
    return sum(dense_attention_correction(b.mixer, T, decode) for b in model.blocks)


@pytest.mark.parametrize("T", [1, 23, 40])
@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_cost_matches_the_module_and_the_counter(case, T):
    name, options = MIXER_CASES[case]
    mixer = build_mixer(name, D, **options)
    cost = mixer_cost(mixer, T)
    x, x_next = torch.randn(B, T, D), torch.randn(B, 1, D)
    with torch.no_grad():
        _, state = mixer(x)
        _, state_one = mixer(x[:1])
    # One sequence is exact; a batch shares the work on the parameters alone (an LTI or
    # implicit filter), so B sequences count at most B times one.
    for decode, one, batch, per_seq in (
        (False, lambda: mixer(x[:1]), lambda: mixer(x), cost.prefill.matmul),
        (
            True,
            lambda: mixer(x_next[:1], state_one),
            lambda: mixer(x_next, state),
            cost.decode.matmul,
        ),
    ):
        corr = dense_attention_correction(mixer, T, decode)
        counted_one = count_flops(one)
        assert counted_one == per_seq + corr // B
        assert counted_one <= count_flops(batch) <= B * per_seq + corr
    assert cost.state_bytes * B == mixer.state_bytes(state)


PATTERNS = ["attn", "gdn*3,attn", "gla,attn(window=4)", "mamba2,deltanet", "retnet,linear_attn"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("channel", CHANNELS)
def test_model_params_match_num_params(pattern, channel):
    for tie in (True, False):
        config = ModelConfig(
            vocab_size=VOCAB,
            d_model=D,
            n_layers=4,
            pattern=pattern,
            channel=channel,
            tie_embeddings=tie,
        )
        model = CausalLM(config)
        assert model_cost(model, 8).params == model.num_params()
        assert model_cost(config, 8).params == model.num_params()  # built on the meta device


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("channel", ["swiglu", None, CHANNELS[-1]])
def test_model_flops_match_the_counter(pattern, channel):
    T = 29
    model = CausalLM(
        ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=4, pattern=pattern, channel=channel)
    )
    ids = torch.randint(0, VOCAB, (B, T + 1))
    with torch.no_grad():
        state = model(ids[:, :T]).state
    cost = model_cost(model, T)
    prefill = count_flops(lambda: model(ids[:, :T]))
    decode = count_flops(lambda: model(ids[:, T:], state))
    assert prefill == B * cost.prefill.matmul + model_correction(model, T, False)
    assert decode == B * cost.decode.matmul + model_correction(model, T, True)


def test_moe_with_zero_computation_experts_is_an_upper_bound():
    """Tokens routed to zero / copy / constant slots skip their FFN expert."""
    channel = "moe(num_experts=2, top_k=2, num_zero=1, num_copy=1, num_constant=1)"
    model = CausalLM(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=2, channel=channel))
    T = 64
    counted = count_flops(lambda: model(torch.randint(0, VOCAB, (B, T))))
    assert model.num_params() == model_cost(model, T).params
    assert counted <= B * model_cost(model, T).prefill.matmul + model_correction(model, T, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("pattern", [*PATTERNS, "attn(window=8, num_kv_heads=2)"])
def test_state_bytes_match_the_tensors_after_prefill(pattern, T, dtype):
    config = ModelConfig(
        vocab_size=VOCAB, d_model=D, n_layers=2 * (pattern.count(",") + 1), pattern=pattern
    )
    model = CausalLM(config).to(dtype)
    with torch.no_grad():
        state = model(torch.randint(0, VOCAB, (B, T))).state
    held = CausalLM.state_bytes(state)
    assert model_cost(model, T).state_bytes * B == held
    assert model_cost(config, T, dtype=dtype).state_bytes * B == held


def test_state_grows_with_T_only_for_attention():
    def state(pattern: str, T: int) -> int:
        config = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=4, pattern=pattern)
        return model_cost(config, T).state_bytes

    assert state("gdn", 64) == state("gdn", 65536)
    assert state("attn(window=16)", 64) == state("attn(window=16)", 65536)
    # K and V of D floats per token and layer, plus an int64 position per layer
    assert state("attn", 2048) - state("attn", 1024) == 1024 * 4 * 2 * D * 4


def test_meta_model_costs_a_large_config_without_memory():
    config = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, pattern="gdn*3,attn")
    model = meta_model(config, torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    cost = model_cost(config, 32768, dtype=torch.bfloat16)
    assert cost.params == model.num_params() > 5e9
    assert cost.state_bytes == model.state_bytes_for(1, 32768)


def test_bad_arguments():
    config = ModelConfig(vocab_size=VOCAB, pattern="attn")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        model_cost(config, 0)
    with pytest.raises(ValueError, match="dtype applies to a ModelConfig"):
        model_cost(CausalLM(config), 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="Identity is not a TokenMixer"):
        mixer_cost(torch.nn.Identity(), 4)


def test_memory_prediction_grows_as_the_passes_do():
    """The bench's memory guard: linear in T for recurrent mixers and fused attention, quadratic
    where a T × T tensor is formed (a windowed mask; SDPA's math path when K ≠ V)."""

    def growth(arch: str) -> float:
        config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, pattern=arch)
        a, b = memory_bytes(config, 8192), memory_bytes(config, 16384)
        assert a["forward"] < a["forward_backward"] and a["forward"] < a["decode"]
        return b["forward_backward"] / a["forward_backward"]

    assert 1.9 < growth("gdn") < 2.1 and 1.9 < growth("attn") < 2.1
    assert growth("attn(window=64)") > 3.5
    spec = OpSpec.make("delta_rule", "gated", 1, {"K": 192, "V": 384}, {"chunk_size": 64})
    seqlab = [spec.memory_bytes(T, 1, 4)["forward_backward"] for T in (8192, 16384)]
    sdpa = [spec.memory_bytes(T, 1, 4, "sdpa")["forward_backward"] for T in (8192, 16384)]
    assert seqlab[1] / seqlab[0] < 2.1 and sdpa[1] / sdpa[0] > 3.5


@pytest.mark.parametrize("name", list(MIXERS))
def test_every_mixers_core_op_has_a_memory_prediction_above_its_peak(name):
    """The op-level memory guard holds for every family: the prediction, from the family's
    workspace_bytes (or its default), bounds the peak measured on CPU at a modest length."""
    from seqlab.profile.measure import peak_memory

    spec = op_spec(build_mixer(name, 64))
    T = 2048
    x = spec.make_inputs(1, T, torch.float32, torch.device("cpu"), torch.Generator())
    run = spec.seqlab()
    predicted = spec.memory_bytes(T, 1, 4)
    assert 0 < predicted["forward"] <= predicted["forward_backward"]

    def forward():
        with torch.no_grad():
            run(x)

    # RSS high-water marks only ever read high (allocator arenas the process grew earlier: the
    # dplr forward read 61, 104 and 61 MB in three calls in one process), so the least of three
    peaks = [peak_memory(forward, torch.device("cpu")) for _ in range(3)]
    if None not in peaks:
        assert min(peaks) <= predicted["forward"], (spec.name, peaks, predicted)
