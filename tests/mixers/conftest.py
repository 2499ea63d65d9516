"""Small mixer cases shared by the mixer tests: the examples every registered mixer declares.

Shape letters: B batch, T length, D model width. Recurrent cases use chunk_size 16, so T = 40
runs several chunks and the split points below fall inside chunks.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import MIXERS, build_mixer

D = 32
B = 2
T = 40
# id → (registry name, options): the examples each registered mixer declares (TokenMixer.examples)
CASES: dict[str, tuple[str, dict]] = {
    case: (name, options) for name, cls in MIXERS.items() for case, options in cls.examples.items()
}


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


def make_mixer(case: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    name, options = CASES[case]
    torch.manual_seed(seed)
    return build_mixer(name, D, **options).to(dtype)


def make_x(T: int = T, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype)
