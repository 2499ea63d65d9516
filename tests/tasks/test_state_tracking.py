"""Parity and modular addition: targets recomputed by a loop, lengths split train from test."""

from __future__ import annotations

import pytest

from seqlab.tasks import IGNORE, build_task
from seqlab.tasks.state_tracking import length_bins
from tests.tasks.conftest import small


@pytest.mark.parametrize("name, modulus", [("parity", 2), ("modular_addition", 5)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_targets_are_running_sums_of_the_prefix(name, modulus, split):
    task = small(name)
    assert task.vocab_size == modulus + 1 and task.pad_id == modulus
    ex = task.dataset(split)
    for x, y, n in zip(ex.inputs.tolist(), ex.targets.tolist(), ex.lengths.tolist(), strict=True):
        assert all(0 <= token < modulus for token in x[:n]) and set(x[n:]) <= {modulus}
        total = 0
        for t in range(n):
            total = (total + x[t]) % modulus
            assert y[t] == total
        assert set(y[n:]) <= {IGNORE}


def test_final_target_keeps_only_the_last_position():
    ex = small("parity", target="final").dataset("test")
    for x, y, n in zip(ex.inputs.tolist(), ex.targets.tolist(), ex.lengths.tolist(), strict=True):
        assert y[n - 1] == sum(x[:n]) % 2
        assert [t for t in y if t != IGNORE] == [y[n - 1]]


@pytest.mark.parametrize("name", ["parity", "modular_addition"])
def test_every_test_example_is_longer_than_every_training_one(name):
    task = build_task(name, num_train=2000, num_test=500)
    train, test = task.dataset("train"), task.dataset("test")
    assert (int(train.lengths.min()), int(train.lengths.max())) == (3, 40)
    assert 41 <= int(test.lengths.min()) and int(test.lengths.max()) <= 256
    assert test.inputs.shape[1] == task.seq_len == 256
    assert int(test.lengths.min()) > int(train.lengths.max())


def test_slices_are_length_bins():
    assert length_bins(41, 256) == [(41, 64), (65, 128), (129, 256)]
    assert length_bins(3, 40) == [(3, 4), (5, 8), (9, 16), (17, 32), (33, 40)]
    assert length_bins(5, 5) == [(5, 5)]
    ex = small("parity").dataset("test")
    assert ex.slice_names == ("len=41-64", "len=65-128")
    for n, s in zip(ex.lengths.tolist(), ex.slices.tolist(), strict=True):
        low, high = map(int, ex.slice_names[s].removeprefix("len=").split("-"))
        assert low <= n <= high


def test_lengths_must_separate_train_from_test():
    with pytest.raises(ValueError, match="train_max_len < test_min_len"):
        build_task("parity", train_max_len=50, test_min_len=41)
    with pytest.raises(ValueError, match="modulus"):
        build_task("modular_addition", modulus=1)
