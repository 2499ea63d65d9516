"""The MAD synthetic suite (Poli et al. 2024), following mad-lab's `mad/data/instances.py`.

Config defaults are the paper's baseline settings; the `cpu` presets scale them down. As in MAD, the
recall tasks train on every next token (targets = inputs shifted) and score only the recalled values
on the test split; the recall tasks run in MAD's multi-query mode (the benchmark's setting).
"""

from __future__ import annotations

import random
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from seqlab.config import Config
from seqlab.tasks.base import IGNORE, Examples, SyntheticTask, generator, one_slice, split_seed


class MADConfig(Config):
    vocab_size: int = Field(16, ge=4)
    seq_len: int = Field(128, ge=4)
    num_train: int = Field(12_800, ge=1)
    num_test: int = Field(1_280, ge=1)
    seed: int = 0


class MADTask(SyntheticTask):
    """One MAD task; subclasses implement `examples(gen, n, train)` -> inputs, targets [n, T]."""

    name: ClassVar[str]
    config: MADConfig

    def __init__(self, config: MADConfig | None = None):
        super().__init__(config)
        self.vocab_size = self.config.vocab_size
        self.seq_len = self.config.seq_len

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def generate(self, split: str) -> Examples:
        c = self.config
        n = c.num_train if split == "train" else c.num_test
        inputs, targets = self.examples(generator(c.seed, split, self.name), n, split == "train")
        return one_slice(inputs, targets, self.name)


