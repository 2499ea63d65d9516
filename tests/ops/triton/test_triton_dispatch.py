"""The `backend` argument of gated_linear / delta_rule: what "auto" picks, what "triton" refuses
with a reason, and that the Triton path keeps the ops' contract (argument errors, dtypes, scale,
final_state only when asked, inputs untouched).

Run: .venv/bin/python -m pytest tests/ops/triton/test_triton_dispatch.py -q
"""

from __future__ import annotations

import warnings

import pytest
import torch

from seqlab.ops.delta_rule import chunk_delta_rule, delta_rule
from seqlab.ops.gated_linear import chunk_gated_linear, gated_linear
from tests.ops.conftest import make_inputs, run_grads
from tests.ops.triton.conftest import (
    DEVICE,
    INTERPRET,
    INTERPRETER_MARKS,
    TOL,
    assert_run_close,
    on_device,
)

pytestmark = INTERPRETER_MARKS


def gl_inputs(dtype=torch.float32, **kw):
    return on_device(make_inputs(1, 20, 2, 8, 12, gate="scalar", seed=1, **kw), dtype)


def dr_inputs(dtype=torch.float32, **kw):
    return on_device(make_inputs(1, 20, 2, 8, 12, gate="scalar", beta="unit", seed=1, **kw), dtype)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU machine 'auto' picks Triton for CUDA tensors")
def test_auto_runs_pytorch_on_cpu_tensors():
    x = make_inputs(1, 20, 2, 8, 12, gate="channel", initial_state=True)
    o, s = gated_linear(**x, output_final_state=True)
    o_ref, s_ref = chunk_gated_linear(**x, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    x = make_inputs(1, 20, 2, 8, 12, gate="scalar", beta="unit")
    assert torch.equal(delta_rule(**x)[0], chunk_delta_rule(**x)[0])


@pytest.mark.parametrize("op, inputs", [(gated_linear, gl_inputs), (delta_rule, dr_inputs)])
def test_torch_and_triton_backends_agree(op, inputs):
    x = inputs(initial_state=True)
    o, s = op(**x, output_final_state=True, backend="triton")
    o_ref, s_ref = op(**x, output_final_state=True, backend="torch")
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, inputs", [(gated_linear, gl_inputs), (delta_rule, dr_inputs)])
def test_unknown_backend(op, inputs):
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton'"):
        op(**inputs(), backend="cuda")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"form": "parallel"}, "no parallel form"),
        ({"chunk_size": 24}, "chunk_size must be one of"),
        ({"dtype": torch.float64}, "float16, bfloat16 or float32"),
        ({"grad": True, "form": "recurrent"}, "forward-only"),
        ({"K": 320}, "at most 256"),
    ],
    ids=["parallel", "chunk_size", "float64", "recurrent-grad", "K"],
)
@pytest.mark.parametrize("family", ["gated_linear", "delta_rule"])
def test_triton_refuses_with_a_reason(family, change, match):
    change = dict(change)
    dtype = change.pop("dtype", torch.float32)
    K = change.pop("K", 8)
    beta = "unit" if family == "delta_rule" else None
    x = on_device(make_inputs(1, 20, 2, K, 12, gate="scalar", beta=beta, seed=1), dtype)
    if change.pop("grad", False):
        x["q"].requires_grad_(True)
    op = gated_linear if family == "gated_linear" else delta_rule
    with pytest.raises(ValueError, match=f"backend='triton' cannot run this call: .*{match}"):
        op(**x, backend="triton", **change)


def test_argument_errors_come_first():
    x = gl_inputs()
    x["g"] = x["g"].abs() + 0.1
    with pytest.raises(ValueError, match="g is a log-space decay"):
        gated_linear(**x, backend="triton")
    x = dr_inputs()
    x["beta"] = x["beta"] + 1.0
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        delta_rule(**x, backend="triton")
    x = gl_inputs()
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 20"):
        gated_linear(**x, backend="triton", cu_seqlens=[0, 5, 19])


@pytest.mark.parametrize("op, inputs", [(gated_linear, gl_inputs), (delta_rule, dr_inputs)])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_output_contract(op, inputs, form):
    x = inputs(torch.float16, initial_state=True)
    before = {n: t.clone() for n, t in x.items()}
    o, s = op(**x, backend="triton", form=form)
    assert s is None and o.dtype == torch.float16 and o.shape == (1, 20, 2, 12)
    assert o.device.type == DEVICE
    o2, s2 = op(**x, backend="triton", form=form, scale=0.25, output_final_state=True)
    assert s2.dtype == torch.float32 and s2.shape == (1, 2, 8, 12)
    ratio = 0.25 / 8**-0.5
    tol = TOL[torch.float16]["o"] * o.abs().max().item() * ratio
    torch.testing.assert_close(o2.float(), o.float() * ratio, rtol=0, atol=tol)
    for n, t in x.items():
        assert torch.equal(t, before[n]), f"{n} was modified in place"


