"""MAD task invariants, recomputed row by row from the inputs."""

from __future__ import annotations

import pytest
import torch

from seqlab.tasks import IGNORE, build_task
from tests.tasks.conftest import small


def full_rows(inputs: torch.Tensor, answers: torch.Tensor) -> list[list[int]]:
    """Rows of seq_len tokens: the inputs plus the last answer (inputs are tokens[:-1])."""
    return [x + [y[-1]] for x, y in zip(inputs.tolist(), answers.tolist(), strict=True)]


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall"])
def test_recall_targets_are_the_values_of_repeated_keys(name):
    task = small(name)
    c = task.config
    clean = c.vocab_size - c.noise_vocab_size
    ex = task.dataset("test")
    assert ex.inputs.shape[1] == c.seq_len - 1 == task.seq_len
    noise_slots = 0
    for tokens, y in zip(full_rows(ex.inputs, ex.targets), ex.targets.tolist(), strict=True):
        value_of: dict[int, int] = {}
        for i in range(0, len(tokens), 2):
            k, v = tokens[i], tokens[i + 1]
            if k >= clean:
                assert v >= clean and y[i] == IGNORE  # a noise slot: both tokens are noise
                noise_slots += 1
                continue
            assert k < clean // 2 <= v < clean
            expected = v if k in value_of else IGNORE
            assert value_of.setdefault(k, v) == v, "a key keeps its value within a row"
            assert y[i] == expected and (i == 0 or y[i - 1] == IGNORE)
        assert y[-1] != IGNORE, "the last pair probes a key shown before"
    slots = len(ex) * c.seq_len // 2
    assert noise_slots / slots == pytest.approx(c.frac_noise, abs=0.03)


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall", "fuzzy_recall"])
def test_recall_trains_on_every_next_token(name):
    ex = small(name).dataset("train")
    assert torch.equal(ex.targets[:, :-1], ex.inputs[:, 1:])


def test_fuzzy_recall_probe_repeats_an_earlier_motif_pair():
    task = small("fuzzy_recall")
    c = task.config
    clean = c.vocab_size - 1
    ex = task.dataset("test")
    assert ex.inputs.shape[1] == c.seq_len
    for tokens, y in zip(full_rows(ex.inputs, ex.targets), ex.targets.tolist(), strict=True):
        pad = next(i for i, token in enumerate(tokens) if token != task.pad_id)
        assert pad >= 1 and all(target == IGNORE for target in y[: pad - 1])
        answered = [tokens[i + 1] for i, target in enumerate(y) if target != IGNORE]
        assert all(clean // 2 <= value < clean for value in answered)
        assert [target for target in y if target != IGNORE] == answered
        # The final pair is a test-size key (k_motif_size tokens) and its value, both also earlier.
        value_len = next(i for i, target in enumerate(reversed(y)) if target == IGNORE)
        pair = tokens[-(c.k_motif_size + value_len) :]
        key = pair[: c.k_motif_size]
        assert all(token < clean // 2 for token in key) and len(set(key)) == len(key)
        body = tokens[: -len(pair)]
        assert any(body[i : i + len(pair)] == pair for i in range(len(body) - len(pair) + 1))


def test_selective_copying_targets_are_the_data_tokens_in_order():
    task = small("selective_copying")
    c = task.config
    k, t, blank, copy = c.num_tokens_to_copy, c.seq_len, c.vocab_size - 2, c.vocab_size - 1
    ex = task.dataset("test")
    for x, y in zip(ex.inputs.tolist(), ex.targets.tolist(), strict=True):
        assert x[t - k - 1] == copy and x.count(copy) == 1
        data = [token for token in x[: t - k - 1] if token != blank]
        assert len(data) == k and x[t - k - 2] != blank  # MAD: no blank after the last one
        assert y[t - k :] == data and set(y[: t - k]) == {IGNORE}
        assert set(x[t - k :]) == {blank}
    first = (ex.inputs[:, : t - k - 1] != blank).float().argmax(1)
    assert first.float().std() > 1, "data tokens sit at varying places"


def test_compression_reconstructs_its_inputs():
    task = small("compression")
    assert task.objective == "autoencode"
    for split in task.splits:
        ex = task.dataset(split)
        assert torch.equal(ex.inputs, ex.targets)
        assert (ex.inputs[:, -1] == task.vocab_size - 1).all()
        assert (ex.inputs[:, :-1] < task.vocab_size - 1).all()


def test_memorization_uses_one_fixed_map_in_both_splits():
    task = small("memorization")
    m = task.vocab_size - 1
    kv_map = task.kv_map
    assert kv_map.shape == (m // 2,) and len(set(kv_map.tolist())) == m // 2
    assert ((kv_map >= m // 2) & (kv_map < m)).all()
    for split in task.splits:
        ex = task.dataset(split)
        keys = ex.inputs[:, 0::2]
        assert (ex.inputs[:, 1::2] == m).all() and (keys < m // 2).all()
        assert torch.equal(ex.targets[:, 1::2], kv_map[keys])
        assert (ex.targets[:, 0::2] == IGNORE).all()
    assert torch.equal(small("memorization", seed=0).kv_map, kv_map)
    assert not torch.equal(small("memorization", seed=1).kv_map, kv_map)


def test_defaults_are_the_mad_baselines():
    expected = {
        "in_context_recall": dict(vocab_size=16, seq_len=128, num_train=12_800),
        "fuzzy_recall": dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3),
        "noisy_recall": dict(vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.2),
        "selective_copying": dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16),
        "compression": dict(vocab_size=16, seq_len=32, num_train=12_800),
        "memorization": dict(vocab_size=256, seq_len=32, num_train=256),
    }
    for name, settings in expected.items():
        config = build_task(name).config
        assert {key: getattr(config, key) for key in settings} == settings, name
        assert config.num_test == 1_280


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("in_context_recall", dict(seq_len=63), "seq_len must be even"),
        ("noisy_recall", dict(noise_vocab_size=31), "leave ≥ 2"),
        ("in_context_recall", dict(frac_noise=0.5), "needs noise_vocab_size"),
        ("fuzzy_recall", dict(k_motif_size=8), "k_motif_size exceeds"),
        ("fuzzy_recall", dict(seq_len=12), "seq_len must exceed"),
        ("selective_copying", dict(seq_len=33), "seq_len must exceed 2·num_tokens_to_copy"),
        ("memorization", dict(seq_len=31), "seq_len must be even"),
    ],
)
def test_impossible_settings_fail_clearly(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_task(name, **options)
