"""Loaded before every other conftest and test module, whatever paths pytest is given.

Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton picks interpreter or
compiler when a function is decorated, its own library functions included, so Triton and
seqlab's kernels (seqlab.ops.triton.api) are imported here with TRITON_INTERPRET=1, before
anything else can import Triton (torch.utils.flop_counter does, for one); the variable itself is
set only while Triton is imported and, by a fixture, during the tests of tests/ops/triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = not torch.cuda.is_available()


def _import_kernels() -> None:
    if INTERPRET and "triton" in sys.modules:
        raise RuntimeError(
            "Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1 "
            "(by a pytest plugin?); the Triton tests need it set at Triton's first import"
        )
    before = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import seqlab.ops.triton.api  # noqa: F401
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


if HAVE_TRITON:
    _import_kernels()

# Typer's rich errors are boxed as wide as the terminal (80 columns without one), so a long
# temporary path in a message would wrap mid-path and a test searching the output for it would
# depend on where pytest puts its temporary folders. Typer reads TERMINAL_WIDTH when it first
# formats an error (pytest's own output keeps COLUMNS).
os.environ["TERMINAL_WIDTH"] = "1000"
