"""State tracking with length generalisation: parity and running sums modulo p.

Lengths follow the negative-eigenvalue paper (Grazzi et al. 2024): train on 3–40 tokens, test up to
256, from 41 rather than the paper's 40 so every test example is longer than every training one.
Rows are right-padded with a pad token whose targets are IGNORE; slices are length bins (powers of
two), so a report shows where accuracy falls off with length. By default the target at every
position is the running result of the prefix; `target="final"` keeps only the last one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from seqlab.config import Config
from seqlab.tasks.base import IGNORE, Examples, SyntheticTask, generator


class ParityConfig(Config):
    train_min_len: int = Field(3, ge=1)
    train_max_len: int = Field(40, ge=1)
    test_min_len: int = Field(41, ge=1)
    test_max_len: int = Field(256, ge=1)
    num_train: int = Field(100_000, ge=1)
    num_test: int = Field(2_000, ge=1)
    target: Literal["running", "final"] = "running"
    seed: int = 0


class ModularAdditionConfig(ParityConfig):
    modulus: int = Field(5, ge=2)


def length_bins(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high] cut after each power of two inside it: (41, 256) → (41–64, 65–128, 129–256)."""
    cuts = [2**k for k in range(high.bit_length()) if low <= 2**k < high]
    starts = [low] + [c + 1 for c in cuts]
    return list(zip(starts, cuts + [high], strict=True))


class Parity(SyntheticTask):
    """Bits 0/1, token 2 pads (vocab 3); the target at position t is the parity of the first t + 1
    bits."""

    Config = ParityConfig
    presets = {"cpu": dict(num_train=20_000, num_test=512, test_max_len=128)}
    modulus = 2
    config: ParityConfig

    def __init__(self, config: ParityConfig | None = None):
        super().__init__(config)
        c = self.config
        if not (c.train_min_len <= c.train_max_len < c.test_min_len <= c.test_max_len):
            raise ValueError(
                f"{type(self).__name__}: lengths must satisfy train_min_len ≤ train_max_len < "
                f"test_min_len ≤ test_max_len, got {c.train_min_len}, {c.train_max_len}, "
                f"{c.test_min_len}, {c.test_max_len}"
            )
        self.pad_id = self.modulus
        self.vocab_size = self.modulus + 1
        self.seq_len = c.test_max_len

    def generate(self, split: str) -> Examples:
        c = self.config
        if split == "train":
            n, low, high = c.num_train, c.train_min_len, c.train_max_len
        else:
            n, low, high = c.num_test, c.test_min_len, c.test_max_len
        gen = generator(c.seed, split, self.modulus)
        lengths = torch.randint(low, high + 1, (n,), generator=gen)
        tokens = torch.randint(self.modulus, (n, high), generator=gen)
        position = torch.arange(high)
        real = position < lengths[:, None]
        scored = position == lengths[:, None] - 1 if c.target == "final" else real
        targets = tokens.cumsum(1) % self.modulus
        bins = length_bins(low, high)
        slices = torch.bucketize(lengths, torch.tensor([b for _, b in bins]))
        return Examples(
            tokens.where(real, self.pad_id),
            targets.where(scored, IGNORE),
            lengths,
            slices,
            tuple(f"len={a}-{b}" for a, b in bins),
        )


class ModularAddition(Parity):
    """Numbers in [0, p), token p pads (vocab p + 1); the target at position t is the sum of the
    first t + 1 numbers modulo p."""

    Config = ModularAdditionConfig
    config: ModularAdditionConfig

    @property
    def modulus(self) -> int:
        return self.config.modulus
