"""Helpers for the Triton backend tests: where the kernels run, and how runs are compared.

Without a GPU the kernels run in Triton's CPU interpreter: tests/conftest.py imports Triton and
seqlab's kernels with TRITON_INTERPRET=1 before anything else can import Triton, and an autouse
fixture sets it during each test of this directory; the other tests run without it. The
interpreter computes tl.dot on bfloat16 wrongly, so on CPU the tests take float32 and float16; on
a GPU bfloat16 is added.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import HAVE_TRITON, INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])

if not HAVE_TRITON:
    collect_ignore_glob = ["test_*.py"]  # Triton ships for Linux only (the test extra)


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def on_device(x: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs in `dtype` on DEVICE; initial_state stays float32 (the state dtype)."""
    return {n: t.to(DEVICE, torch.float32 if n == "initial_state" else dtype) for n, t in x.items()}


def reference_inputs(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same (rounded) values in float64 on the CPU, for the recurrent reference."""
    return {n: t.detach().cpu().double() for n, t in x.items()}


def assert_run_close(run, ref, tol: dict[str, float], label: str = "", grad_scale=None):
    """o, final state and every gradient finite and within tol ("o", "state", "grad") × the
    largest |reference| value of that tensor; grad_scale replaces the latter for gradients (d/dg
    under extreme gates is a sum of O(1) terms that cancel to ≈ 0)."""
    o, s, grads = run
    o_ref, s_ref, grads_ref = ref

    def close(a, b, t, what, scale=None):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        assert torch.isfinite(a).all(), f"{label} {what} is not finite"
        err = (a - b).abs().max().item()
        scale = b.abs().max().item() if scale is None else scale
        assert err <= t * scale, f"{label} {what}: max error {err:.3g} > {t} × {scale:.3g}"

    close(o, o_ref, tol["o"], "o")
    close(s, s_ref, tol["state"], "final_state")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        close(grads[name], grads_ref[name], tol["grad"], f"d/d{name}", grad_scale)


# Tolerances against the float64 recurrent reference on the same rounded inputs, relative to the
# largest |reference| value of each tensor. float32: round-off (measured ≤ 3e-7). Half inputs: the
# state accumulates in float32, but the tensor-core products take operands in the input dtype
# (decayed keys, the pseudo-values U, the per-chunk states), so the final state is within ≈ 1e-3
# (measured fp16 ≤ 9e-4), not the 1e-4 of the PyTorch chunk form; o and gradients ≤ 9e-4.
TOL = {
    torch.float32: {"o": 1e-5, "state": 1e-5, "grad": 1e-5},
    torch.float16: {"o": 3e-3, "state": 3e-3, "grad": 3e-3},
    torch.bfloat16: {"o": 2e-2, "state": 2e-2, "grad": 2e-2},
}
# float32 under log-decay −30: b reaches −1920 in a chunk of 64, which costs float32 ≈ 2e-4
# absolute in each exponent (as for the PyTorch chunk form, tests/ops/test_gated_linear.py).
EXTREME = {"o": 2e-3, "state": 2e-3, "grad": 2e-3}

# Any numpy overflow or invalid value inside the interpreter fails the test: a kernel must never
# exponentiate a positive number, not even in lanes it masks out. The interpreter's own use of a
# loop bound as an index warns on numpy ≥ 1.25 and is ignored.
INTERPRETER_MARKS = [
    pytest.mark.filterwarnings("error::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
