"""Small mixer cases shared by the mixer tests: one or more per registered mixer.

Shape letters: B batch, T length, D model width. Recurrent cases use chunk_size 16, so T = 40
runs several chunks and the split points below fall inside chunks.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import build_mixer

D = 32
B = 2
T = 40
# id → (registry name, options)
CASES: dict[str, tuple[str, dict]] = {
    "attn": ("attn", {"num_heads": 4, "num_kv_heads": 2}),
    "attn_window": ("attn", {"num_heads": 4, "num_kv_heads": 2, "window": 5}),
    "linear_attn": ("linear_attn", {"num_heads": 2, "chunk_size": 16}),
    "linear_attn_hedgehog": (
        "linear_attn",
        {"num_heads": 2, "feature_map": "hedgehog", "hedgehog_dim": 8, "chunk_size": 16},
    ),
    "linear_attn_taylor": (
        "linear_attn",
        {"num_heads": 4, "expand_k": 0.5, "feature_map": "taylor", "chunk_size": 16},
    ),
    "retnet": ("retnet", {"num_heads": 2, "chunk_size": 16}),
    "gla": ("gla", {"num_heads": 2, "chunk_size": 16}),
    "mamba2": ("mamba2", {"head_dim": 16, "d_state": 8, "chunk_size": 16}),
    "deltanet": ("deltanet", {"num_heads": 2, "chunk_size": 16}),
    "deltanet_gate": ("deltanet", {"num_heads": 2, "use_output_gate": True, "chunk_size": 16}),
    "gdn": ("gdn", {"num_heads": 2, "head_dim": 16, "chunk_size": 16}),
    "gdn_neg_eigval": (
        "gdn",
        {"num_heads": 2, "head_dim": 16, "allow_neg_eigval": True, "chunk_size": 16},
    ),
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
