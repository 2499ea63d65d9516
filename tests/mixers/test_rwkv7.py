"""The RWKV-7 mixer: flash-linear-attention's RWKV7Attention (its weights, sub-modules and reference
functions on CPU), the value residual through a model's context, init, errors, declarations.

fla's layer forward runs Triton kernels (token shift, the fused addcmul, chunk_rwkv7) that do not
run on CPU; `fla_forward` is that forward with each kernel replaced by the torch reference fla
keeps beside it (`token_shift_ref`, `torch_addcmul_rwkv7`, `k_update_ref`,
`gate_output_correction_ref`) and the recurrence by fla's naive `dplr_recurrence` (float32 only: it
casts its inputs) or, in float64, by seqlab's recurrent dplr form (held to fla's naive one in
tests/ops/test_dplr.py). Everything else is the fla layer's own modules and parameters.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqlab.mixers import build_mixer
from seqlab.mixers.rwkv7 import RWKV7, default_ranks
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.ops.dplr import recurrent_dplr

D, B = 32, 2
ROOT = Path(__file__).resolve().parents[2]
F64 = {"rtol": 1e-9, "atol": 1e-11}
RANKS = {"decay_low_rank_dim": 8, "a_low_rank_dim": 8, "v_low_rank_dim": 4, "gate_low_rank_dim": 8}


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- flash-linear-attention's layer ------------------------------------------------------------

CASES = [  # (layer_idx, num_layers, head_dim, T, seed, decay_shift, initial state)
    (0, 4, 8, 37, 0, 0.0, False),
    (2, 4, 16, 40, 1, 6.0, True),
    (1, 3, 8, 23, 2, -4.0, True),
    (3, 4, 32, 19, 3, 6.0, False),
]
INIT_CASES = [(0, 2), (0, 6), (3, 6), (5, 6)]  # (layer_idx, num_layers); fla divides by L − 1

# Run by a fresh interpreter: importing fla.layers imports all of fla.ops, whose Gluon kernels
# fail to build under the Triton interpreter this test session runs with (tests/conftest.py).
FLA_SCRIPT = r"""
import sys, warnings
import torch
import torch.nn.functional as F
from fla.layers.rwkv7 import RWKV7Attention
from fla.modules.token_shift import token_shift_ref
from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
from fla.ops.rwkv7.fused_k_update import k_update_ref
from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
from seqlab.ops.dplr import recurrent_dplr

warnings.simplefilter("ignore")
D, B, RANKS, CASES, INIT_CASES, path = torch.load(sys.argv[1])


