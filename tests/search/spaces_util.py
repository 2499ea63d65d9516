"""Tiny spaces and experiments for the search tests: models of d_model 16 on an MQAR of 16 tokens,
so that a trial trains in about a second."""

from __future__ import annotations

import copy
from typing import Any

from seqlab.experiment import ExperimentConfig, load_experiment
from seqlab.search.space import SearchSpace

TINY_MQAR = {
    "vocab_size": 32,
    "train_mix": [[16, 2, 256], [16, 4, 256]],
    "test_mix": [[16, 2, 64], [16, 4, 64]],
}
TINY_SPACE: dict[str, Any] = {
    "name": "tiny",
    "model": {"n_layers": [1, 2], "d_model": 16},
    "mixers": {"use": ["gla", "gdn"]},
    "hybrid": {"attention": "attn", "fraction": [0.0, 0.5, 1.0], "placement": "striped"},
    "widths": {"num_heads": 2},
    "options": {"gdn": {"allow_neg_eigval": [False, True]}},
    "channel": {"use": ["none"]},
    "train": {"lr": [3e-3, 1e-2]},
    "known": {
        "attention": {"fraction": 1.0},
        "gla": {"mixer": "gla", "fraction": 0.0},
        "hybrid": {"mixer": "gdn", "fraction": 0.5, "n_layers": 2},
    },
}


def tiny_space(**changes: Any) -> SearchSpace:
    """TINY_SPACE with top-level tables replaced by `changes` (None removes one)."""
    data = copy.deepcopy(TINY_SPACE)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return SearchSpace(data, "tiny.toml")


def tiny_base(**train: Any) -> ExperimentConfig:
    """MQAR of 16 tokens, 20 steps with an evaluation (and checkpoint) every 10."""
    values = {
        "task.name": "mqar",
        "task.preset": "cpu",
        "task.options": TINY_MQAR,
        "train.steps": 20,
        "train.batch_size": 8,
        "train.warmup_steps": 2,
        "train.eval_every": 10,
        "train.eval_batch_size": 64,
        "train.device": "cpu",
        "train.progress": False,
    }
    values |= {f"train.{k}": v for k, v in train.items()}
    return load_experiment(defaults=values)
