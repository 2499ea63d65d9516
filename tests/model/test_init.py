"""The init policy (seqlab.init_policy) reaches every layer of a model: for every registered token
mixer and channel mixer, built in a CausalLM with a non-default init_std, n_layers and norm_eps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seqlab.channel import CHANNEL_MIXERS
from seqlab.mixers import MIXERS
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.model.pattern import LayerSpec

STD, LAYERS, EPS, D = 0.05, 6, 1e-3, 64
OUT_STD = STD / math.sqrt(2 * LAYERS)
NORMS = (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm)


def build(pattern: str, channel: str | None = None, **fields) -> CausalLM:
    torch.manual_seed(0)
    fields = {"init_std": STD, "norm_eps": EPS, **fields}
    config = ModelConfig(
        vocab_size=32, d_model=D, n_layers=LAYERS, pattern=pattern, channel=channel, **fields
    )
    return CausalLM(config)


def assert_std(name: str, w: torch.Tensor, std: float) -> None:
    # the sample std of n normal draws has relative error about 1/√(2n)
    tol = 5 / math.sqrt(2 * w.numel()) + 0.02
    got = w.detach().std().item()
    assert abs(got / std - 1) < tol, f"{name}: std {got:.4g}, want {std:.4g}"
    assert abs(w.detach().mean().item()) < 5 * std / math.sqrt(w.numel()), f"{name}: mean"


def governed(mixer) -> list[tuple[str, nn.Linear]]:
    keep = mixer.paper_init
    return [
        (name, m)
        for name, m in mixer.named_modules()
        if isinstance(m, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in keep)
    ]


MIXER_CASES = [(name, opts) for name, cls in MIXERS.items() for opts in cls.examples.values()]
MIXER_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(MIXER_CASES)]


@pytest.mark.parametrize(("name", "options"), MIXER_CASES, ids=MIXER_IDS)
def test_every_mixer_follows_the_policy(name, options):
    model = build(str(LayerSpec(name, options)))
    for block in model.blocks:
        mixer = block.mixer
        layers = dict(governed(mixer))
        assert mixer.output_proj in layers, f"{name}: no output projection {mixer.output_proj}"
        for lname, layer in layers.items():
            std = OUT_STD if lname == mixer.output_proj else STD
            assert_std(f"{name}.{lname}", layer.weight, std)
            if layer.bias is not None:
                assert not layer.bias.detach().any(), f"{name}.{lname}: bias not zero"


@pytest.mark.parametrize(("name", "options"), MIXER_CASES, ids=MIXER_IDS)
def test_every_norm_takes_norm_eps(name, options):
    model = build(str(LayerSpec(name, options)), channel="mlp")
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORMS)]
    assert len(norms) >= 2 * LAYERS + 1
    for n, m in norms:
        assert m.eps == EPS, f"{n}: eps {m.eps}"


@pytest.mark.parametrize("name", list(CHANNEL_MIXERS))
def test_every_channel_mixer_follows_the_policy(name):
    model = build("attn(num_heads=4)", channel=name)
    for block in model.blocks:
        weights = {n: p for n, p in block.channel.named_parameters() if p.dim() >= 2}
        assert weights
        for n, w in weights.items():
            if n.endswith("const_value"):  # MoE++'s constant vectors: unit scale (paper init)
                continue
            assert_std(f"{name}.{n}", w, OUT_STD if "w_out" in n else STD)


def test_a_pattern_option_overrides_one_layer():
    model = build(
        "gdn(init_std=0.01, norm_eps=1e-6),attn(num_heads=4)", channel="mlp(init_std=0.1)"
    )
    gdn, attn = model.blocks[0].mixer, model.blocks[1].mixer
    assert_std("gdn.qkv_proj", gdn.qkv_proj.weight, 0.01)
    assert_std("gdn.o_proj", gdn.o_proj.weight, 0.01 / math.sqrt(2 * LAYERS))
    assert gdn.o_norm.norm.eps == 1e-6 and model.blocks[0].mixer_norm.eps == EPS
    assert_std("attn.q_proj", attn.q_proj.weight, STD)
    assert_std("mlp.w_in", model.blocks[1].channel.w_in.weight, 0.1)
    assert_std("mlp.w_out", model.blocks[1].channel.w_out.weight, 0.1 / math.sqrt(2 * LAYERS))


def test_paper_inits_are_kept():
    """Mamba's Δ projection and A, S4D's A stay as their papers give them whatever init_std."""
    mamba = build("mamba").blocks[0].mixer
    R = mamba.dt_rank
    assert mamba.dt_proj.weight.abs().max() <= R**-0.5
    assert mamba.dt_proj.weight.std() > 2 * STD  # uniform ±R^-1/2, not N(0, σ²)
    dt = nn.functional.softplus(mamba.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    N = mamba.config.d_state
    torch.testing.assert_close(mamba.A_log[0].exp(), torch.arange(1.0, N + 1))
    s4d = build("s4d").blocks[0].mixer
    assert torch.equal(s4d.A_log_re.exp(), torch.full_like(s4d.A_log_re, 0.5))