def randn(*shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def layer_for(layer_idx, num_layers, head_dim):
    return RWKV7Attention(
        hidden_size=D, head_dim=head_dim, layer_idx=layer_idx, num_hidden_layers=num_layers,
        norm_eps=1e-5, **RANKS,
    )


def fla_forward(layer, x, v_first, S0, shift0, recurrence):
    # RWKV7Attention.forward with fla's torch references in place of its Triton kernels
    Bx, T, _ = x.shape
    H, K = layer.num_heads, layer.head_dim
    delta = token_shift_ref(x)
    if shift0 is not None:  # the conv cache: the previous token replaces the zero pad
        delta = torch.cat([delta[:, :1] + shift0[:, None], delta[:, 1:]], 1)
    xr, xw, xk, xv, xa, xg = torch_addcmul_rwkv7(
        x, delta, layer.x_r, layer.x_w, layer.x_k, layer.x_v, layer.x_a, layer.x_g
    )
    r = layer.r_proj(xr)
    w = -0.6065306597126334 * layer.w_lora(xw).sigmoid()
    k = layer.k_proj(xk)
    v = layer.v_proj(xv)
    if layer.layer_idx == 0:
        v_first = v
    else:
        v = torch.lerp(v, v_first, layer.v_lora(xv).sigmoid())
    a = layer.a_lora(xa).sigmoid()
    g = layer.g_lora(xg)
    kk = F.normalize((k * layer.k_k).view(Bx, T, H, K), dim=-1, p=2.0)
    k = k_update_ref(k, a, layer.k_a)
    r, w, k, a = (t.view(Bx, T, H, K) for t in (r, w, k, a))
    v = v.view(Bx, T, H, K)
    o, S = recurrence(r, w, k, v, -kk, kk * a, S0)
    o = layer.g_norm(o.reshape(Bx * T, H * K)).view(Bx, T, -1)
    o = gate_output_correction_ref(o, r, k, layer.r_k, v, g)
    return layer.o_proj(o), v_first, S, x[:, -1]


def fla_naive(r, w, k, v, a, b, S0):
    # fla's naive recurrence on [B, H, T, .], scale 1 (it scales q by K^-1/2)
    K = r.shape[-1]
    args = [t.transpose(1, 2) for t in (r * K**0.5, k, v, a, b, w)]
    o, S = dplr_recurrence(*args, initial_state=S0, output_final_state=True)
    return o.transpose(1, 2), S


def seqlab_recurrent(r, w, k, v, a, b, S0):
    return recurrent_dplr(r, k, v, a, b, w, 1.0, S0, True)


out = {"init": {}, "cases": []}
for layer_idx, num_layers in INIT_CASES:
    torch.manual_seed(0)
    layer = layer_for(layer_idx, num_layers, 8)
    out["init"][(layer_idx, num_layers)] = {n: p.detach() for n, p in layer.named_parameters()}
for layer_idx, num_layers, head_dim, T, seed, shift, initial in CASES:
    torch.manual_seed(seed)
    layer = layer_for(layer_idx, num_layers, head_dim)
    with torch.no_grad():
        for p in layer.parameters():  # fla's zero o_proj and LoRA down-projections hide the rest
            p.add_(0.2 * torch.randn_like(p))
        layer.w_lora.lora[2].bias.add_(shift)
    H = D // head_dim
    case = {"params": {n: p.detach().clone() for n, p in layer.named_parameters()}}
    for dtype, recurrence in ((torch.float64, seqlab_recurrent), (torch.float32, fla_naive)):
        layer = layer.to(dtype)
        x = randn(B, T, D, seed=seed + 10, dtype=dtype).requires_grad_(True)
        v_first = randn(B, T, D, seed=seed + 20, dtype=dtype).requires_grad_(True)
        S0 = 0.5 * randn(B, H, head_dim, head_dim, seed=seed + 30, dtype=dtype) if initial else None
        shift0 = randn(B, D, seed=seed + 40, dtype=dtype) if initial else None
        ref = fla_forward(layer, x, v_first, S0, shift0, recurrence)
        dy = randn(*ref[0].shape, seed=99, dtype=dtype)
        names = [n for n, _ in layer.named_parameters()]
        inputs = [x, v_first] + [p for _, p in layer.named_parameters()]
        grads = torch.autograd.grad((ref[0] * dy).sum(), inputs, allow_unused=True)
        case[dtype] = {
            "x": x.detach(), "v_first": v_first.detach(), "S0": S0, "shift0": shift0, "dy": dy,
            "out": [t.detach() for t in ref],
            "grads": dict(zip(["x", "v_first", *names], grads)),
        }
    out["cases"].append(case)
torch.save(out, path)
"""


@pytest.fixture(scope="module")
def fla_results(tmp_path_factory):
    """fla's layers and outputs for CASES (fla_forward in FLA_SCRIPT), from a fresh interpreter."""
    spec = importlib.util.find_spec("fla")  # finds it without importing it
    if spec is None or not Path(spec.submodule_search_locations[0], "layers/rwkv7.py").is_file():
        pytest.skip("flash-linear-attention (fla.layers.rwkv7) is not installed")
    folder = tmp_path_factory.mktemp("fla_rwkv7")
    args, results = folder / "args.pt", folder / "results.pt"
    torch.save((D, B, RANKS, CASES, INIT_CASES, str(results)), args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", FLA_SCRIPT, str(args)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(results, weights_only=False)


def pairs(mixer):
    """(seqlab parameter, fla parameter name) for every parameter of the mixer; the token-shift
    mixes are rows of one parameter, `mix`, and come as (mix, row) instead."""
    out = [((mixer.mix, i), f"x_{n}") for i, n in enumerate(mixer.MIXES)]
    out += [(mixer.k_k, "k_k"), (mixer.k_a, "k_a"), (mixer.r_k, "r_k")]
    out += [(getattr(mixer, n).weight, f"{n}.weight") for n in ("r_proj", "k_proj", "v_proj")]
    out.append((mixer.o_proj.weight, "o_proj.weight"))
    for name in ("w_lora", "a_lora", "v_lora", "g_lora"):
        if not hasattr(mixer, name):  # the first layer has no v_lora (nor fla's layer 0)
            continue
        lora = getattr(mixer, name)
        out += [
            (lora.down.weight, f"{name}.lora.0.weight"),
            (lora.up.weight, f"{name}.lora.2.weight"),
        ]
        if lora.bias is not None:
            out.append((lora.bias, f"{name}.lora.2.bias"))
    return out + [(mixer.g_norm.weight, "g_norm.weight"), (mixer.g_norm.bias, "g_norm.bias")]


def row(p, grad=False):
    """A parameter from `pairs` (or its gradient): the tensor, or the row of (mix, row)."""
    if isinstance(p, tuple):
        return (p[0].grad if grad else p[0])[p[1]]
    return p.grad if grad else p


def twin(case, params, dtype):
    """The rwkv7 mixer of fla's layer in `case`, with its weights."""
    layer_idx, num_layers, head_dim = case[:3]
    place = {"layer_idx": layer_idx, "num_layers": num_layers, "context_index": layer_idx}
    options = {"head_dim": head_dim, "chunk_size": 16, "norm_eps": 1e-5, **RANKS}
    mixer = build_mixer("rwkv7", D, **options, **place).to(dtype)
    names = [n for _, n in pairs(mixer)]
    assert sorted(names) == sorted(params)  # every fla parameter has its place
    with torch.no_grad():
        for mine, name in pairs(mixer):
            row(mine).copy_(params[name].view(row(mine).shape))
    return mixer


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float64, {"rtol": 1e-9, "atol": 1e-11}), (torch.float32, {"rtol": 1e-4, "atol": 2e-5})],
)
@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_fla_layer_forward_and_backward(fla_results, i, dtype, tol):
    """float64: fla's layer with seqlab's recurrent dplr; float32: with fla's naive recurrence.
    Outputs, v_first, final state and shift; gradients of x, v_first and every parameter."""
    case, ref = CASES[i], fla_results["cases"][i]
    mixer, r = twin(case, ref["params"], dtype), ref[dtype]
    x = r["x"].clone().requires_grad_(True)
    v_first = r["v_first"].clone().requires_grad_(True)
    context = {} if case[0] == 0 else {"v_first": v_first}
    state = None if r["S0"] is None else {"S": r["S0"], "shift": r["shift0"]}
    y, out = mixer(x, state, context=context)
    got = (y, context["v_first"], out["S"], out["shift"])
    assert r["out"][0].abs().max() > 1e-2  # a real output, not one fla's zero init hides
    for name, a, b in zip(("o", "v_first", "S", "shift"), got, r["out"], strict=True):
        atol = tol["atol"] * max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a, b, rtol=tol["rtol"], atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
    (y * r["dy"]).sum().backward()
    named = [("x", x)] + ([("v_first", v_first)] if case[0] else [])
    named += [(n, p) for p, n in pairs(mixer)]
    for name, p in named:
        g = row(p, grad=True)
        want = r["grads"][name].view(g.shape)
        atol = tol["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            g, want, rtol=tol["rtol"], atol=atol, msg=lambda m, n=name: f"grad {n}: {m}"
        )


