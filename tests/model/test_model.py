import os
import resource

import pytest
import torch

from seqlab.mixers import MIXERS
from seqlab.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seqlab.model.generate import Stream, generate, sample, stream
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.model.pattern import expand_pattern
from tests.host_reads import HostReads

VOCAB = 37
ARCHS = [*sorted(MIXERS), "gdn*3,attn", "gla,attn(window=4)", "mamba2,deltanet"]
RECURRENT = sorted(set(MIXERS) - {"attn"})


def small(pattern: str, n_layers: int | None = None, **kw) -> CausalLM:
    n = n_layers or max(2, len(expand_pattern(pattern)))
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n, pattern=pattern, **kw))


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_a_step(arch):
    model = small(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(2, 24)
    losses = []
    for _ in range(3):
        out = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_full_forward(arch):
    model = small(arch).double()
    x = ids(2, 13)
    full = model(x).logits
    out = model(x[:, :6])
    logits = [out.logits]
    for t in range(6, 13):
        out = model(x[:, t : t + 1], state=out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("channel", ["swiglu", "moe(num_experts=8, top_k=2, shared_expert=True)"])
def test_a_decode_step_reads_nothing_back_to_the_host(channel):
    """Every mixer and channel mixer in one model: on a GPU a decode step queues its kernels
    and never waits for the device (a host read would make every layer wait)."""
    model = small("attn,gla,retnet,mamba2,deltanet,gdn,linear_attn", channel=channel).eval()
    with torch.no_grad():
        state = model(ids(2, 9)).state
        with HostReads() as spy:
            model(ids(2, 1), state=state, check_ids=False)  # as `generate` calls it
    assert spy.reads == []


def test_generate_reads_the_host_only_to_check_the_prompt():
    """The prompt's id check reads min and max; each generated token adds no host read."""
    model = small("gdn,attn").eval()
    counts = []
    for n in (1, 6):
        with HostReads() as spy:
            generate(model, ids(2, 5), max_new_tokens=n, temperature=0)
        counts.append(len(spy.reads))
    assert counts == [2, 2]


@pytest.mark.parametrize("arch", ["gdn*3,attn", "gla"])
def test_prefill_then_decode_float32(arch):
    model = small(arch)
    x = ids(2, 20)
    full = model(x).logits
    out = model(x[:, :9])
    logits = [out.logits]
    for t in range(9, 20):
        out = model(x[:, t : t + 1], state=out.state)
        logits.append(out.logits)
    # float32: chunk and recurrent forms differ only by round-off.
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_and_stream(arch):
    model = small(arch).double()
    prompt = ids(1, 5)
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    # Greedy decoding is the argmax of a full forward pass at every step.
    torch.testing.assert_close(model(out[:, :-1]).logits[0, 4:].argmax(-1), out[0, 5:])
    full = model(out).logits[0]
    for block in (1, 4):
        streamed = torch.stack(list(stream(model, iter(out[0].tolist()), block_size=block)))
        torch.testing.assert_close(streamed, full, rtol=1e-8, atol=1e-10)


def test_seeded_sampling_is_reproducible():
    model = small("gdn")
    prompt = ids(2, 4)
    a = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_top_k_top_p_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    # softmax of these logits: 0.636, 0.234, 0.086, ...: top_p 0.8 keeps tokens 0 and 1.
    assert set(sample(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample(logits, temperature=0).tolist()) == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1.0)


def test_sample_overflowing_temperature_is_greedy_and_masked_logits_stay_masked():
    """logits / 1e-40 overflows float32: it acts as its limit, greedy, instead of NaN probs."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.0], [-5.0, -1.0, float("-inf"), -3.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample(logits, temperature=1e-40, generator=gen).tolist() == [1, 1]
        assert sample(logits, temperature=1e-40, top_k=2, top_p=0.5, generator=gen).tolist() == [
            1,
            1,
        ]
    # a moderate temperature with a -inf logit is not sent to greedy: both finite tokens occur
    row = torch.tensor([[0.0, 0.0, float("-inf")]]).expand(400, -1)
    assert set(sample(row, temperature=0.5, generator=gen).tolist()) == {0, 1}


def test_sample_tiny_top_p_keeps_the_most_likely_token():
    """top_p = 1e-300 rounds to 0 in float32; the most likely token is still kept."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, top_p=1e-300, generator=gen).tolist() == [0, 2]
    assert sample(logits, top_p=1e-3, generator=gen).tolist() == [0, 2]


@pytest.mark.parametrize("k", [2.5, 0, -1, True, "2"])
def test_sample_refuses_a_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        sample(torch.zeros(2, 5), top_k=k)


def test_generate_with_extreme_sampling_settings():
    prompt = ids(2, 3)
    greedy = generate(small("gdn"), prompt, max_new_tokens=3, temperature=0)
    tiny = generate(small("gdn"), prompt, max_new_tokens=3, temperature=1e-40, seed=0)
    assert torch.equal(tiny, greedy)
    out = generate(small("gdn"), prompt, max_new_tokens=3, top_p=1e-300, top_k=2, seed=0)
    assert out.shape == (2, 6)
    with pytest.raises(ValueError, match="top_k"):
        generate(small("gdn"), prompt, max_new_tokens=3, top_k=2.5)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_stream_100k_tokens_in_constant_memory():
    model = small("gdn,mamba2")
    tokens = (i * 7919 % VOCAB for i in range(100_000))
    state_sizes, rss = [], []
    seen = 0
    s = Stream(model, block_size=500)
    for seen, _ in enumerate(s(tokens), 1):
        if seen % 10_000 == 0:
            state_sizes.append(s.state_bytes)
            rss.append(_rss_bytes())
    assert seen == 100_000
    assert len(set(state_sizes)) == 1
    # After the first blocks warm the allocator up, memory must not grow with the stream.
    assert max(rss[2:]) - rss[2] < 16 * 2**20, [r // 2**20 for r in rss]


def test_state_bytes_reported_match_real_state():
    for arch in ARCHS:
        model = small(arch)
        for T in (5, 17):
            out = model(ids(3, T))
            assert model.state_bytes_for(3, T) == CausalLM.state_bytes(out.state), arch
    rec = small("gdn*2")
    assert rec.state_bytes_for(1, 10) == rec.state_bytes_for(1, 10_000)
    att = small("attn")
    assert att.state_bytes_for(1, 2000) == 2 * att.state_bytes_for(1, 1000) - att.state_bytes_for(
        1, 0
    )


def test_num_params_counts_tied_weights_once():
    model = small("gdn")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(include_embedding=False) == model.num_params() - 32 * VOCAB


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="valid options"):
        ModelConfig.make(vocab_size=10, d_modle=3)
    with pytest.raises(ValueError, match="layer 0 .*nope"):
        small("nope")
    with pytest.raises(ValueError, match="not a multiple"):
        small("gdn*3,attn", n_layers=6)
    model = small("gdn")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 37\)"):
        model(torch.tensor([[0, 37]]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\), got -1 .. 5"):
        list(stream(model, [5, -1], block_size=2))
    with pytest.raises(ValueError, match="int64/int32"):
        model(torch.zeros(1, 3))


@pytest.mark.parametrize("pattern", ["mlstm(proj_factor=1e30)", "gdn(expand_v=1e30)"])
def test_a_layer_option_too_large_names_the_layer_and_the_overflow(pattern):
    """Options whose sizes overflow int64: the error names the layer and the overflow, with no
    C++ location from torch after it (it carried 'Exception raised from THPUtils_unpackLong')."""
    config = ModelConfig(vocab_size=10, d_model=16, n_layers=1, pattern=pattern)
    with pytest.raises(ValueError, match=r"layer 0 .*overflows 64-bit indexing") as e:
        with torch.device("meta"):
            CausalLM(config)
    assert "Exception raised from" not in str(e.value) and "\n" not in str(e.value)


def test_sizes_that_overflow_are_a_value_error_naming_them():
    from seqlab.profile.cost import meta_model

    config = ModelConfig(vocab_size=10, d_model=2**63 - 1, n_layers=1, pattern="gla")
    with pytest.raises(ValueError, match=r"too large to build.*d_model 9223372036854775807"):
        meta_model(config)


def test_checkpoint_round_trip(tmp_path):
    model = small("gdn*3,attn", channel="moe(num_experts=4, top_k=2)")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    x = ids(2, 9)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.config == model.config


def test_checkpoint_mismatch_is_named(tmp_path):
    path = save_checkpoint(small("gdn"), tmp_path / "m.safetensors")
    other = ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=2, pattern="gdn")
    with pytest.raises(CheckpointError, match="d_model: checkpoint has 32, config has 48"):
        load_checkpoint(path, config=other)


def test_truncated_or_corrupt_checkpoint_detected(tmp_path):
    path = save_checkpoint(small("gdn"), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(small("gdn"), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("seqlab.model.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(small("gla"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("n", [-1, 1.5, True, None])
def test_generate_refuses_a_bad_token_count(n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(small("gdn"), ids(1, 3), max_new_tokens=n)


def test_generate_zero_tokens_is_the_prompt_and_nan_temperature_an_error():
    prompt = ids(2, 3)
    assert torch.equal(generate(small("gdn"), prompt, max_new_tokens=0), prompt)
    with pytest.raises(ValueError, match="temperature"):
        generate(small("gdn"), prompt, max_new_tokens=2, temperature=float("nan"))


@pytest.mark.parametrize("arch", sorted(MIXERS))
def test_an_empty_batch_gives_empty_logits(arch):
    assert small(arch)(ids(0, 5)).logits.shape == (0, 5, VOCAB)
