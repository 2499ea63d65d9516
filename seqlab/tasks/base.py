"""What every task shares: split seeds, fixed example sets, batching and accuracy by slice."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from seqlab.config import Config

IGNORE = -100
Batch = tuple[Tensor, Tensor]  # inputs [B, T], targets [B, T], both int64


def split_seed(seed: int, split: str, *parts: object) -> int:
    """A 63-bit generator seed for (seed, split, *parts). Equal arguments give equal seeds; hashing
    the split keeps train and test from ever drawing from the same stream."""
    digest = hashlib.sha256(repr((seed, split, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, split: str, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(split_seed(seed, split, *parts))


@dataclass(frozen=True)
class Examples:
    """A fixed set of examples. Rows shorter than T are right-padded, with IGNORE targets there."""

    inputs: Tensor  # [N, T] int64
    targets: Tensor  # [N, T] int64, IGNORE where no loss
    lengths: Tensor  # [N] int64, the real length of each row
    slices: Tensor  # [N] int64, index into slice_names
    slice_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def one_slice(inputs: Tensor, targets: Tensor, name: str) -> Examples:
    """Equal-length rows that all belong to the slice `name`."""
    n, t = inputs.shape
    return Examples(inputs, targets, torch.full((n,), t), torch.zeros(n, dtype=torch.long), (name,))


def join(parts: Sequence[Examples], pad_id: int) -> Examples:
    """Stack example sets with distinct slice names, right-padding rows to the longest."""
    t = max(p.inputs.shape[1] for p in parts)

    def pad(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

    offsets = torch.tensor([0] + [len(p.slice_names) for p in parts]).cumsum(0)
    return Examples(
        torch.cat([pad(p.inputs, pad_id) for p in parts]),
        torch.cat([pad(p.targets, IGNORE) for p in parts]),
        torch.cat([p.lengths for p in parts]),
        torch.cat([p.slices + offsets[i] for i, p in enumerate(parts)]),
        tuple(name for p in parts for name in p.slice_names),
    )


def batch_indices(
    examples: Examples, batch_size: int, gen: torch.Generator | None
) -> Iterator[Tensor]:
    """Row indices of minibatches that never mix slices (slices may differ in length). With `gen`:
    endless epochs, shuffled within slices and across batches; without: one pass in order."""
    while True:
        chunks: list[Tensor] = []
        for s in range(len(examples.slice_names)):
            rows = (examples.slices == s).nonzero().squeeze(1)
            if gen is not None:
                rows = rows[torch.randperm(len(rows), generator=gen)]
            chunks += rows.split(batch_size)
        if gen is None:
            yield from chunks
            return
        for i in torch.randperm(len(chunks), generator=gen).tolist():
            yield chunks[i]


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def take(examples: Examples, rows: Tensor) -> Batch:
    """The rows as a batch, trimmed to the longest of them."""
    t = int(examples.lengths[rows].max())
    return examples.inputs[rows, :t], examples.targets[rows, :t]


def example_accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """[N] float: the fraction of each row's answer positions (target != IGNORE) predicted right;
    NaN for a row without any."""
    answer = targets != IGNORE
    correct = ((predictions == targets) & answer).sum(1)
    return correct / answer.sum(1)


def evaluate_slices(
    predict: Callable[[Tensor], Tensor], examples: Examples, batch_size: int
) -> dict[str, float]:
    """Accuracy per slice and over all examples ("all"). `predict` maps inputs [B, T] to token ids
    [B, T]; each example's accuracy is averaged over its answer positions, then over examples."""
    check_batch_size(batch_size)
    accuracy = torch.full((len(examples),), float("nan"))
    for rows in batch_indices(examples, batch_size, None):
        inputs, targets = take(examples, rows)
        with torch.no_grad():
            accuracy[rows] = example_accuracy(predict(inputs), targets).float()
    scored = ~accuracy.isnan()
    result = {"all": accuracy[scored].mean().item()}
    for s, name in enumerate(examples.slice_names):
        in_slice = scored & (examples.slices == s)
        result[name] = accuracy[in_slice].mean().item()
    return result


class Task:
    """Data for one experiment, built from a typed config. Subclasses set `vocab_size` and
    `seq_len` (the longest T any split yields) and implement `batches`."""

    Config: ClassVar[type[Config]] = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    splits: ClassVar[tuple[str, str]] = ("train", "test")  # (training split, held-out split)
    # "next_token": a causal LM predicts targets[t] from inputs[:t+1]. "autoencode" (MAD's
    # compression): every target must be decoded from the hidden state at the last position.
    objective: ClassVar[str] = "next_token"
    vocab_size: int
    seq_len: int

    def __init__(self, config: Config | None = None):
        self.config = self.Config.for_component(type(self), config)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.splits)}")

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        raise NotImplementedError


class SyntheticTask(Task):
    """A task with fixed example sets, drawn from seeds derived from (config.seed, split).
    Subclasses implement `generate(split)`."""

    def __init__(self, config: Config | None = None):
        super().__init__(config)
        self._data: dict[str, Examples] = {}

    def generate(self, split: str) -> Examples:
        raise NotImplementedError

    def dataset(self, split: str) -> Examples:
        """The split's examples, generated on first use."""
        self.check_split(split)
        if split not in self._data:
            self._data[split] = self.generate(split)
        return self._data[split]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        """Training split: endless shuffled minibatches, their order set by `seed`. Held-out
        split: one pass in order (`seed` unused). A batch never mixes slices."""
        check_batch_size(batch_size)
        examples = self.dataset(split)
        gen = generator(seed, "batches") if split == self.splits[0] else None
        return (take(examples, rows) for rows in batch_indices(examples, batch_size, gen))