@pytest.mark.parametrize(("layer_idx", "num_layers"), INIT_CASES)
def test_init_matches_fla(fla_results, layer_idx, num_layers):
    """fla's init of what sets the dynamics: mixes, k_k, k_a, r_k, w0, a0, v0, GroupNorm."""
    params = fla_results["init"][(layer_idx, num_layers)]
    if not params["x_r"].any():
        pytest.skip("fla left its init to transformers (its _init_weights flag is off)")
    place = {"layer_idx": layer_idx, "num_layers": num_layers, "context_index": layer_idx}
    mixer = build_mixer("rwkv7", D, head_dim=8, **place, **RANKS)
    names = ("k_k", "k_a", "r_k", "g_norm.weight", "g_norm.bias")
    kept = [(m, n) for m, n in pairs(mixer) if n.startswith("x_") or n.endswith("lora.2.bias")]
    kept += [(m, n) for m, n in pairs(mixer) if n in names]
    assert len(kept) == 6 + 5 + (3 if layer_idx else 2)
    for mine, name in kept:
        mine = row(mine).detach()
        torch.testing.assert_close(
            mine, params[name].view(mine.shape), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_init_without_fla():
    """A model gives each rwkv7 layer its place: the depth-dependent init (mixes in [0, 1]
    falling along the channels and with depth, decays from strong to weak, GroupNorm weight
    ((i + 1) / L)^0.7), v_lora from the second layer on; the init survives the model's policy
    (r, k, v orthogonal in paper_init; the LoRA matrices and o_proj N(0, σ²))."""
    config = ModelConfig(vocab_size=16, d_model=64, n_layers=4, pattern="attn,rwkv7(head_dim=16)")
    model = CausalLM(config)
    first, second = model.blocks[1].mixer, model.blocks[3].mixer
    assert (first.config.layer_idx, first.config.num_layers, first.config.context_index) == (
        1,
        4,
        0,
    )
    assert (second.config.layer_idx, second.config.context_index) == (3, 1)
    assert not hasattr(first, "v_lora") and hasattr(second, "v_lora")
    for mixer in (first, second):
        assert ((mixer.mix >= 0) & (mixer.mix <= 1)).all()
        assert mixer.mix[:, 0].eq(1).all() and (mixer.mix.diff(dim=1) <= 0).all()
        assert mixer.w_lora.bias.min() < -5 and mixer.w_lora.bias.max() > 0
        i = mixer.config.layer_idx
        torch.testing.assert_close(mixer.g_norm.weight, torch.full((64,), ((i + 1) / 4) ** 0.7))
        w = mixer.k_proj.weight.detach()
        torch.testing.assert_close(w @ w.T, 0.01 * torch.eye(64), atol=1e-5, rtol=0)
        w = mixer.r_proj.weight.detach()
        torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-5, rtol=0)
        assert abs(mixer.w_lora.up.weight.std().item() / 0.02 - 1) < 0.2
        assert mixer.g_norm.eps == 1e-5
    assert (second.mix[:, 1:] < first.mix[:, 1:]).all()  # deeper layers mix less of x_{t−1}
    assert model.blocks[0].mixer.num_heads == 8  # attention takes no place options: its default


