"""MQAR invariants, checked row by row against zoology's layout."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.tasks import IGNORE, build_task
from seqlab.tasks.mqar import distinct
from tests.tasks.conftest import small


def settings(name: str) -> tuple[int, int]:
    pairs, length = (int(part.split("=")[1]) for part in name.split(","))
    return length, pairs


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_row_follows_the_mqar_layout(split):
    task = small("mqar")
    v = task.vocab_size
    ex = task.dataset(split)
    for x, y, length, s in zip(ex.inputs, ex.targets, ex.lengths, ex.slices, strict=True):
        t, pairs = settings(ex.slice_names[s])
        assert int(length) == t
        x, y = x[:t].tolist(), y[:t].tolist()
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert all(1 <= k < v // 2 for k in keys) and len(set(keys)) == pairs
        assert all(v // 2 <= val < v for val in values) and len(set(values)) == pairs
        assert all(target == IGNORE for target in y[: 2 * pairs])
        answers = [i for i, target in enumerate(y) if target != IGNORE]
        # Every key is queried once, at an even offset from the end of the pairs, and the answer
        # is the value paired with the key earlier in the row.
        assert len(answers) == pairs
        assert all((i - 2 * pairs) % 2 == 0 for i in answers)
        assert sorted(x[i] for i in answers) == sorted(keys)
        pair_of = dict(zip(keys, values, strict=True))
        assert all(y[i] == pair_of[x[i]] for i in answers)


@pytest.mark.parametrize("k, low, high", [(2, 1, 7), (3, 4, 8)])  # redraw rows; rank scores
def test_distinct_draws_every_ordered_tuple_equally_often(k, low, high):
    draws = distinct(torch.Generator().manual_seed(0), 60_000, k, low, high)
    assert ((draws >= low) & (draws < high)).all()
    tuples, counts = draws.unique(dim=0, return_counts=True)
    n_tuples = math.perm(high - low, k)
    assert len(tuples) == n_tuples and all(len(set(t)) == k for t in tuples.tolist())
    assert counts.float().std() / counts.float().mean() < 0.1


def test_slices_name_the_settings_of_their_rows():
    task = small("mqar")
    for split, mix in (("train", task.config.train_mix), ("test", task.config.test_mix)):
        ex = task.dataset(split)
        assert ex.slice_names == tuple(f"num_kv_pairs={p},seq_len={t}" for t, p, _ in mix)
        assert torch.bincount(ex.slices).tolist() == [n for _, _, n in mix]
    assert task.seq_len == 128 and task.vocab_size == 128


def test_queries_follow_the_power_law():
    # (64, 8) leaves 24 query slots; p(slot i) ∝ (i + 1)^-0.99, drawn 8 times without replacement,
    # fills the first slot in ~95% of rows (a uniform draw: 1/3) and thins out behind it.
    task = build_task("mqar", vocab_size=128, seq_len=64, num_kv_pairs=8, num_test=1000)
    ex = task.dataset("test")
    used = (ex.targets[:, 16::2] != IGNORE).float().mean(0)  # [24] share of rows using each slot
    assert used[0] > 0.9 and used[0] > used[4] > used[20]
    assert used[20] < 0.25


def test_gaps_hold_random_tokens_unless_disabled():
    gaps = build_task("mqar", vocab_size=128, num_test=50).dataset("test")
    assert (gaps.inputs == 0).float().mean() < 0.05
    zeros = build_task("mqar", vocab_size=128, num_test=50, random_non_queries=False)
    ex = zeros.dataset("test")
    assert ((ex.inputs == 0) == (torch.arange(64) >= 16) & (ex.targets == IGNORE)).all()


def test_the_defaults_and_presets_are_zoology_settings():
    c = build_task("mqar").config
    assert (c.vocab_size, c.seq_len, c.num_kv_pairs, c.power_a) == (8192, 64, 8, 0.01)
    paper = build_task("mqar", preset="paper")
    assert paper.seq_len == 1024
    assert (1024, 256, 1_000) in paper.config.test_mix
    cpu = build_task("mqar", preset="cpu")
    assert {p for _, p, _ in cpu.config.train_mix} == {2, 4, 8, 16}
    assert cpu.vocab_size <= 256 and cpu.seq_len == 64


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(seq_len=64, num_kv_pairs=17), "even seq_len ≥ 4·num_kv_pairs"),
        (dict(seq_len=63, num_kv_pairs=4), "even seq_len"),
        (dict(vocab_size=16, num_kv_pairs=8), r"num_kv_pairs ≤ vocab_size/2 − 1 = 7"),
        (dict(test_mix=((64, 4, 10), (1024, 300, 10))), "num_kv_pairs=300"),
        (dict(train_mix=((64, 4, 10), (64, 4, 20))), "repeats"),
    ],
)
def test_impossible_settings_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        build_task("mqar", **options)


@pytest.mark.parametrize(
    "preset, options, unused",
    [
        ("cpu", {"seq_len": 256}, "seq_len"),  # trained at the preset's 64 with no word
        ("cpu", {"num_kv_pairs": 32, "num_test": 10}, "num_kv_pairs, num_test"),
        ("paper", {"num_train": 5}, "num_train"),
        (None, {"train_mix": ((64, 4, 10),), "num_train": 5}, "num_train"),
    ],
)
def test_a_setting_the_mixes_replace_is_an_error(preset, options, unused):
    with pytest.raises(ValueError, match=f"{unused} would be unused: train_mix and test_mix"):
        build_task("mqar", preset=preset, **options)


def test_settings_the_mixes_leave_in_use_are_taken():
    task = build_task("mqar", train_mix=((64, 4, 10),), seq_len=32, num_kv_pairs=2, num_test=7)
    assert task.mix("test") == ((32, 2, 7),)  # one mix set: the other split's single setting
    assert build_task("mqar", preset="cpu", vocab_size=512).vocab_size == 512
