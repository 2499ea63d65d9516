"""Helpers shared by the op tests: seeded inputs, a naive float64 loop, runs that collect gradients.

Shape letters: B batch, T length, H heads, K key dim, V value dim, N packed sequences.
Every tensor comes from a torch.Generator seeded by the test, so a failure replays exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

FORMS = ("recurrent", "chunk", "parallel")
# float64 agreement between forms: round-off only (MATH.md measured ≈ 1e-16 relative).
F64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Seed torch; run on one thread. These tensors are tiny: intra-op threads only add sync
    cost, and on a busy 2-core machine they made the op tests 5x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    gate: str | None = None,
    gate_fill: str | None = None,
    beta: str | None = None,
    beta_fill: float | str | None = None,
    initial_state: bool = False,
    N: int | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for an op: q, k (L2-normalised), v, and optionally g, beta, initial_state.

    gate: None, "scalar" [B, T, H] or "channel" [B, T, H, K]; gate_fill: None (random decays),
    "zero", "-30" or "mix" (each entry −30, 0 or random). beta: None, "unit" (in [0, 1]) or "neg"
    (in [0, 2]); beta_fill: a constant, "bounds" (each entry at a bound ± 1e-6) or None (uniform).
    initial_state has N (default B) rows. Tensors are generated in float64, then cast to `dtype`,
    except initial_state which is float32 for half inputs (the state dtype).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
    }
    if beta is not None:
        hi = 2.0 if beta == "neg" else 1.0
        if beta_fill is None:
            b = rand(B, T, H) * hi
        elif beta_fill == "bounds":
            choices = torch.tensor([1e-6, 1 - 1e-6, hi - 1e-6], dtype=torch.float64)
            b = choices[torch.randint(0, 3, (B, T, H), generator=gen)]
        else:
            b = torch.full((B, T, H), float(beta_fill), dtype=torch.float64)
        x["beta"] = b
    if gate is not None:
        shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
        # Mostly mild decay (median ≈ −0.05) with a tail of strong decay, so long-range terms count.
        g = F.logsigmoid(2 * randn(*shape) + 3)
        if gate_fill == "zero":
            g = torch.zeros(shape, dtype=torch.float64)
        elif gate_fill == "-30":
            g = torch.full(shape, -30.0, dtype=torch.float64)
        elif gate_fill == "mix":
            pick = torch.randint(0, 3, shape, generator=gen)
            g = torch.where(pick == 0, -30.0, torch.where(pick == 1, 0.0, g))
        x["g"] = g
    x = {name: t.to(dtype) for name, t in x.items()}
    if initial_state:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x["initial_state"] = randn(N or B, H, K, V).to(state_dtype)
    return x


def weights_like(o: torch.Tensor, state: torch.Tensor, seed: int):
    """Seeded float64 loss weights on o's device (drawn on the CPU: the same values on any
    device, so a GPU run and its CPU reference get the same ones)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ws = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    return wo.to(o.device), ws.to(state.device)