def test_default_ranks_follow_fla():
    assert default_ranks(1024, 64) == {"decay": 64, "a": 64, "v": 64, "gate": 160}
    assert default_ranks(2048, 64) == {"decay": 128, "a": 128, "v": 64, "gate": 224}
    assert default_ranks(32, 8) == {"decay": 32, "a": 32, "v": 32, "gate": 32}
    mixer = build_mixer("rwkv7", 64, head_dim=16)
    assert mixer.ranks == default_ranks(64, 16) and mixer.w_lora.down.out_features == 32


def test_group_norm_floor_is_head_dim_times_norm_eps():
    mixer = build_mixer("rwkv7", D, head_dim=8, norm_eps=1e-3)
    x = randn(5, D, dtype=torch.float32)
    ref = F.group_norm(x, D // 8, mixer.g_norm.weight, mixer.g_norm.bias, eps=8e-3)
    torch.testing.assert_close(mixer.g_norm(x), ref)
    assert mixer.g_norm.eps == 1e-3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"head_dim": 12}, "d_model = 32 must be a whole multiple of head_dim = 12"),
        ({"head_dim": 8, "chunk_size": 24}, "chunk_size must be at most 16 or a multiple of 16"),
        ({"layer_idx": 2, "num_layers": 2}, "layer_idx must be less than num_layers = 2, got 2"),
        ({"heads": 2}, "unknown option"),
    ],
)
def test_bad_options_name_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        build_mixer("rwkv7", D, **options)


def test_decay_stays_in_rwkv7s_range_and_the_op_gets_unit_keys(monkeypatch):
    import seqlab.mixers.rwkv7 as module

    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        options = {k: v for k, v in kwargs.items() if k not in ("form", "chunk_size")}
        return recurrent_dplr(*args, **{**options, "check_values": True})  # raises on a bad gk

    monkeypatch.setattr(module, "dplr", spy)
    mixer = build_mixer("rwkv7", D, head_dim=8, chunk_size=16)
    with torch.no_grad():
        mixer.w_lora.bias.add_(torch.linspace(-30, 30, D))  # both ends of the sigmoid
    mixer(randn(B, 9, D, dtype=torch.float32))
    [((r, k, v, a, b, gk), kwargs)] = calls
    assert gk.max() < 0 and gk.min() >= -math.exp(-0.5) and gk.min() < -0.6 and gk.max() > -1e-6
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(a.shape[:-1]))
    alpha = b / -a
    assert alpha.min() > 0 and alpha.max() < 1
    assert kwargs["scale"] == 1.0 and kwargs["check_values"] is False


