"""Tiny tasks and models, so that each trainer test runs in seconds on a laptop CPU."""

from __future__ import annotations

import pytest
import torch

from seqlab.model.lm import ModelConfig
from seqlab.tasks import build_task
from seqlab.train.trainer import TrainConfig

TINY_MQAR = dict(
    vocab_size=32,
    train_mix=((16, 2, 256), (16, 4, 256)),
    test_mix=((16, 2, 64), (16, 4, 64)),
)
# The same options as `seqlab train/probe --task-option` arguments.
TINY_MQAR_ARGS = [f"{k}={v!r}".replace(" ", "") for k, v in TINY_MQAR.items()]


def tiny_task():
    return build_task("mqar", preset="cpu", **TINY_MQAR)


def tiny_model(pattern: str = "gla", **options) -> ModelConfig:
    return ModelConfig(
        **{"vocab_size": 32, "d_model": 16, "n_layers": 1, "pattern": pattern, **options}
    )


def tiny_train(**options) -> TrainConfig:
    base = dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=10, progress=False)
    return TrainConfig.make(**{**base, **options})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and lose much when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def results_path(tmp_path, monkeypatch):
    """Every test writes its results store under its own tmp_path, never in the working tree."""
    path = tmp_path / "store" / "results.db"
    monkeypatch.setenv("SEQLAB_RESULTS", str(path))
    return path
