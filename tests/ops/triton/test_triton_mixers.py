"""Every recurrent mixer through the Triton kernels agrees with the same mixer on PyTorch: the
ops' own tests cover the kernels, these cover the calls the mixers really make (their head dims,
gate kinds and dtypes, chunk sizes, states carried from prefill to decode), so a GPU run of a
model meets no call that CI has not run.

`ops.default_backend` switches the mixers' backend="auto" calls; on CPU the kernels run in
Triton's interpreter. Run: .venv/bin/python -m pytest tests/ops/triton/test_triton_mixers.py -q
"""

from __future__ import annotations

import pytest
import torch

from seqlab import ops
from seqlab.ops.triton import api
from tests.mixers.conftest import make_mixer, make_x
from tests.mixers.test_mixers import CHUNKED
from tests.ops.triton.conftest import DEVICE, INTERPRETER_MARKS

pytestmark = INTERPRETER_MARKS

RECURRENT = CHUNKED  # the mixers on the ops with Triton kernels
PREFILL = 33  # three chunks of 16, the last one partial


def run(mixer, x, backend):
    """Prefill (chunk form) with gradients of every parameter, then two decode steps."""
    mixer.zero_grad()
    with ops.default_backend(backend):
        y, state = mixer(x[:, :PREFILL])
        y.square().sum().backward()
        with torch.no_grad():
            steps = []
            for t in (PREFILL, PREFILL + 1):
                y_t, state = mixer(x[:, t : t + 1], state)
                steps.append(y_t)
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    return y.detach(), torch.cat(steps, 1), state, grads


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    for name in ("gated_linear", "delta_rule"):
        fn = getattr(api, name)

        def spy(*args, _fn=fn, **kwargs):
            calls.append(args[-2])  # the form
            return _fn(*args, **kwargs)

        monkeypatch.setattr(api, name, spy)
    return calls


@pytest.mark.parametrize("case", RECURRENT)
def test_mixer_on_triton_matches_pytorch(case, kernel_calls):
    mixer = make_mixer(case).to(DEVICE)
    x = make_x().to(DEVICE)
    ref = run(mixer, x, "torch")
    assert kernel_calls == []
    got = run(mixer, x, "triton")
    assert kernel_calls == ["chunk", "recurrent", "recurrent"]
    for what, a, b in zip(("prefill", "decode"), got[:2], ref[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{case} {what}")
    for key in ref[2]:
        torch.testing.assert_close(got[2][key], ref[2][key], rtol=1e-4, atol=1e-5)
    for name, g in ref[3].items():
        scale = g.abs().max().item()
        err = (got[3][name] - g).abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-3), f"{case} d{name}: {err:.2e} (max |ref| {scale:.2e})"


def test_default_backend_is_scoped_and_checked():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton'"):
        with ops.default_backend("cuda"):
            pass
    mixer, x = make_mixer("gdn"), make_x()
    with ops.default_backend("triton"):
        with ops.default_backend("torch"):
            y_torch, _ = mixer(x)
        with pytest.raises(ValueError, match="recurrent form is forward-only"):
            mixer(x[:, :1], mixer.init_state(x.shape[0]))  # a decode step with autograd on
    y_auto, _ = mixer(x)  # back to "auto": PyTorch for CPU tensors
    assert torch.equal(y_auto, y_torch)
