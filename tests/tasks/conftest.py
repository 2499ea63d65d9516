"""Small configurations of every synthetic task, shared by the task tests."""

from __future__ import annotations

import torch

from seqlab.tasks import build_task
from seqlab.tasks.base import Examples, SyntheticTask

# name → options: the cpu preset shrunk so each split builds in well under a second.
SMALL: dict[str, dict] = {
    "mqar": dict(
        vocab_size=128,
        train_mix=((64, 2, 300), (64, 8, 300), (32, 4, 300)),
        test_mix=((64, 2, 100), (64, 16, 100), (128, 32, 100)),
    ),
    "in_context_recall": dict(num_train=400, num_test=200),
    "fuzzy_recall": dict(num_train=400, num_test=200),
    "noisy_recall": dict(num_train=400, num_test=200),
    "selective_copying": dict(num_train=400, num_test=200),
    "compression": dict(num_train=400, num_test=200),
    "memorization": dict(num_train=200, num_test=200),
    "parity": dict(num_train=400, num_test=200),
    "modular_addition": dict(num_train=400, num_test=200),
}


def small(name: str, **options) -> SyntheticTask:
    task = build_task(name, preset="cpu", **{**SMALL[name], **options})
    assert isinstance(task, SyntheticTask)
    return task


def rows(examples: Examples) -> set[tuple[int, ...]]:
    """Each example's real inputs (padding cut off) as a tuple."""
    return {tuple(x[:n].tolist()) for x, n in zip(examples.inputs, examples.lengths, strict=True)}


def same(a: Examples, b: Examples) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in [(a.inputs, b.inputs), (a.targets, b.targets), (a.slices, b.slices)]
    )