def check(task: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{task}: {why}")


class InContextRecallConfig(MADConfig):
    noise_vocab_size: int = Field(0, ge=0)  # the last noise_vocab_size tokens are noise
    frac_noise: float = Field(0.0, ge=0, lt=1)  # chance that a pair slot holds two noise tokens


class InContextRecall(MADTask):
    """Key-value pairs with keys from [0, K/2) and values from [K/2, K), K = vocab − noise vocab;
    a key keeps its value within an example. The last pair repeats a key seen before. Test targets:
    the value after every repeated key. Rows hold seq_len tokens, so inputs have T = seq_len − 1."""

    name = "in_context_recall"
    Config = InContextRecallConfig
    presets = {"cpu": dict(seq_len=64, num_train=4_096, num_test=256)}
    config: InContextRecallConfig

    def __init__(self, config: InContextRecallConfig | None = None):
        super().__init__(config)
        c = self.config
        check(self.name, c.seq_len % 2 == 0, f"seq_len must be even, got {c.seq_len}")
        check(
            self.name,
            c.vocab_size - c.noise_vocab_size >= 2,
            "vocab_size − noise_vocab_size must leave ≥ 2 key/value tokens",
        )
        check(
            self.name,
            c.frac_noise == 0 or c.noise_vocab_size > 0,
            "frac_noise > 0 needs noise_vocab_size > 0",
        )
        self.seq_len = c.seq_len - 1

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        c = self.config
        clean = c.vocab_size - c.noise_vocab_size
        num_keys, pairs = clean // 2, c.seq_len // 2
        kv_map = torch.randint(num_keys, clean, (n, num_keys), generator=gen)
        keys = torch.randint(num_keys, (n, pairs), generator=gen)
        noise = torch.rand(n, pairs, generator=gen) < c.frac_noise
        # A slot before the last always holds a real pair, so the probe has a shown key to repeat.
        noise[torch.arange(n), torch.randint(pairs - 1, (n,), generator=gen)] = False
        noise[:, -1] = False

        # first[b, k]: index of the first real pair with key k among the first pairs - 1 (else
        # `pairs`); the last pair probes a uniformly drawn key among those shown.
        index = torch.arange(pairs).expand(n, pairs)
        shown = torch.where(noise, pairs, index)[:, :-1]
        first = torch.full((n, num_keys), pairs).scatter_reduce(1, keys[:, :-1], shown, "amin")
        keys[:, -1] = torch.multinomial((first < pairs).double(), 1, generator=gen).squeeze(1)
        values = kv_map.gather(1, keys)
        repeat = ~noise & (first.gather(1, keys) < index)

        tokens = torch.stack([keys, values], -1)  # [n, pairs, 2]
        if c.noise_vocab_size:
            noise_tokens = torch.randint(clean, c.vocab_size, (n, pairs, 2), generator=gen)
            tokens = torch.where(noise[..., None], noise_tokens, tokens)
        answers = torch.stack([torch.full_like(values, IGNORE), values.where(repeat, IGNORE)], -1)
        tokens, answers = tokens.flatten(1), answers.flatten(1)
        return tokens[:, :-1], tokens[:, 1:] if train else answers[:, 1:]


class NoisyRecallConfig(InContextRecallConfig):
    vocab_size: int = Field(32, ge=4)
    noise_vocab_size: int = Field(16, ge=0)
    frac_noise: float = Field(0.2, ge=0, lt=1)


class NoisyRecall(InContextRecall):
    """In-context recall where each pair slot holds two noise tokens with probability frac_noise."""

    name = "noisy_recall"
    Config = NoisyRecallConfig


class FuzzyRecallConfig(MADConfig):
    k_motif_size: int = Field(3, ge=1)  # keys span 1..k tokens in training, exactly k in test
    v_motif_size: int = Field(3, ge=1)  # values span 1..v tokens


class FuzzyRecall(MADTask):
    """Recall where keys and values are runs of distinct tokens (keys from [0, K/2), values from
    [K/2, K), K = vocab − 1; token vocab − 1 pads on the left). One probe pair sits at a random
    place and is repeated at the end; test targets are the values after every repeated key."""

    name = "fuzzy_recall"
    Config = FuzzyRecallConfig
    presets = {"cpu": dict(seq_len=64, num_train=4_096, num_test=256)}
    config: FuzzyRecallConfig

    def __init__(self, config: FuzzyRecallConfig | None = None):
        super().__init__(config)
        c = self.config
        clean = c.vocab_size - 1
        check(self.name, c.k_motif_size <= clean // 2, "k_motif_size exceeds the key vocabulary")
        check(self.name, c.v_motif_size <= clean - clean // 2, "v_motif_size exceeds values")
        check(
            self.name,
            c.seq_len > 2 * (c.k_motif_size + c.v_motif_size),
            "seq_len must exceed 2·(k_motif_size + v_motif_size)",
        )
        self.pad_id = c.vocab_size - 1

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        # Variable-size motifs make this a per-example loop; `random` is fast there and seeded.
        rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))
        rows = [self.example(rng, train) for _ in range(n)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def example(self, rng: random.Random, train: bool) -> tuple[list[int], list[int]]:
        c = self.config
        clean = c.vocab_size - 1
        key_vocab, value_vocab = range(clean // 2), range(clean // 2, clean)
        k_max, v_max = c.k_motif_size, c.v_motif_size

        def key_size() -> int:
            return rng.randint(1, k_max) if train else k_max

        def motif(vocab: range, size: int) -> tuple[int, ...]:
            return tuple(rng.sample(vocab, size))

        probe_key = motif(key_vocab, key_size())
        probe_value = motif(value_vocab, rng.randint(1, v_max))
        probe_len = len(probe_key) + len(probe_value)
        stop = c.seq_len - probe_len - (k_max + v_max)
        probe_at = rng.randrange(c.seq_len - 2 * probe_len)
        values = {probe_key: probe_value}  # a key keeps the value it first drew
        shown: set[tuple[int, ...]] = set()
        tokens: list[int] = []
        answers: list[int] = []
        while len(tokens) < stop:
            k_size, v_size = key_size(), rng.randint(1, v_max)
            # MAD inserts the probe pair once past probe_at; unlike MAD, also when the loop could
            # end before reaching probe_at, so the final probe is always answerable.
            if probe_key not in shown and (
                len(tokens) >= probe_at or len(tokens) + k_max + v_max >= stop
            ):
                key = probe_key
            else:
                key = motif(key_vocab, k_size)
            value = values.setdefault(key, motif(value_vocab, v_size))
            tokens += key + value
            answers += [IGNORE] * len(key) + (
                list(value) if key in shown else [IGNORE] * len(value)
            )
            shown.add(key)
        tokens += probe_key + probe_value
        answers += [IGNORE] * len(probe_key) + list(probe_value)
        pad = c.seq_len + 1 - len(tokens)
        tokens = [self.pad_id] * pad + tokens
        answers = [IGNORE] * pad + answers
        return tokens[:-1], tokens[1:] if train else answers[1:]


class SelectiveCopyingConfig(MADConfig):
    vocab_size: int = Field(16, ge=4)
    seq_len: int = Field(256, ge=4)
    num_tokens_to_copy: int = Field(16, ge=1)


class SelectiveCopying(MADTask):
    """num_tokens_to_copy data tokens from [0, vocab − 2) scattered among blanks (vocab − 2), then
    the copy token (vocab − 1) and blanks, where the targets are the data tokens in order. As in
    MAD, each blank lands before a uniformly drawn data token, so the last one precedes the copy."""

    name = "selective_copying"
    Config = SelectiveCopyingConfig
    presets = {"cpu": dict(seq_len=64, num_tokens_to_copy=8, num_train=4_096, num_test=256)}
    config: SelectiveCopyingConfig

    def __init__(self, config: SelectiveCopyingConfig | None = None):
        super().__init__(config)
        c = self.config
        check(
            self.name,
            c.seq_len > 2 * c.num_tokens_to_copy + 1,
            "seq_len must exceed 2·num_tokens_to_copy + 1",
        )
        self.blank_id, self.copy_id = c.vocab_size - 2, c.vocab_size - 1

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        c = self.config
        k, t = c.num_tokens_to_copy, c.seq_len
        to_copy = torch.randint(self.blank_id, (n, k), generator=gen)
        before = torch.randint(k, (n, t - 2 * k - 1), generator=gen)  # blank → data token after it
        blanks_before = torch.zeros(n, k, dtype=torch.long).scatter_add_(
            1, before, torch.ones_like(before)
        )
        positions = torch.arange(k) + blanks_before.cumsum(1)
        inputs = torch.full((n, t), self.blank_id).scatter_(1, positions, to_copy)
        inputs[:, t - k - 1] = self.copy_id
        targets = torch.full((n, t), IGNORE)
        targets[:, t - k :] = to_copy
        return inputs, targets


class CompressionConfig(MADConfig):
    seq_len: int = Field(32, ge=2)


class Compression(MADTask):
    """seq_len − 1 tokens from [0, vocab − 1) then the compression token (vocab − 1); targets equal
    inputs. MAD runs it with an autoencoder: every token is decoded from the last position."""

    name = "compression"
    Config = CompressionConfig
    objective = "autoencode"
    presets = {"cpu": dict(seq_len=16, num_train=4_096, num_test=256)}

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        c = self.config
        tokens = torch.randint(c.vocab_size - 1, (n, c.seq_len), generator=gen)
        tokens[:, -1] = c.vocab_size - 1
        return tokens, tokens.clone()


class MemorizationConfig(MADConfig):
    vocab_size: int = Field(256, ge=4)
    seq_len: int = Field(32, ge=2)
    num_train: int = Field(256, ge=1)


class Memorization(MADTask):
    """Pairs (key, insert token = vocab − 1) whose target at the insert token is the key's value,
    from one fixed map over all examples and splits: keys [0, M/2) → distinct values from
    [M/2, M), M = vocab − 1. The model must store the map in its weights."""

    name = "memorization"
    Config = MemorizationConfig
    presets = {"cpu": dict(vocab_size=128, num_train=256, num_test=256)}

    def __init__(self, config: MemorizationConfig | None = None):
        super().__init__(config)
        c = self.config
        check(self.name, c.seq_len % 2 == 0, f"seq_len must be even, got {c.seq_len}")
        tokens = c.vocab_size - 1
        self.insert_id = tokens
        # Seeded from config.seed alone, not the split: train and test share the map.
        gen = torch.Generator().manual_seed(split_seed(c.seed, "kv_map"))
        values = torch.arange(tokens // 2, tokens)[
            torch.randperm(tokens - tokens // 2, generator=gen)
        ]
        self.kv_map = values[: tokens // 2]  # [num_keys]: the value of each key

    def examples(self, gen: torch.Generator, n: int, train: bool) -> tuple[Tensor, Tensor]:
        keys = torch.randint(len(self.kv_map), (n, self.config.seq_len // 2), generator=gen)
        inputs = torch.stack([keys, torch.full_like(keys, self.insert_id)], -1).flatten(1)
        targets = torch.stack([torch.full_like(keys, IGNORE), self.kv_map[keys]], -1).flatten(1)
        return inputs, targets


MAD_TASKS: dict[str, type[MADTask]] = {
    "in_context_recall": InContextRecall,
    "fuzzy_recall": FuzzyRecall,
    "noisy_recall": NoisyRecall,
    "selective_copying": SelectiveCopying,
    "compression": Compression,
    "memorization": Memorization,
}
