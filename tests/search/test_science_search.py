"""The search rediscovers that parity needs negative eigenvalues (issue 15, item 7).

`seqlab search --task parity --space parity`: one layer of width 32, Gated DeltaNet and DeltaNet
with and without negative eigenvalues, GLA, RetNet or attention, two learning rates, trained on
lengths 3-40 and tested on 41-128. The search's best trial must be a negative-eigenvalue
model (at least 99 %), and every candidate without them stays near chance (README, "The scientific
checks": 8 trials here, about a minute with 2 workers on 2 cores).

Run: .venv/bin/python -m pytest tests/search/test_science_search.py -q
"""

from __future__ import annotations

import optuna
from typer.testing import CliRunner

from seqlab.cli import app


def test_a_parity_search_ranks_negative_eigenvalues_first(tmp_path):
    out = tmp_path / "parity"
    args = ["search", "--task", "parity", "--space", "parity", "--trials", "8", "--workers", "2"]
    args += ["--sampler", "tpe", "--seed", "0", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="parity-parity", storage=f"sqlite:///{out}/study.db")
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 8

    def negative(trial) -> bool:
        return "allow_neg_eigval=True" in trial.user_attrs["config"]["model"]["pattern"]

    ranked = sorted(trials, key=lambda t: -t.values[0])
    summary = [(round(t.values[0], 3), t.user_attrs["arch"]) for t in ranked]
    assert negative(ranked[0]) and ranked[0].values[0] >= 0.99, summary
    for t in trials:  # no candidate without negative eigenvalues leaves chance far behind
        if not negative(t):
            assert t.values[0] <= 0.7, summary
    assert any(not negative(t) for t in trials), summary  # the comparison was made
