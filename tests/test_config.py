"""Configs take values of their declared types only: no True for an int, no 'yes' or 1 for a
bool, no text for a number (issue 14, item 5); lists still fill tuple fields (TOML, JSON and
pattern options give lists).

Run: .venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import pytest

from seqlab.mixers import build_mixer
from seqlab.model.lm import ModelConfig
from seqlab.profile.bench import BenchConfig
from seqlab.tasks import build_task
from seqlab.train.trainer import TrainConfig


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (TrainConfig, {"steps": True}),
        (TrainConfig, {"steps": "5"}),
        (TrainConfig, {"steps": 5.0}),
        (TrainConfig, {"progress": "yes"}),
        (TrainConfig, {"progress": 1}),
        (TrainConfig, {"lr": "0.1"}),
        (ModelConfig, {"vocab_size": 8, "tie_embeddings": "no"}),
        (ModelConfig, {"vocab_size": True}),
        (BenchConfig, {"repeats": True}),
    ],
)
def test_no_coercion_into_ints_bools_or_numbers(cls, options):
    with pytest.raises(ValueError, match=list(options)[-1]):
        cls.make(**options)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_option_takes_nan_or_inf(value):
    """Every config refuses non-finite floats: ModelConfig(init_std=inf) built non-finite
    weights, mlstm(proj_factor=inf) and mom(expand_v=inf) overflowed inside the mixer."""
    with pytest.raises(ValueError, match="init_std.*finite"):
        ModelConfig.make(vocab_size=8, init_std=value)
    with pytest.raises(ValueError, match="proj_factor.*finite"):
        build_mixer("mlstm", 32, proj_factor=value)
    with pytest.raises(ValueError, match="expand_v.*finite"):
        build_mixer("mom", 32, expand_v=value)
    with pytest.raises(ValueError, match="norm_eps.*finite"):
        build_mixer("gdn", 32, norm_eps=value)


@pytest.mark.parametrize("seed", [-1, 2**62, 2**70])
def test_a_seed_torch_cannot_take_is_refused_naming_it(seed):
    with pytest.raises(ValueError, match="seed"):
        TrainConfig.make(seed=seed)


def test_mixer_and_task_options_are_strict_too():
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("attn", 32, num_heads=True)
    with pytest.raises(ValueError, match="seq_len"):
        build_task("mqar", seq_len="64")


def test_the_values_users_give_still_work():
    config = TrainConfig.make(lr=1, betas=[0.9, 0.99], steps=5)  # an int for a float, a list
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.betas == (0.9, 0.99)
    assert BenchConfig.make(archs=["gdn"], seq_lens=[64]).archs == ("gdn",)
    task = build_task("mqar", train_mix=[[64, 4, 10]], test_mix=[(64, 4, 10)])
    assert task.config.train_mix == ((64, 4, 10),)
    restored = ModelConfig.model_validate(ModelConfig(vocab_size=8).model_dump(mode="json"))
    assert restored == ModelConfig(vocab_size=8)


def test_command_line_options_give_typed_values():
    from seqlab.train.report import parse_options

    options = parse_options(["random_non_queries=false", "seq_len=64", "a=true", "b=null", "c=x"])
    assert options == {"random_non_queries": False, "seq_len": 64, "a": True, "b": None, "c": "x"}
    task = build_task("mqar", **parse_options(["random_non_queries=false"]))
    assert task.config.random_non_queries is False
