"""Multi-query associative recall (MQAR), as in zoology (Arora et al. 2024).

Each example lays out `num_kv_pairs` key-value pairs (keys distinct, from [1, V/2); values distinct,
from [V/2, V)), then queries every key once in the rest of the sequence. The input at a query is the
key and its target is the paired value; every other target is IGNORE. Query gaps follow a power law
(p(i) ∝ a·i^(a−1), i = 1, 2, ..., a = 0.01), so most queries come soon after the pairs.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqlab.config import Config
from seqlab.tasks.base import IGNORE, Examples, SyntheticTask, generator, join, one_slice

Setting = tuple[int, int, int]  # (seq_len, num_kv_pairs, num_examples)


class MQARConfig(Config):
    """`train_mix`/`test_mix` list (seq_len, num_kv_pairs, num_examples) settings, one slice each;
    empty means the single setting (seq_len, num_kv_pairs, num_train or num_test)."""

    vocab_size: int = Field(8192, ge=4)
    seq_len: int = Field(64, ge=4)
    num_kv_pairs: int = Field(8, ge=1)
    num_train: int = Field(100_000, ge=1)
    num_test: int = Field(3_000, ge=1)
    train_mix: tuple[Setting, ...] = ()
    test_mix: tuple[Setting, ...] = ()
    power_a: float = Field(0.01, gt=0, le=1)
    random_non_queries: bool = True  # fill the non-query gaps with random tokens (zoology default)
    seed: int = 0

    @model_validator(mode="after")
    def _no_unused_setting(self) -> MQARConfig:
        """A setting the mixes replace, given explicitly, is an error: `seq_len = 256` under the
        cpu preset (whose mixes are all at 64) trained at 64 with no word."""
        unused = [
            name
            for name, used in (
                ("seq_len", not (self.train_mix and self.test_mix)),
                ("num_kv_pairs", not (self.train_mix and self.test_mix)),
                ("num_train", not self.train_mix),
                ("num_test", not self.test_mix),
            )
            if name in self.model_fields_set and not used
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} would be unused: train_mix and test_mix (set here or by the "
                "preset) list every (seq_len, num_kv_pairs, num_examples); set the mixes instead, "
                "or use no preset and no mixes"
            )
        return self


def distinct(gen: torch.Generator, n: int, k: int, low: int, high: int) -> Tensor:
    """[n, k] int64: in each row, k distinct values from [low, high) in uniformly random order."""
    size = high - low
    if k * (k - 1) > size:
        # Rows of k draws would mostly repeat a value: take the top k of random scores instead.
        rows_per_chunk = max(1, 2**24 // size)  # bounds the [rows, size] scratch
        chunks = [
            torch.rand(min(rows_per_chunk, n - start), size, generator=gen).topk(k).indices
            for start in range(0, n, rows_per_chunk)
        ]
        return torch.cat(chunks) + low

    def repeats(rows: Tensor) -> Tensor:
        ordered = rows.sort(1).values
        return (ordered[:, 1:] == ordered[:, :-1]).any(1)

    # Redraw whole rows until none repeats a value: exact, and each row passes with p > e^-1/2.
    out = torch.randint(low, high, (n, k), generator=gen)
    redo = repeats(out).nonzero().squeeze(1)
    while len(redo):
        out[redo] = torch.randint(low, high, (len(redo), k), generator=gen)
        redo = redo[repeats(out[redo])]
    return out


def mqar_examples(
    gen: torch.Generator,
    num_examples: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[Tensor, Tensor]:
    """inputs, targets [num_examples, seq_len] laid out as zoology's `multiquery_ar`."""
    n, pairs = num_examples, num_kv_pairs
    context = 2 * pairs
    keys = distinct(gen, n, pairs, 1, vocab_size // 2)
    values = distinct(gen, n, pairs, vocab_size // 2, vocab_size)

    # The query of key j goes to context + 2·gap_j; gaps are distinct, drawn by the power law.
    space = (seq_len - context) // 2
    i = torch.arange(1, space + 1, dtype=torch.float64)
    weights = (power_a * i ** (power_a - 1)).expand(n, space)
    positions = context + 2 * torch.multinomial(weights, pairs, replacement=False, generator=gen)

    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, positions, keys)
    targets = torch.full((n, seq_len), IGNORE).scatter_(1, positions, values)
    if random_non_queries:
        # As zoology: every 0 becomes a uniform token from the whole vocabulary (keys included).
        fill = torch.randint(vocab_size, (n, seq_len), generator=gen)
        inputs = torch.where(inputs == 0, fill, inputs)
    return inputs, targets


class MQAR(SyntheticTask):
    Config = MQARConfig
    presets = {
        # zoology's mix for the Based paper's figure 2: train to (256, 64), test to (1024, 256).
        "paper": dict(
            train_mix=(
                (64, 4, 100_000),
                (128, 8, 20_000),
                (256, 16, 20_000),
                (256, 32, 20_000),
                (256, 64, 20_000),
            ),
            test_mix=(
                (64, 4, 1_000),
                (64, 8, 1_000),
                (64, 16, 1_000),
                (128, 32, 1_000),
                (256, 64, 1_000),
                (512, 128, 1_000),
                (1024, 256, 1_000),
            ),
        ),
        "cpu": dict(
            vocab_size=256,
            train_mix=((64, 2, 4_000), (64, 4, 4_000), (64, 8, 4_000), (64, 16, 4_000)),
            test_mix=((64, 2, 256), (64, 4, 256), (64, 8, 256), (64, 16, 256)),
        ),
    }
    config: MQARConfig

    def __init__(self, config: MQARConfig | None = None):
        super().__init__(config)
        c = self.config
        for split in self.splits:
            mix = self.mix(split)
            if len({(t, p) for t, p, _ in mix}) < len(mix):
                raise ValueError(f"mqar: {split} mix repeats a (seq_len, num_kv_pairs): {mix}")
            for t, p, n in mix:
                if t % 2 or t < 4 * p or p > c.vocab_size // 2 - 1 or n < 1:
                    raise ValueError(
                        f"mqar: {split} setting (seq_len={t}, num_kv_pairs={p}, "
                        f"num_examples={n}) needs an even seq_len ≥ 4·num_kv_pairs, "
                        f"num_kv_pairs ≤ vocab_size/2 − 1 = {c.vocab_size // 2 - 1} "
                        "(distinct keys) and num_examples ≥ 1"
                    )
        self.vocab_size = c.vocab_size
        self.seq_len = max(t for split in self.splits for t, _, _ in self.mix(split))

    def mix(self, split: str) -> tuple[Setting, ...]:
        c = self.config
        if split == "train":
            return c.train_mix or ((c.seq_len, c.num_kv_pairs, c.num_train),)
        return c.test_mix or ((c.seq_len, c.num_kv_pairs, c.num_test),)

    def generate(self, split: str) -> Examples:
        c = self.config
        parts = []
        for t, p, n in self.mix(split):
            gen = generator(c.seed, split, t, p)
            inputs, targets = mqar_examples(
                gen, n, c.vocab_size, t, p, c.power_a, c.random_non_queries
            )
            parts.append(one_slice(inputs, targets, f"num_kv_pairs={p},seq_len={t}"))
        return join(parts, pad_id=0)
