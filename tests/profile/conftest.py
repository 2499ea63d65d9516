"""Helpers shared by the profile tests: FLOP counting as torch counts it, seeded single thread.

`count_flops` runs under FlopCounterMode with SDPA forced onto its math backend: the counter has
no formula for torch's fused CPU attention kernel and would count it as 0, while the math
backend's bmm calls it counts in full (the dense T × T score matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_flops(fn: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()
