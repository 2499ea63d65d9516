"""The suite every registered op family goes through (seqlab.ops.registry): each form against
the family's reference in float64, forward and backward (initial state included where the family
has a state), the final state, its FLOP formula's matmul part against torch's FlopCounterMode, and
the declared state bytes against the state a form returns. Families' own files test the rest."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seqlab.ops.registry import FORMS, families, family

CASES = [(name, v) for name, fam in families().items() for v in fam.variants]
FORM_CASES = [
    (name, v, form)
    for name, v in CASES
    for form in family(name).forms
    if form != family(name).reference
]


def small_dims(fam) -> dict[str, int]:
    """The family's dims scaled down for float64 tests (at least 2 each)."""
    return {k: max(2, min(d, 8)) for k, d in fam.dims.items()}


def inputs(name, variant, T, seed=0, dtype=torch.float64, B=2):
    fam = family(name)
    gen = torch.Generator().manual_seed(seed)
    return fam.make_inputs(variant, B, T, 3, dtype=dtype, generator=gen, **small_dims(fam))


def tensors(S) -> list[torch.Tensor]:
    """The tensors of a state: one tensor, or a tuple of them (an LSTM's (h, c))."""
    if S is None:
        return []
    return [S] if torch.is_tensor(S) else [t for t in S if torch.is_tensor(t)]


def like(S, fn):
    """fn applied to each tensor of a state, keeping its structure."""
    return fn(S) if torch.is_tensor(S) else tuple(fn(t) for t in S)


def initial_state(fam, x, o_and_state):
    """A random state shaped like the one the reference returns."""
    gen = torch.Generator().manual_seed(7)
    return like(o_and_state[1], lambda S: torch.randn(S.shape, generator=gen, dtype=S.dtype))


def run(fn, x, S0, stateful):
    x = {
        n: t.clone().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t
        for n, t in x.items()
    }
    if S0 is not None:
        S0 = like(S0, lambda t: t.clone().requires_grad_())
    if stateful:
        o, S = fn(**x, initial_state=S0, output_final_state=True)
    else:
        o, S = fn(**x)
    gen = torch.Generator().manual_seed(3)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for t in tensors(S):
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
    leaves = [t for t in x.values() if torch.is_tensor(t) and t.requires_grad] + tensors(S0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return o, S, grads


def test_every_family_declares_known_forms_and_a_reference():
    for fam in families().values():
        assert set(fam.forms) <= set(FORMS)
        assert fam.reference in fam.forms and fam.fast in fam.forms
        assert fam.variants and fam.dims


@pytest.mark.parametrize(("name", "variant", "form"), FORM_CASES)
@pytest.mark.parametrize("T", [1, 23, 70])
def test_form_equals_the_reference_in_float64(name, variant, form, T):
    fam = family(name)
    x = inputs(name, variant, T)
    S0 = None
    if fam.stateful:
        S0 = initial_state(fam, x, fam.forms[fam.reference](**x, output_final_state=True))
    o, S, g = run(fam.forms[form], x, S0, fam.stateful)
    o_ref, S_ref, g_ref = run(fam.forms[fam.reference], x, S0, fam.stateful)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    if tensors(S_ref):
        torch.testing.assert_close(tensors(S), tensors(S_ref), rtol=1e-9, atol=1e-9)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_state_bytes_are_the_returned_state(name, variant):
    fam = family(name)
    if not fam.stateful:
        pytest.skip("no state")
    T = 40
    x = inputs(name, variant, T, dtype=torch.float32)
    S = fam.forms[fam.fast](**x, output_final_state=True)[1]
    held = sum(t.numel() * t.element_size() for t in tensors(S))
    per_sequence = fam.state_bytes(variant, T, 3, **small_dims(fam))
    assert held == 2 * per_sequence


@pytest.mark.parametrize(("name", "variant"), CASES)
@pytest.mark.parametrize("T", [1, 64, 100])
def test_flop_formula_matches_the_counter(name, variant, T):
    fam = family(name)
    if name == "attention":  # tests/profile/test_cost.py holds it inside the mixer
        pytest.skip("FlopCounterMode counts nothing for this CPU SDPA call (0 measured)")
    # One sequence: the formulas count a sequence's work, and work on the parameters alone (an
    # LTI family's kernel) is done once per batch, not once per sequence.
    x = inputs(name, variant, T, dtype=torch.float32, B=1)
    for form in fam.forms:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fam.forms[form](**x, **({"output_final_state": True} if fam.stateful else {}))
        counted = counter.get_total_flops()
        expected = fam.flops(variant, form, T, 3, **small_dims(fam)).matmul
        assert counted == expected, form


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_a_bf16_autocast_leaves_the_fast_form_in_float32(name, variant):
    """Under torch.autocast (bf16 training) a form computes in its own dtype: float32 inputs
    give exactly the float32 result (autocast would put its inner products in bf16)."""
    fam = family(name)
    if name == "attention":
        pytest.skip("attention runs SDPA, which autocast is meant to put in bf16")
    x = inputs(name, variant, 40, dtype=torch.float32)
    fast = fam.forms[fam.fast]
    kwargs = {"output_final_state": True} if fam.stateful else {}
    want = fast(**x, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(**x, **kwargs)
    for a, b in zip(got, want, strict=True):
        if torch.is_tensor(b):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