def run_grads(fn, x: dict[str, torch.Tensor], seed: int = 0, **kwargs):
    """Run fn(**x, output_final_state=True) and differentiate a seeded random weighted sum of
    o and the final state with respect to every input. Returns (o, state, {name: grad})."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in x.items()}
    o, state = fn(**leaves, output_final_state=True, **kwargs)
    wo, ws = weights_like(o, state, seed)
    loss = (o.double() * wo).sum() + (state.double() * ws).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), state.detach(), dict(zip(leaves, grads, strict=True))


def assert_same_run(actual, expected, rtol: float, atol: float, label: str = "") -> None:
    """Compare (o, state, grads) triples from `run_grads`, naming what differs."""
    o, s, grads = actual
    o_ref, s_ref, grads_ref = expected
    torch.testing.assert_close(o, o_ref, rtol=rtol, atol=atol, msg=lambda m: f"{label} o: {m}")
    torch.testing.assert_close(
        s, s_ref, rtol=rtol, atol=atol, msg=lambda m: f"{label} final_state: {m}"
    )
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name],
            grads_ref[name],
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{label} d/d{name}: {m}",
        )


def assert_finite_run(run, label: str = "") -> None:
    o, s, grads = run
    assert torch.isfinite(o).all(), f"{label} o is not finite"
    assert torch.isfinite(s).all(), f"{label} final_state is not finite"
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{label} d/d{name} is not finite"


def assert_float32_run_close(run, ref, tol: float, label: str = "") -> None:
    """A float32 run (o, state, grads) finite and within `tol` of the float64 reference: relative
    elementwise, or absolute against the largest |reference| value of o, of the state, and of all
    gradients together (gradients of very different sizes share one scale)."""
    assert_finite_run(run, label)
    o, s, grads = run
    o_ref, s_ref, grads_ref = ref
    assert o.dtype == s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=tol, atol=tol * o_ref.abs().max())
    torch.testing.assert_close(s.double(), s_ref, rtol=tol, atol=tol * s_ref.abs().max())
    scale = max(grad.abs().max() for grad in grads_ref.values())
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad.double(), grads_ref[name], rtol=tol, atol=tol * scale, msg=f"{label} d/d{name}"
        )


# Tolerances against the float64 recurrent reference run on the same (rounded) inputs, relative
# to the largest |reference| value: the output is rounded to the input dtype once (bf16 ≈ 4e-3,
# fp16 ≈ 5e-4 relative); the float32 state accumulates in float32 (≈ 1e-6; half-precision
# accumulation would show ≈ 1e-3). Measured worst cases: o 3e-3 / 4e-4, gradients 4e-3 / 6e-4.
LOW_PRECISION = {
    torch.bfloat16: {"o": 2e-2, "state": 1e-4, "grad": 2e-2},
    torch.float16: {"o": 3e-3, "state": 1e-4, "grad": 3e-3},
    torch.float32: {"o": 1e-5, "state": 1e-5, "grad": 1e-5},
}


def assert_close_to_scale(actual, expected, tol, what):
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × max |ref| {scale:.3g}"


def naive_gated_linear(q, k, v, g=None, scale=None, initial_state=None, output_final_state=True):
    """The recurrence exactly as written, one (b, h) at a time, in float64."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S_out = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, v.shape[-1], dtype=torch.float64)
            if initial_state is not None:
                S = initial_state[b, h].double()
            for t in range(T):
                if g is not None:
                    d = g[b, t, h].double().exp()
                    S = d[:, None] * S if d.dim() else d * S  # diag(exp(g_t)) S
                S = S + torch.outer(k[b, t, h].double(), v[b, t, h].double())
                o[b, t, h] = scale * S.T @ q[b, t, h].double()
            S_out[b, h] = S
    return o, S_out


def naive_delta_rule(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=True
):
    """S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, one (b, h) at a time, float64."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    eye = torch.eye(K, dtype=torch.float64)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S_out = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, v.shape[-1], dtype=torch.float64)
            if initial_state is not None:
                S = initial_state[b, h].double()
            for t in range(T):
                kt, bt = k[b, t, h].double(), beta[b, t, h].double()
                a = 1.0 if g is None else g[b, t, h].double().exp()
                S = a * (eye - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(
                    kt, v[b, t, h].double()
                )
                o[b, t, h] = scale * S.T @ q[b, t, h].double()
            S_out[b, h] = S
    return o, S_out


def two_pass(first, second, t: int):
    """An op that runs `first` on [0, t) and hands its final state to `second` on [t, T)."""

    def fn(initial_state=None, output_final_state=True, **x):
        o1, s1 = first(
            **{n: a[:, :t] for n, a in x.items()},
            initial_state=initial_state,
            output_final_state=True,
        )
        o2, s2 = second(
            **{n: a[:, t:] for n, a in x.items()},
            initial_state=s1,
            output_final_state=output_final_state,
        )
        return torch.cat([o1, o2], 1), s2

    return fn


def one_by_one(op, cu: list[int]):
    """An op that runs each packed sequence [cu[n], cu[n+1]) alone; states stacked as [N, ...]."""

    def fn(initial_state=None, output_final_state=True, **x):
        outs, states = [], []
        for n in range(len(cu) - 1):
            piece = {name: a[:, cu[n] : cu[n + 1]] for name, a in x.items()}
            init = None if initial_state is None else initial_state[n : n + 1]
            o, s = op(**piece, initial_state=init, output_final_state=True)
            outs.append(o)
            states.append(s)
        return torch.cat(outs, 1), torch.cat(states, 0)

    return fn
