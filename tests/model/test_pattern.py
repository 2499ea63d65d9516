import pytest
from hypothesis import given
from hypothesis import strategies as st

from seqlab.model.pattern import LayerSpec, expand_pattern, parse_pattern


def test_repeat_and_options():
    layers = parse_pattern("gla(expand_k=0.5, name='x')*2, attn(window=256)")
    assert layers == [
        LayerSpec("gla", {"expand_k": 0.5, "name": "x"}),
        LayerSpec("gla", {"expand_k": 0.5, "name": "x"}),
        LayerSpec("attn", {"window": 256}),
    ]


def test_fill_n_layers():
    names = [layer.name for layer in expand_pattern("gdn*3,attn", 8)]
    assert names == ["gdn", "gdn", "gdn", "attn"] * 2
    assert [layer.name for layer in expand_pattern("gdn")] == ["gdn"]


def test_nested_literals_and_commas_inside_options():
    (layer,) = parse_pattern("moe(sizes=(1, 2), flags=[True, None])")
    assert layer.options == {"sizes": (1, 2), "flags": [True, None]}


@given(
    st.lists(
        st.tuples(st.sampled_from(["gdn", "attn", "gla", "mamba2"]), st.integers(1, 4)),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 3),
)
def test_expansion_matches_counts(items, reps):
    pattern = ",".join(f"{name}*{n}" for name, n in items)
    expected = [name for name, n in items for _ in range(n)]
    got = [layer.name for layer in expand_pattern(pattern, len(expected) * reps)]
    assert got == expected * reps


@pytest.mark.parametrize(
    "pattern, match",
    [
        ("", "non-empty"),
        ("gdn*3,,attn", "not of the form"),
        ("gdn(", "unbalanced"),
        ("gdn)", "unbalanced"),
        ("gdn*0", "repeat count"),
        ("gdn(3)", "key=value"),
        ("gdn(x=foo)", "option x must be a Python literal"),
        ("3gdn", "not of the form"),
    ],
)
def test_bad_patterns(pattern, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(pattern)


def test_n_layers_must_be_a_multiple():
    with pytest.raises(ValueError, match="not a multiple of the 4 layers"):
        expand_pattern("gdn*3,attn", 6)
    with pytest.raises(ValueError, match="positive int"):
        expand_pattern("gdn", 0)


@pytest.mark.parametrize(
    "pattern, n_layers", [("gdn*99999999999", None), ("gdn*6000,attn*6000", None), ("gdn", 200_000)]
)
def test_more_layers_than_max_layers_is_a_clear_error(pattern, n_layers):
    """'gdn*99999999999' ran out of memory listing its layers (a MemoryError traceback), and
    200,000 layers took over a minute to check on the meta device."""
    with pytest.raises(ValueError, match="10,000"):
        expand_pattern(pattern, n_layers)


def test_an_experiment_with_too_many_layers_names_n_layers():
    from seqlab.experiment import experiment_from_dict

    with pytest.raises(ValueError, match=r"n_layers"):
        experiment_from_dict({"task": {"name": "mqar"}, "model": {"n_layers": 20_000}})
