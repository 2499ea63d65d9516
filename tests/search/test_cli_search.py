"""`seqlab search` and `seqlab search export` end to end, in this process (one worker): a tiny
space on a 16-token MQAR, a few trials of 20 steps each.

Proves: the search prints the Pareto table and writes the plots and the CSV; the known
architectures run first; every trained trial is a run in the results store with its study and
trial; running the same command again trains nothing; `export --trial N` writes TOML that
`seqlab train --config` turns into the same run (the same accuracy); bad arguments fail before
any trial, naming the option.

Run: .venv/bin/python -m pytest tests/search/test_cli_search.py -q
"""

from __future__ import annotations

import re

import optuna
import pytest
import tomli_w
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.experiment import experiment_to_toml
from seqlab.train.results import ResultsStore
from tests.search.spaces_util import TINY_SPACE, tiny_base

TRIALS = 5


def run(args):
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=250)
    return result, " ".join(result.output.split())


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search of TRIALS trials, then the same command again."""
    tmp = tmp_path_factory.mktemp("search")
    space, base = tmp / "tiny.toml", tmp / "base.toml"
    space.write_text(tomli_w.dumps(TINY_SPACE))
    base.write_text(experiment_to_toml(tiny_base()))
    out, db = tmp / "out", tmp / "results.db"
    args = ["search", "--space", space, "--config", base, "--trials", TRIALS, "--out", out]
    args += ["--results", db, "--threads", 1, "--seed", 0, "--sampler", "random"]
    first = run(args)
    runs_after_first = ResultsStore(db).count()
    again = run(args)
    return tmp, out, db, first, again, runs_after_first


def study_of(out):
    return optuna.load_study(study_name="mqar-tiny", storage=f"sqlite:///{out}/study.db")


def test_a_search_prints_its_front_and_writes_its_files(searched):
    _, out, db, (result, text), _, runs = searched
    assert result.exit_code == 0, result.output
    assert "Pareto front of study 'mqar-tiny'" in text
    assert f"[{TRIALS}/{TRIALS} finished]" in text  # one progress line per trial
    for name in ("pareto.png", "hypervolume.png", "trials.csv"):
        assert (out / name).stat().st_size > 0
    study = study_of(out)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert len(trials) == TRIALS and all(t.state.name == "COMPLETE" for t in trials)
    # the space's three known architectures were enqueued, so they ran first
    assert [t.user_attrs.get("known") for t in trials[:3]] == ["attention", "gla", "hybrid"]
    trained = [t for t in trials if t.user_attrs.get("duplicate_of") is None]
    records = ResultsStore(db).runs()
    assert runs == len(records) == len(trained)
    by_trial = {r["search"]["trial"]: r for r in records}
    for t in trained:
        assert by_trial[t.number]["id"] == t.user_attrs["run_id"]
        assert by_trial[t.number]["search"]["study"] == "mqar-tiny"
    with open(out / "trials.csv") as f:
        assert len(f.read().strip().splitlines()) == TRIALS + 1


def test_the_same_command_again_trains_nothing(searched):
    _, out, db, _, (result, text), runs = searched
    assert result.exit_code == 0, result.output
    assert f"{TRIALS} of {TRIALS} trials finished; nothing to run" in text
    assert len(study_of(out).get_trials()) == TRIALS
    assert ResultsStore(db).count() == runs
    assert "Pareto front" in text  # still shows what the study found


def test_export_then_train_reproduces_the_trial(searched):
    tmp, out, db, _, _, _ = searched
    trial = next(t for t in study_of(out).get_trials() if t.user_attrs.get("known") == "gla")
    exported = tmp / "trial.toml"
    result, text = run(
        ["search", "export", "--out", out, "--trial", trial.number, "--to", exported]
    )
    assert result.exit_code == 0, result.output
    printed, _ = run(["search", "export", "--out", out, "--trial", trial.number])
    assert printed.output == exported.read_text()
    args = ["train", "--config", exported, "--results", tmp / "again.db", "--no-progress"]
    result, text = run([*args, "--out", tmp / "again"])
    assert result.exit_code == 0, result.output
    (again,) = ResultsStore(tmp / "again.db").runs()
    (original,) = [r for r in ResultsStore(db).runs() if r["id"] == trial.user_attrs["run_id"]]
    assert again["metrics"]["final"]["all"] == trial.values[0]
    for key in ("final", "best", "loss"):  # the same training, to the last bit
        assert again["metrics"][key] == original["metrics"][key]
    assert again["model"] == original["model"]
    assert {**again["train"], "out_dir": None} == {**original["train"], "out_dir": None}


@pytest.mark.parametrize(
    "args,option,words",
    [
        (["--space", "nope"], "--space", ["nope", "demo", "default"]),
        (["--objective", "accuracy,speed"], None, ["speed", "state_bytes"]),
        (["--sampler", "grid"], None, ["grid", "tpe", "nsga2", "random"]),
        (["--executor", "slurm"], None, ["slurm", "local", "ray"]),
        (["--storage", "mysql+nodriver://x/y"], "--storage", ["mysql"]),
        (["--set", "train.nope=1"], None, ["train.nope"]),
        (["--task", "nope"], None, ["nope", "mqar"]),
    ],
)
def test_bad_arguments_fail_before_any_trial(args, option, words, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a trial started")

    monkeypatch.setattr("seqlab.search.objective.run_experiment", no_training)
    out = tmp_path / "out"
    result, text = run(["search", *args, "--out", out, "--results", tmp_path / "r.db"])
    assert result.exit_code == 2, result.output
    if option:
        assert option in text
    for word in words:
        assert word in text, (word, text)
    assert not (out / "trials").exists()


def test_export_names_what_is_missing(searched, tmp_path):
    _, out, _, _, _, _ = searched
    result, text = run(["search", "export", "--out", out, "--trial", 99])
    assert result.exit_code == 2 and "--trial" in text and "no trial 99" in text
    assert re.search(r"trials with a config: 0-\d", text), text
    result, text = run(["search", "export", "--out", tmp_path, "--trial", 0])
    assert result.exit_code == 2 and "--out" in text and "no study database" in text
    result, text = run(["search", "export", "--out", out, "--study", "other", "--trial", 0])
    assert result.exit_code == 2 and "--study" in text and "mqar-tiny" in text


def test_set_warns_only_for_what_the_space_sets_per_candidate():
    from seqlab.search.cli import _searched_keys
    from tests.search.spaces_util import tiny_space

    given = ["train.lr=1e-3", "model.d_model=32", "model.pattern=gdn", "model.channel=swiglu"]
    given += ["train.steps=50", "model.init_std=0.01", "model.norm_eps=1e-6", "task.name=mqar"]
    assert _searched_keys(tiny_space(), given) == [
        "train.lr",
        "model.d_model",
        "model.pattern",
        "model.channel",
    ]
