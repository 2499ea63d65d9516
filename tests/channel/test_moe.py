"""MoE: the sorted, batched experts against a loop over tokens, the aux loss against its formula.

Run: .venv/bin/python -m pytest tests/channel/test_moe.py -q

The reference routes and sums one token at a time in float64, reading the module's parameters;
outputs and gradients (of a seeded random weighted sum) must agree at 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.channel import MoE, build_channel_mixer
from tests.host_reads import HostReads

F64 = {"rtol": 1e-12, "atol": 1e-12}
ZC_MIX = {"num_zero": 1, "num_copy": 1, "num_constant": 2}


def make_moe(d_model: int = 16, seed: int = 0, **options) -> MoE:
    torch.manual_seed(seed)
    return build_channel_mixer("moe", d_model, **options).double()


def ffn(kind: str, w_in: torch.Tensor, w_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ w_in
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w_out
    return F.gelu(h) @ w_out


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y[b, t] = Σ_{top-k slots i} w_i · E_i(x[b, t]) (+ shared), one token at a time."""
    c = moe.config
    kind = c.expert_type
    E_ffn, zero, copy = c.num_experts, c.num_zero, c.num_copy
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t]
            p = torch.softmax(moe.router.weight @ xt, -1)
            w, idx = p.topk(c.top_k)
            if c.normalize_topk:
                w = w / w.sum()
            for wi, i in zip(w, idx.tolist(), strict=True):
                if i < E_ffn:
                    out = ffn(kind, moe.experts.w_in[i], moe.experts.w_out[i], xt)
                elif i < E_ffn + zero:
                    out = torch.zeros_like(xt)
                elif i < E_ffn + zero + copy:
                    out = xt
                else:
                    j = i - E_ffn - zero - copy
                    a = torch.softmax(moe.const_gate[j] @ xt, -1)
                    out = a[0] * xt + a[1] * moe.const_value[j]
                y[b, t] = y[b, t] + wi * out
            if moe.shared is not None:
                y[b, t] = y[b, t] + ffn(kind, moe.shared.w_in[0], moe.shared.w_out[0], xt)
    return y


