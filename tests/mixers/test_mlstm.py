"""The mlstm mixer: against the xlstm package's mLSTMLayer with the same weights, its forms
(prefill chunk, decode recurrent), its paper init, and model patterns. The shared mixer suite
(tests/mixers/test_mixers.py) covers shapes, gradients, streaming and state sizes."""

from __future__ import annotations

import pytest
import torch

import seqlab.ops.mlstm as mlstm_ops
from seqlab.mixers import build_mixer


def test_equals_the_xlstm_mlstm_layer_with_the_same_weights():
    layer_mod = pytest.importorskip("xlstm.blocks.mlstm.layer")
    torch.manual_seed(0)
    D, T = 32, 24
    cfg = layer_mod.mLSTMLayerConfig(
        embedding_dim=D, num_heads=2, proj_factor=2.0, conv1d_kernel_size=4,
        qkv_proj_blocksize=4, context_length=T,
    )  # fmt: skip
    ref = layer_mod.mLSTMLayer(cfg).double()
    ours = build_mixer("mlstm", D, num_heads=2, proj_factor=2.0, d_conv=4, chunk_size=8).double()
    with torch.no_grad():  # random weights everywhere (the gates' paper init is zero)
        for p in ref.parameters():
            p.normal_(std=0.3)
        ours.proj_up.weight.copy_(ref.proj_up.weight)
        ours.conv.conv.weight.copy_(ref.conv1d.conv.weight)
        ours.conv.conv.bias.copy_(ref.conv1d.conv.bias)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(ours, name).weight.copy_(getattr(ref, name).weight)
        for name in ("igate", "fgate"):
            getattr(ours, name).weight.copy_(getattr(ref.mlstm_cell, name).weight)
            getattr(ours, name).bias.copy_(getattr(ref.mlstm_cell, name).bias)
        ours.norm_weight.copy_(ref.mlstm_cell.outnorm.weight_proxy)
        ours.skip.copy_(ref.learnable_skip)
        ours.o_proj.weight.copy_(ref.proj_down.weight)
    x = torch.randn(2, T, D, dtype=torch.float64)
    # xlstm's parallel backend omits the m_0 = 0 term of the stabiliser; the output sees it only
    # through eps · exp(m) (eps = 1e-6), hence the tolerance
    torch.testing.assert_close(ours(x)[0], ref(x), rtol=1e-5, atol=1e-6)


def test_prefill_runs_the_chunk_form_and_decode_the_recurrent_form(monkeypatch):
    calls = []
    for name in ("chunk_mlstm", "recurrent_mlstm"):
        op = getattr(mlstm_ops, name)

        def spy(*a, _op=op, _name=name, **kw):
            calls.append(_name)
            return _op(*a, **kw)

        monkeypatch.setattr(mlstm_ops, name, spy)
    mixer = build_mixer("mlstm", 32, num_heads=2, chunk_size=8)
    x = torch.randn(2, 12, 32)
    _, state = mixer(x[:, :11])
    mixer(x[:, 11:], state)
    assert calls == ["chunk_mlstm", "recurrent_mlstm"]


def test_paper_init_of_the_gates_is_kept():
    mixer = build_mixer("mlstm", 32, num_heads=4)
    torch.testing.assert_close(mixer.fgate.bias, torch.linspace(3.0, 6.0, 4))
    assert not mixer.fgate.weight.any() and not mixer.igate.weight.any()
    assert 0 < mixer.igate.bias.abs().max() < 0.5
    assert mixer.proj_up.weight.std() < 0.03  # the init policy's σ = 0.02 elsewhere


def test_bad_dims_raise():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_mixer("mlstm", 31, num_heads=4)


@pytest.mark.parametrize("proj_factor", [0.01, 0.05])
def test_a_proj_factor_too_small_for_the_heads_is_a_config_error(proj_factor):
    """round(proj_factor · d_model) = 0 (or 2 < 4 heads) failed inside torch's conv."""
    with pytest.raises(ValueError, match=rf"proj_factor = {proj_factor:g} is too small"):
        build_mixer("mlstm", 32, num_heads=4, proj_factor=proj_factor)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_proj_factor_is_a_config_error(value):
    with pytest.raises(ValueError, match="proj_factor: Input should be a finite number"):
        build_mixer("mlstm", 32, proj_factor=value)


@pytest.mark.parametrize("pattern", ["mlstm", "mlstm,attn", "mlstm*3,attn"])
def test_patterns_build_and_run(pattern):
    from seqlab.model.lm import CausalLM, ModelConfig
    from seqlab.model.pattern import expand_pattern

    n = len(expand_pattern(pattern))
    model = CausalLM(ModelConfig(vocab_size=16, d_model=32, n_layers=n, pattern=pattern))
    logits = model(torch.randint(0, 16, (2, 20))).logits
    assert logits.shape == (2, 20, 16) and torch.isfinite(logits).all()
