"""The sLSTM mixer: against the xlstm package's sLSTMLayer with mapped weights (float64 outputs,
final states, input gradients), streaming, init, declarations, models built from patterns."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import build_mixer
from seqlab.mixers.slstm import SLSTM, forget_bias_init

D, B, T = 32, 2, 40


def _mixer(**options):
    torch.manual_seed(0)
    return build_mixer("slstm", D, **options).double()


def _x(T=T, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _package_layer(H, conv_width):
    """The xlstm package's sLSTMLayer (vanilla backend) in float64, random weights."""
    layer_mod = pytest.importorskip("xlstm.blocks.slstm.layer")
    config = layer_mod.sLSTMLayerConfig(
        embedding_dim=D, num_heads=H, conv1d_kernel_size=conv_width, backend="vanilla"
    )
    torch.manual_seed(5)
    layer = layer_mod.sLSTMLayer(config).double()
    with torch.no_grad():
        cell = layer.slstm_cell
        cell.recurrent_kernel[:] = torch.randn(H, D // H, 4, D // H, dtype=torch.float64) * 0.3
        cell.bias[:] = torch.randn(H, 4, D // H, dtype=torch.float64)
        layer.group_norm.weight.normal_(0, 0.1)  # the norm's weight is 1 + this
    return layer


def _mapped(layer, H, conv_width):
    """Our mixer with the package layer's weights: its headwise gate projections as block-diagonal
    dense ones (its ĩ comes from the module it calls fgate, f̃ from igate: sLSTMLayer.forward
    reads `i, f = self.fgate(x_conv), self.igate(x_conv)`), its recurrent kernel and bias as R, b
    (the same layout), its conv as ours, o_proj the identity."""
    m = _mixer(num_heads=H, conv_width=conv_width)

    def dense(module):
        return torch.block_diag(*module.weight.detach())

    with torch.no_grad():
        m.if_proj.weight.copy_(torch.cat([dense(layer.fgate), dense(layer.igate)]))
        m.zo_proj.weight.copy_(torch.cat([dense(layer.zgate), dense(layer.ogate)]))
        m.R.copy_(layer.slstm_cell.recurrent_kernel[:])
        m.b.copy_(layer.slstm_cell.bias[:])
        m.norm.weight.copy_(layer.group_norm.weight_proxy)
        m.o_proj.weight.copy_(torch.eye(D, dtype=torch.float64))
        if conv_width:
            m.conv.conv.weight.copy_(layer.conv1d.conv.weight)
            m.conv.conv.bias.copy_(layer.conv1d.conv.bias)
    return m


@pytest.mark.parametrize(("H", "conv_width", "T"), [(1, 4, 1), (2, 4, 23), (4, 0, 40)])
def test_matches_the_xlstm_package_layer_float64(H, conv_width, T):
    layer = _package_layer(H, conv_width)
    mixer = _mapped(layer, H, conv_width)
    x = _x(T)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, ref_state = layer(x1, return_last_state=True)
    y, state = mixer(x2)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    S = ref_state["slstm_state"].view(4, B, H, D // H)  # h, c, n, m
    for k, name in enumerate(SLSTM.matrices):
        torch.testing.assert_close(state[name], S[k], rtol=1e-9, atol=1e-9)
    if conv_width:  # the last W − 1 inputs; the package keeps fewer when T < W − 1, we pad
        tail = ref_state["conv_state"]
        torch.testing.assert_close(state["conv"][:, -tail.shape[1] :], tail, rtol=0, atol=0)
        assert not state["conv"][:, : -tail.shape[1]].any()
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ref * w).sum().backward()
    (y * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("example", sorted(SLSTM.examples))
def test_prefill_then_decode_equals_one_pass(example):
    m, x = _mixer(**SLSTM.examples[example]), _x()
    y, S = m(x)
    y1, state = m(x[:, :30])
    steps = [y1]
    for t in range(30, T):
        yt, state = m(x[:, t : t + 1], state)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-9, atol=1e-9)
    for k in S:
        torch.testing.assert_close(state[k], S[k], rtol=1e-9, atol=1e-9)


def test_init_follows_the_package():
    m = build_mixer("slstm", D, num_heads=2)
    assert not m.R.any()  # recurrent_init "zeros", the package's default
    hd = D // 2
    torch.testing.assert_close(m.b[:, 1], forget_bias_init(hd).expand(2, hd))
    assert (m.b[:, 1, 0] == 5.0).all() and (m.b[:, 1, -1] == -7.0).all()
    assert not m.b[:, [0, 2, 3]].any()
    s = build_mixer("slstm", D, num_heads=2, recurrent_init="standard")
    assert s.R.abs().max() <= D**-0.5 and s.R.std() > 0.05


def test_forget_bias_is_the_package_init_of_a_first_block():
    cell_mod = pytest.importorskip("xlstm.blocks.slstm.cell")
    config = cell_mod.sLSTMCellConfig(hidden_size=D, num_heads=2, backend="vanilla")
    cell = cell_mod.sLSTMCell(config)  # _block_idx 0 of _num_blocks 1
    ours = build_mixer("slstm", D, num_heads=2).b.detach()
    torch.testing.assert_close(ours, cell.bias[:].float())


def test_state_shapes_and_declarations():
    m = build_mixer("slstm", D, num_heads=4)
    _, state = m(torch.randn(B, 5, D))
    assert {k: tuple(v.shape) for k, v in state.items()} == m.state_shapes(B)
    assert state["h"].shape == (B, 4, 8) and state["conv"].shape == (B, 3, D)
    assert m.state_bytes(state) == m.state_bytes_for(B, 100)
    assert "conv" not in build_mixer("slstm", D, conv_width=0).init_state(B)
    call = m.op_call()
    assert call.variant == "sigmoid" and call.H == 4 and call.dims == {"D": 8}
    f = m.flops(40)
    assert f.prefill.matmul == 40 * 8 * 4 * 8 * 8 and f.decode.matmul == 8 * 4 * 8 * 8


def test_bad_options():
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("slstm", D, num_heads=5)
    with pytest.raises(ValueError, match="conv_width"):
        build_mixer("slstm", D, conv_width=1)
    with pytest.raises(ValueError):
        build_mixer("slstm", D, forget="relu")


@pytest.mark.parametrize("pattern", ["slstm", "slstm,attn", "slstm(forget='exp'),attn"])
def test_builds_from_pattern_and_trains(pattern):
    from seqlab.model.lm import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=16, d_model=32, n_layers=2, pattern=pattern))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 16, (4, 13), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        out = model(ids[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