@pytest.mark.parametrize("op, inputs", [(gated_linear, gl_inputs), (delta_rule, dr_inputs)])
def test_gradients_without_final_state(op, inputs):
    """No final state asked for: the backward starts from a zero state gradient; an initial
    state that needs no gradient gets none."""
    x = inputs(initial_state=True)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = {n: t.clone().requires_grad_(n != "initial_state") for n, t in x.items()}
        o, s = op(**leaves, backend=backend)
        assert s is None
        (o * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum().backward()
        assert leaves["initial_state"].grad is None
        grads[backend] = {n: t.grad for n, t in leaves.items() if n != "initial_state"}
    for n, g in grads["triton"].items():
        torch.testing.assert_close(g, grads["torch"][n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize(
    "family, gate",
    [("gated_linear", g) for g in ("scalar", "channel", None)]
    + [("delta_rule", g) for g in ("scalar", None)],
)
def test_value_heads_wider_than_256(family, gate):
    """V is tiled in every kernel, so only K is bounded: gdn at d_model 1024 has K = 256 and
    V = 512, and must not fall back to PyTorch on a GPU. Chunk (with gradients) and decode."""
    beta = "unit" if family == "delta_rule" else None
    x = on_device(
        make_inputs(1, 20, 2, 16, 320, gate=gate, beta=beta, initial_state=True), torch.float32
    )
    op = gated_linear if family == "gated_linear" else delta_rule
    got = run_grads(op, x, backend="triton")
    ref = run_grads(op, x, backend="torch")
    assert_run_close(got, ref, TOL[torch.float32], label=f"{family} {gate}")
    step = {n: t[:, :1] if t.dim() > 1 and n != "initial_state" else t for n, t in x.items()}
    o, s = op(**step, form="recurrent", output_final_state=True, backend="triton")
    o_ref, s_ref = op(**step, form="recurrent", output_final_state=True, backend="torch")
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_auto_on_a_gpu_says_once_why_it_falls_back(monkeypatch):
    """On CUDA tensors "auto" runs Triton where it can; where it cannot (here chunk size 128) it
    runs PyTorch and warns once per reason, so a model never leaves the kernels silently."""
    import seqlab.ops.triton as backend

    monkeypatch.setattr(backend, "_on_gpu", lambda x: True)  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(backend, "_WARNED", set())
    x = dr_inputs()
    with pytest.warns(UserWarning, match="runs the PyTorch chunk form.*chunk_size must be one of"):
        o, _ = delta_rule(**x, chunk_size=128)
    torch.testing.assert_close(o, chunk_delta_rule(**x, chunk_size=128)[0], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        delta_rule(**x, chunk_size=128)  # the same reason: no second warning
        o, _ = delta_rule(**x)  # supported: Triton, no warning
    torch.testing.assert_close(o, delta_rule(**x, backend="triton")[0], rtol=0, atol=0)


def test_describe_backend_names_the_choice(monkeypatch):
    import seqlab.ops.triton as backend

    x = dr_inputs()
    tensors = (x["q"], x["k"], x["v"], x["beta"], x["g"])
    expected = "torch" if INTERPRET else "triton"  # "auto": Triton only for CUDA tensors
    assert backend.describe_backend("chunk", 64, tensors) == expected
    monkeypatch.setattr(backend, "_on_gpu", lambda x: True)
    assert backend.describe_backend("chunk", 64, tensors) == "triton"
    assert backend.describe_backend("chunk", 128, tensors).startswith(
        "torch (because chunk_size must be one of (16, 32, 64), got 128)"
    )
    assert backend.describe_backend("chunk", 64, tensors, backend="torch") == "torch"


def launches(monkeypatch, fn) -> dict[str, set[int]]:
    """num_warps of each kernel fn launches: {name without "_kernel": {warps}}."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: dict[str, set[int]] = {}
    for cls in (JITFunction, InterpretedFunction):
        run = cls.run

        def spy(self, *args, _run=run, **kwargs):
            name = self.fn.__name__.removesuffix("_kernel")
            seen.setdefault(name, set()).add(kwargs.get("num_warps"))
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", spy)
    fn()
    return seen


def test_warps_can_be_set_per_kernel_from_the_environment(monkeypatch):
    from seqlab.ops.triton import _meta, chunk, delta, gla, recurrent

    # every name the variable takes is a kernel
    modules = (chunk, delta, gla, recurrent)
    for name in _meta.KERNELS:
        assert any(hasattr(m, f"{name}_kernel") for m in modules), name

    def step():
        x = {n: t.requires_grad_() for n, t in dr_inputs().items()}
        o, _ = delta_rule(**x, backend="triton", chunk_size=16)
        o.sum().backward()

    default = launches(monkeypatch, step)
    assert default["wy_bwd"] == {8} and default["chunk_bwd_dqk"] == {4}, default
    monkeypatch.setenv(_meta.WARPS_ENV, "wy_bwd=2, chunk_bwd_dqk=8")
    changed = launches(monkeypatch, step)
    assert changed["wy_bwd"] == {2} and changed["chunk_bwd_dqk"] == {8}, changed
    assert changed["wy_fwd"] == default["wy_fwd"] == {4}


@pytest.mark.parametrize("spec", ["wy_bwd=3", "wy_bwd", "nope=4", "wy_bwd=4;chunk_fwd_h=2"])
def test_bad_warps_settings_are_named(monkeypatch, spec):
    from seqlab.ops.triton import _meta

    monkeypatch.setenv(_meta.WARPS_ENV, spec)
    with pytest.raises(ValueError, match="SEQLAB_TRITON_WARPS takes kernel=warps pairs"):
        _meta.warps("wy_bwd", 8)
