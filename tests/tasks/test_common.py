"""Contracts every synthetic task keeps: seeding, disjoint splits, shapes, batching, slices."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqlab.tasks import IGNORE, TASKS, build_task, evaluate_slices, example_accuracy
from seqlab.tasks.base import Examples, batch_indices, join, one_slice, split_seed
from tests.tasks.conftest import SMALL, rows, same, small


def test_registry_lists_every_task():
    assert set(TASKS) == set(SMALL) | {"text"}
    for name, (config_cls, task_cls) in TASKS.items():
        assert task_cls.Config is config_cls, name
        assert "cpu" in task_cls.presets, name


@pytest.mark.parametrize("name", SMALL)
def test_equal_seeds_give_equal_data_and_other_seeds_other_data(name):
    for split in ("train", "test"):
        a = small(name, seed=3).dataset(split)
        assert same(a, small(name, seed=3).dataset(split))
        assert not same(a, small(name, seed=4).dataset(split))


@pytest.mark.parametrize("name", SMALL)
def test_no_test_example_appears_in_train(name):
    task = small(name)
    train, test = task.dataset("train"), task.dataset("test")
    assert not rows(train) & rows(test)
    assert not same(train, test)


def test_splits_draw_from_different_seeds():
    seeds = {split_seed(seed, split) for seed in range(50) for split in ("train", "test")}
    assert len(seeds) == 100
    assert split_seed(7, "train", 64, 4) == split_seed(7, "train", 64, 4)


@pytest.mark.parametrize("name", SMALL)
def test_shapes_dtypes_and_token_ranges(name):
    task = small(name)
    for split in task.splits:
        ex = task.dataset(split)
        n, t = ex.inputs.shape
        assert ex.inputs.dtype == ex.targets.dtype == torch.int64
        assert ex.targets.shape == (n, t) and ex.lengths.shape == ex.slices.shape == (n,)
        assert t <= task.seq_len and int(ex.lengths.max()) == t
        assert 0 <= int(ex.inputs.min()) and int(ex.inputs.max()) < task.vocab_size
        answer = ex.targets != IGNORE
        assert answer.any(1).all(), "every example has at least one answer position"
        assert ((ex.targets[answer] >= 0) & (ex.targets[answer] < task.vocab_size)).all()
        beyond = torch.arange(t) >= ex.lengths[:, None]
        assert (ex.targets[beyond] == IGNORE).all()
        assert set(ex.slices.tolist()) <= set(range(len(ex.slice_names)))


@pytest.mark.parametrize("name", ["mqar", "parity"])
def test_an_epoch_covers_every_row_once_in_batches_of_one_slice(name):
    ex = small(name).dataset("train")
    per_slice = torch.bincount(ex.slices, minlength=len(ex.slice_names))
    n_batches = int((-(-per_slice // 64)).sum())
    it = batch_indices(ex, 64, torch.Generator().manual_seed(0))
    first, second = ([next(it) for _ in range(n_batches)] for _ in range(2))
    for epoch in (first, second):
        assert sorted(torch.cat(epoch).tolist()) == list(range(len(ex)))
        assert all(len(set(ex.slices[rows].tolist())) == 1 for rows in epoch)
    assert torch.cat(first).tolist() != torch.cat(second).tolist()


@pytest.mark.parametrize("name", SMALL)
def test_train_batches_follow_the_seed_and_are_trimmed_to_their_longest_row(name):
    task = small(name)

    def head(seed: int) -> list[list[int]]:
        it = task.batches("train", 16, seed)
        return [next(it)[0].tolist() for _ in range(4)]

    assert head(0) == head(0) and head(0) != head(1)
    ex = task.dataset("train")
    for inputs, targets in itertools.islice(task.batches("train", 16, 0), 20):
        assert inputs.shape == targets.shape and inputs.shape[0] <= 16
        assert inputs.shape[1] in set(ex.lengths.tolist())


@pytest.mark.parametrize("name", SMALL)
def test_test_batches_are_one_ordered_pass(name):
    task = small(name)
    ex = task.dataset("test")
    batches = list(task.batches("test", 50, seed=0))
    assert sum(len(x) for x, _ in batches) == len(ex)
    assert [x.tolist() for x, _ in batches] == [x.tolist() for x, _ in task.batches("test", 50, 9)]


def test_batches_reject_bad_arguments():
    task = small("parity")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        task.batches("validation", 8, 0)
    with pytest.raises(ValueError, match="batch_size"):
        task.batches("train", 0, 0)


def test_join_pads_right_and_renumbers_slices():
    a = one_slice(torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "a")
    b = one_slice(torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), "b")
    ab = join([a, b], pad_id=7)
    assert ab.slice_names == ("a", "b") and ab.slices.tolist() == [0, 0, 1]
    assert ab.lengths.tolist() == [3, 3, 5]
    assert ab.inputs[0].tolist() == [1, 1, 1, 7, 7]
    assert ab.targets[0].tolist() == [0, 0, 0, IGNORE, IGNORE]


def test_accuracy_averages_over_answers_then_over_examples():
    targets = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 4, IGNORE]])
    predictions = torch.tensor([[9, 1, 0, 0], [4, 9, 4, 9]])
    assert example_accuracy(predictions, targets).tolist() == pytest.approx([1 / 3, 1.0])
    ex = Examples(
        torch.tensor([[0] * 4, [1] * 4]),  # row i holds i, so `predict` can find its row
        targets,
        torch.tensor([4, 4]),
        torch.tensor([0, 1]),
        ("x", "y"),
    )
    result = evaluate_slices(lambda x: predictions[x[:, 0]], ex, batch_size=2)
    assert result == pytest.approx({"all": 2 / 3, "x": 1 / 3, "y": 1.0})


def test_evaluate_slices_on_mqar_with_an_oracle_and_a_partial_oracle():
    task = small("mqar")
    ex = task.dataset("test")
    answers = {
        tuple(x[:n].tolist()): y for x, y, n in zip(ex.inputs, ex.targets, ex.lengths, strict=True)
    }

    def oracle(inputs):
        return torch.stack([answers[tuple(r.tolist())][: inputs.shape[1]] for r in inputs])

    def knows_two_pairs(inputs):  # right on rows holding 2 pairs (2 answers), wrong elsewhere
        out = oracle(inputs)
        return out if (out != IGNORE).sum(1).max() == 2 else out + 1

    assert evaluate_slices(oracle, ex, 32) == {"all": 1.0, **dict.fromkeys(ex.slice_names, 1.0)}
    expected = {name: float(name == "num_kv_pairs=2,seq_len=64") for name in ex.slice_names}
    assert evaluate_slices(knows_two_pairs, ex, 32) == {"all": pytest.approx(1 / 3), **expected}


def test_unknown_names_options_and_presets_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: mqar, in_context_recall"):
        build_task("mqar2")
    with pytest.raises(ValueError, match=r"unknown option\(s\) num_pairs.*num_kv_pairs"):
        build_task("mqar", num_pairs=4)
    with pytest.raises(ValueError, match="valid presets: paper, cpu"):
        build_task("mqar", preset="gpu")
    with pytest.raises(ValueError, match="vocab_size"):
        build_task("in_context_recall", vocab_size=2)
    with pytest.raises(TypeError, match="takes a MQARConfig"):
        TASKS["mqar"][1](TASKS["parity"][0]())


def test_options_override_the_preset():
    task = build_task("in_context_recall", preset="cpu", seq_len=32)
    assert task.config.seq_len == 32 and task.config.num_train == 4_096
