"""Registry and config errors: unknown names and keys list the valid ones; bad sizes fail early."""

from __future__ import annotations

import pytest

from seqlab.mixers import MIXERS, build_mixer
from seqlab.mixers.attention import AttentionConfig
from seqlab.mixers.gla import GLA


@pytest.mark.parametrize("name", list(MIXERS))
def test_unknown_option_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="unknown option") as err:
        build_mixer(name, 32, no_such_option=1)
    for key in MIXERS[name].Config.model_fields:
        assert key in str(err.value)


def test_unknown_mixer_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown mixer 'mamba3'") as err:
        build_mixer("mamba3", 32)
    for name in MIXERS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("attn", {"num_heads": 0}, "num_heads"),
        ("attn", {"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ("attn", {"num_heads": 5}, "d_model = 32 must be a whole multiple of num_heads = 5"),
        ("attn", {"num_heads": 32}, "even head dim"),
        ("attn", {"window": 0}, "window"),
        ("gla", {"num_heads": 3}, "d_model \\* expand_k = 16"),
        ("retnet", {"num_heads": 2, "expand_v": 0.3}, "d_model \\* expand_v"),
        ("mamba2", {"head_dim": 24}, "head_dim = 24"),
        ("gdn", {"head_dim": 8, "expand_v": 0.3}, "head_dim \\* expand_v"),
        ("linear_attn", {"feature_map": "cosine"}, "valid names: 'identity', 'elu'"),
        ("linear_attn", {"feature_map": "identity"}, "non-negative feature map"),
        ("deltanet", {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_options_fail_with_a_message(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_mixer(name, 32, **options)


def test_identity_feature_map_is_allowed_without_normalisation():
    build_mixer("linear_attn", 32, feature_map="identity", normalize=False)


def test_a_mixer_rejects_another_mixers_config():
    with pytest.raises(TypeError, match="GLA takes a GLAConfig"):
        GLA(32, AttentionConfig())