def naive_aux(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """coef · E · Σ_i η_i f_i P_i from dense one-hot counts."""
    c = moe.config
    probs = torch.softmax(x.reshape(-1, x.shape[-1]) @ moe.router.weight.T, -1)  # [N, E]
    chosen = F.one_hot(probs.topk(c.top_k, -1).indices, c.num_slots).sum(1)  # [N, E] in {0, 1}
    f = chosen.double().sum(0) / (probs.shape[0] * c.top_k)
    eta = torch.tensor(
        [1.0] * c.num_experts + [c.zero_compute_balance] * (c.num_slots - c.num_experts)
    )
    return c.aux_loss_coef * c.num_slots * (eta.double() * f * probs.mean(0)).sum()


def grads(moe: MoE, fn, x: torch.Tensor, seed: int = 1):
    """Output and gradients w.r.t. x and every parameter of a seeded weighted sum of fn(x)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    params = dict(moe.named_parameters())
    g = torch.autograd.grad((y * w).sum(), [x, *params.values()], allow_unused=True)
    return y.detach(), dict(zip(["x", *params], g, strict=True))


CASES = {
    "plain": {},
    "top1_unnormalised": {"top_k": 1, "normalize_topk": False},
    "top3_mlp": {"top_k": 3, "expert_type": "mlp", "expert_hidden": 24},
    "shared": {"shared_expert": True},
    "zero_compute": ZC_MIX,
    "zero_compute_shared_top3": {**ZC_MIX, "shared_expert": True, "top_k": 3},
    "unnormalised_zero_compute": {**ZC_MIX, "normalize_topk": False, "num_experts": 3},
}


@pytest.mark.parametrize("tokens", [(2, 12), (1, 1), (2, 1)], ids=["grouped", "one", "two"])
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_matches_token_loop_forward_and_backward(options, tokens):
    """24 tokens run the experts grouped; 1 or 2 (a decode step: N·k ≤ E) gathered."""
    moe = make_moe(**{"num_experts": 4, "expert_hidden": 20, **options})
    x = torch.randn(*tokens, 16, dtype=torch.float64)
    y, g = grads(moe, lambda x: moe(x)[0], x)
    if tokens == (2, 12):
        assert (moe.last_expert_load > 0).all(), moe.last_expert_load  # every slot exercised
    y_ref, g_ref = grads(moe, lambda x: naive_moe(moe, x), x)
    torch.testing.assert_close(y, y_ref, **F64)
    assert g.keys() == g_ref.keys()
    for name in g:
        if g_ref[name] is None:
            assert g[name] is None or not g[name].any(), name
        else:
            torch.testing.assert_close(
                g[name], g_ref[name], **F64, msg=lambda m, n=name: f"{n}: {m}"
            )


def _route_everything_to(moe: MoE, slot: int, runner_up: int | None = None) -> torch.Tensor:
    """Make slot win (and runner_up come second) for every token of the positive x returned."""
    with torch.no_grad():
        moe.router.weight.fill_(-1.0)
        moe.router.weight[slot] = 2.0
        if runner_up is not None:
            moe.router.weight[runner_up] = 1.0
    return torch.rand(2, 6, 16, dtype=torch.float64) + 0.1  # positive: Σ_d x_d sets the order


def shared_only(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    return ffn("swiglu", moe.shared.w_in[0], moe.shared.w_out[0], x)


def test_token_on_a_zero_expert_gets_only_the_shared_expert():
    moe = make_moe(num_experts=2, top_k=1, shared_expert=True, **ZC_MIX)
    x = _route_everything_to(moe, slot=2)
    y, _ = moe(x)
    torch.testing.assert_close(y, shared_only(moe, x), **F64)
    assert moe.last_expert_load.tolist() == [0, 0, 12, 0, 0, 0]


def test_token_on_a_copy_expert_gets_its_weighted_input():
    moe = make_moe(num_experts=2, top_k=2, normalize_topk=False, **ZC_MIX)
    x = _route_everything_to(moe, slot=3, runner_up=2)  # copy first, zero second
    p_copy = torch.softmax(x @ moe.router.weight.T, -1)[..., 3:4]
    torch.testing.assert_close(moe(x)[0], p_copy * x, **F64)
    assert moe.last_expert_load.tolist() == [0, 0, 12, 12, 0, 0]


def test_token_on_a_constant_expert_gets_its_blend():
    moe = make_moe(num_experts=2, top_k=1, shared_expert=True, **ZC_MIX)
    x = _route_everything_to(moe, slot=5)  # the second constant expert
    a = torch.softmax(x @ moe.const_gate[1].T, -1)  # [B, T, 2]
    expected = a[..., :1] * x + a[..., 1:] * moe.const_value[1] + shared_only(moe, x)
    torch.testing.assert_close(moe(x)[0], expected, **F64)


def test_every_parameter_gets_gradient():
    moe = make_moe(num_experts=4, shared_expert=True, **ZC_MIX).float()
    x = torch.randn(4, 64, 16)
    y, aux = moe(x)
    assert y.shape == x.shape and aux.shape == ()
    assert (moe.last_expert_load > 0).all(), moe.last_expert_load  # every slot used
    assert moe.last_expert_load.sum() == 4 * 64 * 2
    ((y * torch.randn_like(y)).sum() + aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # Stacked experts: each expert's slice, not just the tensor, must be reached.
        per_expert = p.grad.flatten(1).abs().sum(1) if p.dim() == 3 else p.grad.abs().sum()[None]
        assert (per_expert > 0).all(), name


def test_router_learns_through_the_weights_alone():
    moe = make_moe(num_experts=4, aux_loss_coef=0.0)
    y, aux = moe(torch.randn(2, 16, 16, dtype=torch.float64))
    assert aux.item() == 0.0
    (y * torch.randn_like(y)).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, {"top_k": 1}, {**ZC_MIX, "zero_compute_balance": 0.5}])
def test_aux_loss_matches_formula(options):
    moe = make_moe(num_experts=4, aux_loss_coef=0.3, **options)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    _, aux = moe(x)
    torch.testing.assert_close(aux, naive_aux(moe, x), **F64)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_coef_for_uniform_and_larger_for_collapsed_routing(top_k):
    moe = make_moe(num_experts=8, top_k=top_k)
    x = torch.rand(2, 32, 16, dtype=torch.float64) + 0.1
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability 1/E, whatever topk picks
    _, uniform = moe(x)
    assert uniform.item() == pytest.approx(0.01, rel=1e-12)
    _route_everything_to(moe, slot=0, runner_up=1)
    with torch.no_grad():
        moe.router.weight.mul_(20.0)  # p_0 ≈ 1
    _, collapsed = moe(x)
    # f_0 = 1/k, P_0 ≈ 1: aux ≈ coef · E / k, here 8 or 4 times the uniform value.
    assert collapsed.item() == pytest.approx(0.01 * 8 / top_k, rel=1e-3)
    assert collapsed > 3 * uniform


def test_seeded_determinism():
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    a, b = (make_moe(seed=7, shared_expert=True, **ZC_MIX) for _ in range(2))
    ya, aux_a = a(x)
    yb, aux_b = b(x)
    assert torch.equal(ya, yb) and torch.equal(aux_a, aux_b)
    assert torch.equal(a.last_expert_load, b.last_expert_load)
    assert torch.equal(a(x)[0], ya)  # and repeatable on the same module


def test_router_jitter_only_in_training():
    moe = make_moe(router_jitter=0.5)
    plain = make_moe()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], plain(x)[0], **F64)
    moe.train()
    assert not torch.allclose(moe(x)[0], plain(x)[0])


def test_default_sizes_and_init():
    moe = build_channel_mixer("moe", 64, out_init_std=0.004)
    assert moe.expert_hidden == 176 and moe.num_slots == 8
    assert tuple(moe.experts.w_in.shape) == (8, 64, 352)
    assert moe.experts.w_in.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.experts.w_out.std().item() == pytest.approx(0.004, rel=0.05)
    assert build_channel_mixer("moe", 64, expert_type="mlp").expert_hidden == 256


def test_half_precision_router_runs_in_float32():
    moe = make_moe(num_experts=4, shared_expert=True, **ZC_MIX).to(torch.bfloat16)
    with torch.no_grad():
        moe.router.weight.mul_(50.0)  # trained-size logits (≈ 4), where bf16 round-off shows
    x = torch.randn(4, 32, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32
    assert torch.isfinite(y).all()
    probs = torch.softmax(x.float() @ moe.router.weight.float().T, -1).reshape(-1, 8)
    expected = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=8)
    assert torch.equal(moe.last_expert_load, expected)
    f = expected / expected.sum()
    torch.testing.assert_close(aux, 0.01 * 8 * (f * probs.mean(0)).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tokens, grouped", [((2, 1), False), ((1, 4), False), ((1, 5), True)])
def test_few_token_slots_gather_and_read_nothing_back(tokens, grouped, monkeypatch):
    """N·k ≤ E token-slots (k = 2, E = 8 here) take the gathered path, which needs no host
    sync; more take the grouped one, whose split sizes are host ints."""
    moe = make_moe(num_experts=8, expert_hidden=20)
    ran = []
    for name in ("forward", "gathered"):
        method = getattr(type(moe.experts), name)
        monkeypatch.setattr(
            type(moe.experts),
            name,
            lambda self, *a, _m=method, _n=name: ran.append(_n) or _m(self, *a),
        )
    x = torch.randn(*tokens, 16, dtype=torch.float64)
    with HostReads() as spy:
        moe(x)
    assert ran == ["forward" if grouped else "gathered"]
    if not grouped:
        assert spy.reads == []
