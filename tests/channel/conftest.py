"""Every channel test starts from the same torch seed, so a failure replays exactly."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
