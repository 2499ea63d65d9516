"""The registry and the configs: names, keys and sizes are checked at the boundary.

Run: .venv/bin/python -m pytest tests/channel/test_registry.py -q
"""

from __future__ import annotations

import pytest
import torch

from seqlab.channel import CHANNEL_MIXERS, MLP, MoE, SwiGLU, build_channel_mixer


def test_registry_builds_every_mixer():
    assert CHANNEL_MIXERS == {"mlp": MLP, "swiglu": SwiGLU, "moe": MoE}
    for name, cls in CHANNEL_MIXERS.items():
        mixer = build_channel_mixer(name, 8)
        assert type(mixer) is cls and mixer.d_model == 8
        y, aux = mixer(torch.randn(1, 3, 8))
        assert y.shape == (1, 3, 8) and aux.shape == ()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'conv'.*valid names are: mlp, swiglu, moe"):
        build_channel_mixer("conv", 8)


@pytest.mark.parametrize(
    ("name", "key", "listed"),
    [("mlp", "hidden", "expand"), ("swiglu", "expand", "multiple_of"), ("moe", "topk", "top_k")],
)
def test_unknown_key_lists_valid_keys(name, key, listed):
    with pytest.raises(
        ValueError, match=rf"unknown option\(s\) {key}; valid options are: .*{listed}"
    ):
        build_channel_mixer(name, 8, **{key: 1})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 3, "num_experts": 2}, "top_k=3 exceeds the 2 router slots"),
        ({"top_k": 4, "num_experts": 2, "num_zero": 1}, "top_k=4 exceeds the 3 router slots"),
        ({"num_experts": 0}, "num_experts: Input should be greater than 0"),
        ({"top_k": 0}, "top_k: Input should be greater than 0"),
        ({"expert_hidden": -4}, "expert_hidden: Input should be greater than 0"),
        ({"num_zero": -1}, "num_zero: Input should be greater than or equal to 0"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef: Input should be greater than or equal to 0"),
        ({"router_jitter": 1.0}, "router_jitter: Input should be less than 1"),
        ({"expert_type": "relu"}, "expert_type: Input should be 'swiglu' or 'mlp'"),
        ({"init_std": 0.0}, "init_std: Input should be greater than 0"),
    ],
)
def test_bad_moe_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_channel_mixer("moe", 8, **options)


def test_zero_compute_slots_count_towards_top_k():
    moe = build_channel_mixer("moe", 8, num_experts=2, num_copy=1, top_k=3)
    assert moe.num_slots == 3


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mlp", {"expand": 0}, "expand: Input should be greater than 0"),
        ("swiglu", {"hidden": 0}, "hidden: Input should be greater than 0"),
        ("swiglu", {"multiple_of": -16}, "multiple_of: Input should be greater than 0"),
        ("mlp", {"out_init_std": -1.0}, "out_init_std: Input should be greater than 0"),
    ],
)
def test_bad_dense_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_channel_mixer(name, 8, **options)


@pytest.mark.parametrize("d_model", [0, -8, 8.0, True])
def test_bad_d_model(d_model):
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        build_channel_mixer("swiglu", d_model)


def test_wrong_config_type():
    with pytest.raises(TypeError, match="MoE takes a MoEConfig, got MLPConfig"):
        MoE(8, MLP.Config())


def test_configs_are_frozen():
    config = MoE.Config.make(num_experts=4)
    with pytest.raises(ValueError):
        config.num_experts = 8  # type: ignore[misc]
