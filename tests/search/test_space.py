"""Search spaces: the shipped ones load and every sampled candidate builds, candidates are
canonical, known architectures round-trip through Optuna, and bad spaces fail naming the key.

Run: .venv/bin/python -m pytest tests/search/test_space.py -q
"""

from __future__ import annotations

import copy

import optuna
import pytest
from optuna.trial import FixedTrial

from seqlab.experiment import ModelSpec, load_experiment
from seqlab.mixers import MIXERS
from seqlab.mixers.gla import GLA
from seqlab.model.pattern import expand_pattern
from seqlab.search.space import (
    SHIPPED,
    SearchSpace,
    SpaceError,
    attention_count,
    attention_positions,
    canonical_model,
    canonical_pattern,
)
from tests.search.spaces_util import TINY_SPACE, tiny_base, tiny_space


def layer_names(candidate) -> list[str]:
    return [s.name for s in expand_pattern(candidate.pattern, candidate.model["n_layers"])]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_with_their_known_architectures(name):
    space = SearchSpace.load(name)
    assert space.name == name and space.description
    known = space.known()
    # parity's are Gated DeltaNet with and without negative eigenvalues
    parity = {"gdn", "gdn-negative-eigenvalues"}
    assert (parity if name == "parity" else {"attention", "gdn", "hybrid-3:1"}) <= set(known)
    for label, params in known.items():
        candidate = space.sample(FixedTrial(params))
        assert space.known_name(candidate) == label
        names = layer_names(candidate)
        if label == "attention":
            assert set(names) == {"attn"}
        elif label == "hybrid-3:1":
            assert names == ["gdn", "gdn", "gdn", "attn"] * (len(names) // 4)
        elif label.startswith("gdn"):
            assert set(names) == {"gdn"}
            negative = candidate.params.get("gdn.allow_neg_eigval", False)
            assert negative == label.endswith("negative-eigenvalues")
    # the space's base is a valid experiment under which the known architectures build
    base = load_experiment(defaults=space.base)
    for params in known.values():
        space.sample(FixedTrial(params)).experiment(base)


@pytest.mark.parametrize("name,trials", [("demo", 60), ("default", 80)])
def test_every_sampled_candidate_builds(name, trials):
    """Random sampling over many trials: each candidate's experiment builds (ModelSpec builds
    the model on the meta device), its pattern is canonical, and its params give it back."""
    space = SearchSpace.load(name)
    base = load_experiment(defaults=space.base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    patterns, keys = set(), set()
    for _ in range(trials):
        trial = study.ask()
        candidate = space.sample(trial)
        cfg = candidate.experiment(base)
        assert cfg.model.pattern == candidate.pattern
        assert canonical_pattern(candidate.pattern, cfg.model.n_layers)[0] == candidate.pattern
        assert candidate.params == trial.params
        assert space.sample(FixedTrial(trial.params)).key == candidate.key
        patterns.add(candidate.pattern)
        keys.add(candidate.key)
        study.tell(trial, 0.0)
    assert len(keys) > trials // 2 and len(patterns) > 10


@pytest.mark.parametrize(
    "sampler",
    [
        optuna.samplers.TPESampler(seed=0, n_startup_trials=4),
        optuna.samplers.NSGAIISampler(seed=0, population_size=4),
    ],
    ids=["tpe", "nsga2"],
)
def test_conditional_params_work_with_tpe_and_nsga2(sampler):
    space = SearchSpace.load("demo")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for i in range(12):
        trial = study.ask()
        candidate = space.sample(trial)
        study.tell(trial, [i % 3 / 3, len(candidate.key)])
    assert len(study.trials) == 12


@pytest.mark.parametrize(
    "a,b",
    [
        (("gdn,gdn,gdn,attn", None), ("gdn*3,attn", 4)),
        (("gdn*3,attn", 8), ("gdn(allow_neg_eigval=False)*3,attn(num_heads=8),gdn*3,attn", 8)),
        (("gla(num_heads=2, expand_k=1)", 2), ("gla(expand_k=1.0,num_heads=2)*2", None)),
        (("attn(window=None)", 3), ("attn", 3)),
    ],
)
def test_equal_architectures_written_differently_are_one_pattern(a, b):
    assert canonical_pattern(*a) == canonical_pattern(*b)


def test_canonical_patterns_read_back_and_keep_what_differs():
    assert canonical_pattern("gdn,gdn,gdn,attn") == ("gdn*3,attn", 4)
    assert canonical_pattern("attn,gdn*3", 8) == ("attn,gdn*3", 8)
    assert canonical_pattern("gdn(allow_neg_eigval=True),gdn", 2) == (
        "gdn(allow_neg_eigval=True),gdn",
        2,
    )
    assert canonical_pattern("gla(expand_k=1)", 1) == ("gla(expand_k=1.0)", 1)
    spec = ModelSpec(pattern="gdn,attn,gdn,attn", channel="swiglu(multiple_of=16)", n_layers=4)
    model = canonical_model(spec)
    assert model["pattern"] == "gdn,attn" and model["channel"] == "swiglu"
    assert model["n_layers"] == 4


def test_keys_are_equal_for_equal_candidates_and_differ_otherwise():
    space = tiny_space()
    hybrid = space.known()["hybrid"]
    same = space.sample(FixedTrial(hybrid))
    assert same.pattern == "gdn(num_heads=2),attn(num_heads=2)"
    # a space drawing the mixer per layer writes the same architecture the same way
    per_layer = tiny_space(mixers={"use": ["gla", "gdn"], "per_layer": True}, known=None)
    params = {k: v for k, v in hybrid.items() if not k.startswith(("mixer", "gdn."))}
    params |= {"mixer.0": "gdn", "gdn.allow_neg_eigval.0": False}
    assert per_layer.sample(FixedTrial(params)).key == same.key
    different = [
        hybrid | {"lr": 1e-2},
        hybrid | {"gdn.allow_neg_eigval": True},
        hybrid | {"n_layers": 1, "fraction": 0.0},
        hybrid | {"mixer": "gla"},
    ]
    del different[3]["gdn.allow_neg_eigval"]
    keys = {space.sample(FixedTrial(p)).key for p in different}
    assert len(keys) == len(different) and same.key not in keys


def test_a_per_layer_space_draws_each_layer():
    space = tiny_space(
        model={"n_layers": 4, "d_model": 16},
        mixers={"use": ["gla", "gdn"], "per_layer": True},
        known=None,
    )
    params = {
        "fraction": 0.5,
        "mixer.0": "gla",
        "mixer.2": "gdn",
        "gdn.allow_neg_eigval.2": True,
        "lr": 3e-3,
    }
    candidate = space.sample(FixedTrial(params))
    assert candidate.pattern == (
        "gla(num_heads=2),attn(num_heads=2),"
        "gdn(allow_neg_eigval=True, num_heads=2),attn(num_heads=2)"
    )
    assert candidate.params == params


def test_known_params_round_trip_through_an_enqueued_trial():
    space = SearchSpace.load("demo")
    study = optuna.create_study(directions=["maximize", "minimize"])
    for params in space.known().values():
        study.enqueue_trial(params)
    for name, params in space.known().items():
        trial = study.ask()
        candidate = space.sample(trial)
        assert trial.params == params
        assert space.known_name(candidate) == name
        study.tell(trial, [0.5, 1.0])


def test_a_newly_registered_mixer_joins_all_and_takes_the_widths(monkeypatch):
    class Wide(GLA):
        pass

    monkeypatch.setitem(MIXERS, "wide_gla", Wide)
    space = tiny_space(mixers={"use": "all", "exclude": ["mamba2"]}, known=None)
    assert "wide_gla" in space.mixers and "mamba2" not in space.mixers
    params = {"n_layers": 1, "fraction": 0.0, "mixer": "wide_gla", "lr": 3e-3}
    candidate = space.sample(FixedTrial(params))
    assert candidate.pattern == "wide_gla(num_heads=2)"


def test_ranges_sample_with_suggest_int_and_float():
    space = tiny_space(
        model={"n_layers": {"low": 1, "high": 3}, "d_model": 16},
        train={"lr": {"low": 1e-3, "high": 1e-1, "log": True}},
        known={"gla": {"mixer": "gla", "fraction": 0.0}},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        candidate = space.sample(trial)
        assert 1 <= candidate.model["n_layers"] <= 3 and 1e-3 <= candidate.train["lr"] <= 1e-1
        study.tell(trial, 0.0)
    distributions = study.trials[0].distributions
    assert isinstance(distributions["n_layers"], optuna.distributions.IntDistribution)
    assert distributions["lr"].log
    # a known entry leaves a range out: its middle (geometric for log)
    known = space.known()["gla"]
    assert known["n_layers"] == 2 and known["lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize(
    "fraction,n_layers,count", [(0.25, 4, 1), (0.25, 2, 1), (0.5, 2, 1), (0.125, 4, 1)]
)
def test_attention_counts_round_half_up_within_bounds(fraction, n_layers, count):
    assert attention_count(fraction, n_layers) == count
    assert attention_count(0.0, n_layers) == 0 and attention_count(1.0, n_layers) == n_layers
    assert attention_count(0.99, n_layers) == n_layers - 1


def test_attention_placements():
    assert attention_positions("striped", 1, 4) == {3}
    assert attention_positions("striped", 2, 4) == {1, 3}
    assert attention_positions("striped", 3, 8) == {1, 4, 7}
    assert attention_positions("last", 2, 6) == {4, 5}
    assert attention_positions("first", 2, 6) == {0, 1}


def changed(path: str, value, data=None) -> dict:
    """TINY_SPACE with the dotted `path` set to `value` (a "-" value deletes it)."""
    data = copy.deepcopy(data or TINY_SPACE)
    *tables, key = path.split(".")
    table = data
    for t in tables:
        table = table.setdefault(t, {})
    if value == "-":
        del table[key]
    else:
        table[key] = value
    return data


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("modle", {}, "tiny.toml: unknown key(s) modle; valid keys: name, description, model"),
        ("model.d_model", "-", "model.d_model: required"),
        ("model.d_model", "64", "model.d_model: '64' is not valid"),
        ("model.pattern", "gdn", "model: unknown key(s) pattern"),
        ("mixers.use", ["gdm"], "mixers.use: unknown name 'gdm'; registered: attn, linear_attn"),
        ("mixers.use", "some", 'mixers.use: must be "all" or a non-empty list'),
        ("mixers.per_layer", 1, "mixers.per_layer: must be true or false"),
        ("widths.num_head", [2], "widths.num_head: no mixer drawn here (attn, gdn, gla) has"),
        ("options.gdn.allow_neg", [True], "options.gdn: unknown key(s) allow_neg; valid keys:"),
        ("options.retnet", {}, "options: unknown key(s) retnet; valid keys: gla, gdn"),
        ("hybrid.attention", "atn", "hybrid.attention: unknown mixer 'atn'"),
        ("hybrid.fraction", [0.0, 1.5], "hybrid.fraction: fractions lie in [0, 1], got 1.5"),
        ("hybrid.placement", "middle", "hybrid.placement: must be one or a list of"),
        ("train.lr", [3e-3, 3e-3], "train.lr: lists 0.003 twice"),
        ("train.lr", [], "train.lr: an empty list of choices"),
        ("train.lr", {"low": 1e-2, "high": 1e-3}, "train.lr: low = 0.01 must be below high"),
        ("train.lr", {"low": 0.0, "high": 1e-3, "log": True}, "a log range needs low > 0"),
        ("train.lr", {"low": 1e-3, "top": 1e-2}, "a range is a table {low, high}"),
        ("train.lr", [-1.0, 1e-3], "train.lr: -1.0 is not valid: Input should be greater than 0"),
        ("train.out_dir", "runs", "train: unknown key(s) out_dir"),
        ("channel.use", ["swigluu"], "channel.use: unknown name 'swigluu'; registered: mlp"),
        ("channel.options.moe", {"top_k": 1}, "channel.options: unknown key(s) moe"),
        ("base.train.stepz", 3, "base: unknown key 'train.stepz'"),
        ("known.x", {"fraction": 0.3}, "known.x: fraction = 0.3 is not one of [0.0, 0.5, 1.0]"),
        ("known.x", {"fraction": 1.0, "mixer": "gla"}, "known.x: sets mixer, which this"),
        ("known.x", {"fraction": 1.0}, "known.x: the same candidate as known.attention"),
    ],
)
def test_bad_spaces_fail_naming_the_file_and_key(path, value, message):
    with pytest.raises(SpaceError) as e:
        SearchSpace(changed(path, value), "tiny.toml")
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_combination_that_does_not_build_is_refused_at_load():
    data = changed("model.d_model", [16, 24])
    data = changed("widths.num_heads", [2, 16], data)
    with pytest.raises(SpaceError, match=r"gla does not build with d_model=16, num_heads=16"):
        SearchSpace(data, "tiny.toml")


def test_load_finds_shipped_names_and_files(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\nn_layers = 2\nd_model = 16\n[mixers]\nuse = ["gla"]\n')
    space = SearchSpace.load(path)
    assert space.name == "mine" and space.source == str(path)
    assert space.sample(FixedTrial({})).key == ("gla | channel=swiglu | d_model=16 | n_layers=2")
    with pytest.raises(SpaceError, match="no search space 'nope': shipped spaces are default"):
        SearchSpace.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(SpaceError, match=f"{bad}: not valid TOML"):
        SearchSpace.load(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\nn_layers = 2\nd_model = 16\n[mixers]\nuse = ['gdm']\n")
    with pytest.raises(SpaceError, match=f"{wrong}: mixers.use: unknown name 'gdm'"):
        SearchSpace.load(wrong)


def test_fixed_values_need_no_param_and_a_tuple_field_takes_a_list():
    space = tiny_space(
        model={"n_layers": 1, "d_model": [16]},
        train={"lr": 1e-2, "betas": [0.8, 0.99], "grad_clip": "none"},
        known=None,
    )
    candidate = space.sample(FixedTrial({"fraction": 0.0, "mixer": "gla"}))
    assert candidate.params == {"fraction": 0.0, "mixer": "gla"}
    assert candidate.train == {"lr": 1e-2, "betas": (0.8, 0.99), "grad_clip": None}
    cfg = candidate.experiment(tiny_base())
    assert cfg.train.betas == (0.8, 0.99) and cfg.train.grad_clip is None
    assert cfg.model.n_layers == 1 and cfg.model.d_model == 16


def test_a_candidate_maps_onto_the_base():
    space = tiny_space()
    base = tiny_base()
    candidate = space.sample(FixedTrial(space.known()["hybrid"] | {"lr": 1e-2}))
    cfg = candidate.experiment(base)
    assert cfg.model.pattern == "gdn(num_heads=2),attn(num_heads=2)"
    assert cfg.model.n_layers == 2
    assert cfg.model.d_model == 16 and cfg.model.channel is None
    assert cfg.train.lr == 1e-2 and cfg.train.steps == base.train.steps
    assert cfg.task == base.task
