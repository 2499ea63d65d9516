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


QKV_CASES = [(n, v) for n, v in CASES if {"q", "k", "v"} <= set(inputs(n, v, 4, B=1))]


@pytest.mark.parametrize(("name", "variant"), QKV_CASES)
def test_autocast_promotes_q_k_v_of_mixed_dtypes(name, variant):
    """Under autocast a mixer may hand an op a bf16 q and v (its projections) beside a float32
    k (a float32 bias added): the op promotes them to float32, as autocast's promote ops do.
    Outside autocast the same call is the caller's error."""
    fam = family(name)
    x = inputs(name, variant, 40, dtype=torch.float32)
    kwargs = {"output_final_state": True} if fam.stateful else {}
    fast = fam.forms[fam.fast]
    want = fast(**x, **kwargs)
    mixed = {**x, "q": x["q"].bfloat16(), "v": x["v"].bfloat16()}
    with pytest.raises(TypeError, match="share one dtype"):
        fast(**mixed, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(**mixed, **kwargs)
    got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
    if name == "attention":  # SDPA, which autocast puts in bf16: q, k, v go there together
        assert got[0].dtype == torch.bfloat16
        torch.testing.assert_close(got[0].float(), want[0], rtol=0.05, atol=0.05)
        return
    assert got[0].dtype == torch.float32
    exact = {**x, "q": mixed["q"].float(), "v": mixed["v"].float()}
    ref = fast(**exact, **kwargs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)


# forms whose backward is written by hand, and the form the refusal names instead
HAND_WRITTEN = [
    ("mlstm", "default", "chunk", "parallel"),
    ("slstm", "sigmoid", "fused", "recurrent"),
    ("selective_scan", None, "scan", "chunk"),
]


def leaf(t):
    """A fresh leaf of a floating input (others, like sLSTM's forget-gate name, as they are)."""
    return t.clone().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t


@pytest.mark.parametrize(("name", "variant", "form", "instead"), HAND_WRITTEN)
def test_a_hand_written_backward_refuses_to_be_differentiated_again(name, variant, form, instead):
    """create_graph=True (a gradient penalty) through a hand-written backward is a clear error
    naming a form that can do it; it once gave a silent zero (mlstm) or a torch error (slstm)."""
    fam = family(name)
    variant = variant or fam.variants[0]
    x = inputs(name, variant, 9)
    first = next(iter(x))

    def penalty_grad(f):
        xs = {n: leaf(t) for n, t in x.items()}
        out = f(**xs)
        o = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(o.square().sum(), xs[first], create_graph=True)
        wrt = [t for t in xs.values() if torch.is_tensor(t) and t.requires_grad]
        return torch.autograd.grad(g.square().sum(), wrt, allow_unused=True, materialize_grads=True)

    with pytest.raises(RuntimeError, match=f"use form='{instead}'"):
        penalty_grad(fam.forms[form])
    ref = penalty_grad(fam.forms[fam.reference])
    got = penalty_grad(fam.forms[instead])
    for a, b in zip(got, ref, strict=True):  # to round-off of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()) + 1e-12)
    # a plain backward is unchanged
    xs = {n: leaf(t) for n, t in x.items()}
    out = fam.forms[form](**xs)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert torch.isfinite(xs[first].grad).all()


ALL_FORMS = [(name, v, form) for name, v in CASES for form in family(name).forms]


@pytest.mark.parametrize(("name", "variant", "form"), ALL_FORMS)
def test_an_empty_batch_stays_in_the_graph(name, variant, form):
    """B = 0 with inputs that require grad: an empty output a loss can be backpropagated through
    (empty gradients), as with rows; once the chunk forms returned a detached tensor."""
    x = {n: leaf(t) for n, t in inputs(name, variant, 5, B=0).items()}
    fam = family(name)
    out = fam.forms[form](**x, **({"output_final_state": True} if fam.stateful else {}))
    o = out[0] if isinstance(out, tuple) else out
    assert o.shape[0] == 0 and o.requires_grad
    o.sum().backward()
    for n, t in x.items():
        if torch.is_tensor(t) and t.requires_grad and t.grad is not None:
            assert t.grad.shape == t.shape and not t.grad.any(), n