# --- the value residual through a model ---------------------------------------------------------

PATTERN = "rwkv7(head_dim=8, chunk_size=16)"


def model(pattern=f"{PATTERN}*3", n_layers=3, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50, d_model=D, n_layers=n_layers, pattern=pattern)
    return CausalLM(config).double()


def ids(T, seed=1):
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", [f"{PATTERN}*3", f"attn,{PATTERN},gdn,{PATTERN}"])
def test_model_prefill_then_decode_and_chunked_prefill_equal_one_pass(pattern):
    lm = model(pattern, n_layers=3 if "attn" not in pattern else 4)
    x = ids(37)
    full = lm(x)
    for cuts in ([20, *range(21, 37)], [13, 29], [1]):
        logits, state = [], None
        for lo, hi in zip([0, *cuts], [*cuts, 37], strict=True):
            out = lm(x[:, lo:hi], state)
            logits.append(out.logits)
            state = out.state
        torch.testing.assert_close(torch.cat(logits, 1), full.logits, **F64)
        for s, s_full in zip(state, full.state, strict=True):
            if "S" in s:
                torch.testing.assert_close(s["S"], s_full["S"], **F64)


def test_later_layers_mix_in_the_first_layers_value():
    lm = model()
    out = lm(ids(21))
    (out.logits * randn(*out.logits.shape, seed=5)).sum().backward()
    assert not hasattr(lm.blocks[0].mixer, "v_lora")  # the first layer: v_first = v
    for block in lm.blocks[1:]:
        grads = [p.grad for p in block.mixer.v_lora.parameters()]
        assert len(grads) == 3 and all(g is not None and g.abs().max() > 0 for g in grads)
    # layers 2 and 3 read layer 1's v: moving it moves their outputs, not layer 1's
    blocks = lm.blocks
    with torch.no_grad():
        x = blocks[0].mixer_norm(lm.embed(ids(21)))
        context = {}
        y1, _ = blocks[0].mixer(x, context=context)
        v_first = context["v_first"]
        assert v_first.shape == (B, 21, D)
        y2, _ = blocks[1].mixer(x, context={"v_first": v_first})
        y2_moved, _ = blocks[1].mixer(x, context={"v_first": v_first + 1})
        y2_alone, _ = blocks[1].mixer(x)
    assert not torch.allclose(y2, y2_moved) and not torch.allclose(y2, y2_alone)
    torch.testing.assert_close(y2_alone, blocks[1].mixer(x, context={})[0])


def test_model_flops_match_the_counter_with_the_value_residual():
    """Later layers count their v_lora, the first does not: the model's cost is exact."""
    from seqlab.profile.cost import model_cost
    from tests.profile.conftest import count_flops

    lm, T = model().float(), 29
    x = ids(T + 1)
    with torch.no_grad():
        state = lm(x[:, :T]).state
    cost = model_cost(lm, T)
    assert count_flops(lambda: lm(x[:, :T])) == B * cost.prefill.matmul
    assert count_flops(lambda: lm(x[:, T:], state)) == B * cost.decode.matmul
    first, later = (b.mixer.flops(T).per_token.matmul for b in lm.blocks[:2])
    assert later - first == 4 * D * lm.blocks[1].mixer.ranks["v"]


def test_declarations():
    mixer = build_mixer("rwkv7", D, head_dim=8, chunk_size=16)
    assert mixer.takes_context and RWKV7.core_op == "dplr"
    call = mixer.op_call()
    assert call.H == 4 and call.dims == {"K": 8, "V": 8} and call.options == {"chunk_size": 16}
    assert mixer.state_shapes(B) == {"S": (B, 4, 8, 8), "shift": (B, D)}
    f = mixer.flops(40)
    assert f.per_token.matmul > 0 and f.prefill.matmul > f.decode.matmul > 0
