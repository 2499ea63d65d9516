import csv
import io
import json
import tomllib
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import matplotlib.image
import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from seqlab.search import report
from tests.search.studies import add, config_for, demo_study, new_study, random_study


def losses(study, trial):
    return [
        -v if d == "maximize" else v
        for v, d in zip(trial.values, study.user_attrs["directions"], strict=True)
    ]


def brute_force_front(study) -> set[int]:
    """COMPLETE, every constraint ≤ 0 (user_attrs and sampler), not a duplicate of another such
    trial, and no other such trial at least as good in every objective and better in one."""
    done = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE
        and all(c <= 0 for c in t.user_attrs.get("constraints", []))
        and all(c <= 0 for c in t.constraints.values())
    ]
    numbers = {t.number for t in done}
    done = [t for t in done if t.user_attrs.get("duplicate_of") not in numbers]

    def dominates(a, b):
        la, lb = losses(study, a), losses(study, b)
        return all(x <= y for x, y in zip(la, lb, strict=True)) and any(
            x < y for x, y in zip(la, lb, strict=True)
        )

    return {t.number for t in done if not any(dominates(u, t) for u in done)}


@pytest.mark.parametrize("n_objectives,seed", [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0)])
def test_front_matches_brute_force(n_objectives, seed):
    study = random_study(n_objectives, seed)
    rows = report.pareto_rows(study)
    expected = brute_force_front(study)
    assert {r["trial"] for r in rows} == expected
    assert len(rows) == len(expected) > 1
    names = study.user_attrs["objectives"]
    first_cost = [r[names[1]] for r in rows]
    assert first_cost == sorted(first_cost)
    by_number = {t.number: t for t in study.trials}
    for r in rows:
        t = by_number[r["trial"]]
        assert [r[n] for n in names] == t.values
        assert (r["arch"], r["run_id"]) == (t.user_attrs["arch"], t.user_attrs["run_id"])


def test_front_leaves_out_failed_infeasible_and_duplicate_trials():
    study = demo_study()
    rows = report.pareto_rows(study)
    # 7 (an attention model over the parameter limit) would beat every trial on accuracy
    assert [r["trial"] for r in rows] == [10, 4, 3, 9, 2, 0]
    assert rows[-1] == {
        "trial": 0,
        "accuracy": 0.97,
        "state_bytes": 512 * 1024,
        "params": 210e3,
        "arch": "attn",
        "known": "attention",
        "run_id": "run-0000",
    }
    assert rows[-2]["known"] == "hybrid 3:1"  # trial 2, not its duplicate 8
    assert [t.number for t in report.front_trials(study)] == [0, 2, 3, 4, 9, 10]


def test_sampler_constraints_count_as_well():
    study = new_study()
    add(study, "attn", [0.9, 4096.0, 1e5], sampler_constraints={"params": 1.0})
    add(study, "gdn", [0.5, 1024.0, 1e5])
    assert [r["trial"] for r in report.pareto_rows(study)] == [1]


def test_duplicate_of_an_unlisted_trial_stands_for_its_architecture():
    study = new_study()
    add(study, "attn", [0.9, 4096.0, 1e5], constraints=[1.0])
    add(study, "attn", [0.9, 4096.0, 1e5], duplicate_of=0)  # of an infeasible trial: shown
    add(study, "gdn", [0.5, 1024.0, 1e5], duplicate_of=17)  # of a run outside this study
    assert [r["trial"] for r in report.pareto_rows(study)] == [2, 1]


def rendered(table) -> tuple[str, list[list[str]]]:
    """The table's text and the cells of its body rows."""
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    lines = [line for line in text.splitlines() if line.startswith("│")]
    return text, [[c.strip() for c in line.split("│")[1:-1]] for line in lines]


def test_table_in_human_units():
    text, cells = rendered(report.pareto_table(demo_study()))
    assert "Pareto front of study 'mqar-demo': 6 of 8 completed feasible trials" in text
    assert "accuracy %" in text and "state bytes per sequence" in text
    assert cells[0] == ["10", "30.0", "8 KiB", "120k", "gla", "", "run-0010"]
    assert cells[-1] == ["0", "97.0", "512 KiB", "210k", "attn", "attention", "run-0000"]
    assert ["2", "93.0", "140 KiB", "197k", "gdn*3,attn", "hybrid 3:1", "run-0002"] in cells
    assert len(cells) == 6


def test_table_of_bits_per_byte_and_flops():
    study = new_study(["bits_per_byte", "flops_per_token"], ["minimize", "minimize"], name="text")
    add(study, "gdn", [1.25, 3.4e6])
    add(study, "attn", [1.5, 2.1e6])
    add(study, "gla", [1.75, 2.5e6])  # worse on both than trial 1
    text, cells = rendered(report.pareto_table(study))
    assert "bits_per_byte" in text and "FLOPs per token" in text
    assert cells == [
        ["1", "1.5", "2.1M", "attn", "", "run-0001"],
        ["0", "1.25", "3.4M", "gdn", "", "run-0000"],
    ]


def png_size(path: Path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image.shape[1], image.shape[0]


def test_plots_are_written_whole(tmp_path):
    study = demo_study()
    pareto = report.plot_pareto(study, tmp_path / "out" / "pareto.png")
    hv = report.plot_hypervolume(study, tmp_path / "out" / "hypervolume.png")
    assert pareto == tmp_path / "out" / "pareto.png"
    # one panel per cost: 5.6 inches each at 120 dpi
    width, height = png_size(pareto)
    assert (width, height) == (2 * 672, 552)
    assert png_size(hv) == (864, 528)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hypervolume.png", "pareto.png"]

    three = new_study(
        ["accuracy", "state_bytes", "params", "flops_per_token"], ["maximize"] + 3 * ["minimize"]
    )
    add(three, "gdn", [0.5, 1024.0, 1e5, 2e5])
    add(three, "attn", [0.9, 8192.0, 1.2e5, 3e5], known="attention")
    assert png_size(report.plot_pareto(three, tmp_path / "three.png"))[0] == 3 * 672

    text = new_study(["bits_per_byte", "flops_per_token"], ["minimize", "minimize"], name="text")
    add(text, "gdn", [1.25, 3.4e6], known="gdn")
    add(text, "attn", [1.5, 2.1e6])
    assert png_size(report.plot_pareto(text, tmp_path / "text.png")) == (672, 552)
    assert png_size(report.plot_hypervolume(text, tmp_path / "text-hv.png")) == (864, 528)


def test_plots_and_hypervolume_need_a_completed_feasible_trial(tmp_path):
    study = new_study()
    add(study, "gla", None, state=TrialState.FAIL, fail_reason="loss diverged")
    add(study, "attn", [0.9, 4096.0, 1e6], constraints=[5e5])
    for call in (
        lambda: report.plot_pareto(study, tmp_path / "p.png"),
        lambda: report.plot_hypervolume(study, tmp_path / "h.png"),
    ):
        with pytest.raises(
            ValueError,
            match=r"no completed feasible trial .*2 trials: 1 complete \(1 infeasible\), 1 failed",
        ):
            call()
    assert not list(tmp_path.iterdir())
    assert report.pareto_rows(study) == []


def area_2d(points, reference):
    """Area dominated by 2-D loss points up to `reference`, by a sweep over the first axis."""
    xs = sorted(points)
    area, best_y = 0.0, reference
    for (x, y), nxt in zip(xs, [p[0] for p in xs[1:]] + [reference], strict=True):
        best_y = min(best_y, y)
        area += (nxt - x) * (reference - best_y)
    return area


def test_hypervolume_history_against_a_hand_computed_area():
    study = new_study(["accuracy", "state_bytes"], ["maximize", "minimize"], name="hv")
    add(study, "attn", [0.9, 64.0 * 1024])
    add(study, "gdn", [0.3, 1024.0])
    add(study, "gla", None, state=TrialState.FAIL)
    add(study, "attn", [0.95, 64.0 * 1024], constraints=[1.0])  # infeasible: adds nothing
    add(study, "gdn*3,attn", [0.8, 8192.0])
    add(study, "gla", [0.2, 4096.0])  # dominated: adds nothing
    numbers, values = report.hypervolume_history(study)
    assert numbers == [0, 1, 3, 4, 5]

    # normalised: accuracy 0.9 → 0, 0.2 → 1; log2 bytes 10 → 0, 16 → 1
    def point(acc, log2_bytes):
        return ((0.9 - acc) / 0.7, (log2_bytes - 10) / 6)

    r = 1 + report.HV_MARGIN
    seen = [point(0.9, 16), point(0.3, 10), point(0.8, 13)]
    expected = [area_2d(seen[:k], r) / r**2 for k in (1, 2, 2, 3, 3)]
    assert values == pytest.approx(expected, rel=1e-12)
    # by hand: points (0, 1), (1/7, 1/2), (6/7, 0) under the reference 1.1
    by_hand = (1 / 7) * 0.1 + (5 / 7) * 0.6 + (1.1 - 6 / 7) * 1.1
    assert values[-1] == pytest.approx(by_hand / 1.21, rel=1e-12)


def test_hypervolume_never_falls():
    study = random_study(3, 2)
    numbers, values = report.hypervolume_history(study)
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert numbers == complete
    assert all(b >= a for a, b in zip(values[:-1], values[1:], strict=True))
    assert 0 < values[-1] <= 1


def test_csv_has_every_trial(tmp_path):
    study = demo_study()
    path = report.trials_csv(study, tmp_path / "trials.csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [int(r["number"]) for r in rows] == list(range(11))
    assert [r["pareto"] for r in rows].count("True") == 6
    front = {r["trial"] for r in report.pareto_rows(study)}
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == front
    hybrid, failed, over, duplicate = rows[2], rows[6], rows[7], rows[8]
    assert hybrid["state"] == "COMPLETE" and hybrid["feasible"] == "True"
    assert [float(hybrid[k]) for k in ("accuracy", "state_bytes", "params")] == [
        0.93,
        140 * 1024,
        197e3,
    ]
    assert (hybrid["known"], hybrid["run_id"], hybrid["arch"]) == (
        "hybrid 3:1",
        "run-0002",
        "gdn*3,attn",
    )
    assert (hybrid["param.pattern"], hybrid["param.lr"]) == ("gdn*3,attn", "0.003")
    assert (hybrid["cost.flops_per_token"], hybrid["metric.kv=8"]) == ("100000.0", str(0.93 * 0.9))
    assert failed["state"] == "FAIL" and failed["fail_reason"] == "loss diverged at step 40"
    assert failed["accuracy"] == failed["feasible"] == failed["run_id"] == ""
    assert over["feasible"] == "False" and json.loads(over["constraints"]) == [400000.0]
    assert duplicate["duplicate_of"] == "2" and duplicate["pareto"] == "False"
    assert float(hybrid["duration_s"]) == 0.0  # create_trial starts and ends at one instant
    assert hybrid["datetime_start"].startswith("20") and "T" in hybrid["datetime_complete"]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_export_round_trips(tmp_path):
    """Through SQLite, as a search stores it: the TOML reads back as the trial's config."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    demo_study(storage=url)
    study = optuna.load_study(study_name="mqar-demo", storage=url)
    for number in (0, 2, 4, 8):
        text = report.export_trial(study, number)
        pattern = study.trials[number].user_attrs["arch"]
        assert tomllib.loads(text) == config_for(pattern, study.trials[number].params["lr"])
    assert '[model]\npattern = "gdn*3,attn"' in report.export_trial(study, 2)


def test_export_errors_name_the_valid_trials():
    study = demo_study()
    add(study, "gla", None, state=TrialState.FAIL, fail_reason="bad pattern", config=False)
    with pytest.raises(ValueError, match=r"has no trial 99; trials with a config: 0-10$"):
        report.export_trial(study, 99)
    with pytest.raises(
        ValueError, match=r"trial 11 .*\(FAIL: bad pattern\) has no config; .*: 0-10$"
    ):
        report.export_trial(study, 11)
    add(study, "gdn", [0.5, 1024.0, 1e5])
    with pytest.raises(ValueError, match=r"has no trial 13; trials with a config: 0-10, 12$"):
        report.export_trial(study, 13)

    cfg = config_for("gdn", 1e-3)
    cfg["train"]["grad_clip"] = None  # no clipping; left out it would mean the default, 1.0
    bad = new_study(name="nulls")
    bad.add_trial(optuna.trial.create_trial(values=[0.5, 1.0, 1.0], user_attrs={"config": cfg}))
    with pytest.raises(ValueError, match=r"null at train\.grad_clip, which TOML cannot"):
        report.export_trial(bad, 0)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_objectives_must_match_the_directions():
    study = new_study(["accuracy", "state_bytes"], ["maximize", "minimize", "minimize"], name="x")
    with pytest.raises(ValueError, match=r"names 2 objectives \(accuracy, state_bytes\) but has 3"):
        report.pareto_rows(study)
    single = optuna.create_study(direction="maximize")
    with pytest.raises(ValueError, match="needs the quality and at least one cost"):
        report.pareto_rows(single)
    named = optuna.create_study(directions=["maximize", "minimize"])
    named.set_metric_names(["accuracy", "params"])
    add_named = optuna.trial.create_trial(values=[0.5, 10.0], user_attrs={"arch": "gdn"})
    named.add_trial(add_named)
    assert report.pareto_rows(named)[0]["params"] == 10.0


def wsgi_get(app, path: str, query: str = "") -> dict:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], (status, body[:500])
    return json.loads(body)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optuna_dashboard_reads_the_study(tmp_path):
    pytest.importorskip("optuna_dashboard")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = demo_study(storage=url)
    study.set_metric_names(study.user_attrs["objectives"])
    del study

    app = report.dashboard_app(url)
    [summary] = wsgi_get(app, "/api/studies")["study_summaries"]
    assert summary["study_name"] == "mqar-demo"
    assert summary["directions"] == ["maximize", "minimize", "minimize"]
    attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
    assert json.loads(attrs["objectives"]) == ["accuracy", "state_bytes", "params"]

    detail = wsgi_get(app, f"/api/studies/{summary['study_id']}", "after=0")
    assert detail["objective_names"] == ["accuracy", "state_bytes", "params"]
    trials = detail["trials"]
    assert [t["number"] for t in trials] == list(range(11))
    assert [t["state"] for t in trials].count("Fail") == 1
    hybrid = {a["key"]: a["value"] for a in trials[2]["user_attrs"]}
    assert hybrid["arch"] == "gdn*3,attn" and hybrid["known"] == "hybrid 3:1"
    assert json.loads(hybrid["config"]) == config_for("gdn*3,attn", 3e-3)
    assert json.loads(hybrid["costs"])["state_bytes"] == 140 * 1024
    assert trials[2]["values"] == [0.93, 140 * 1024, 197e3]
    failed = {a["key"]: a["value"] for a in trials[6]["user_attrs"]}
    assert failed["fail_reason"] == "loss diverged at step 40"
    # the dashboard's front knows nothing of user_attrs constraints or duplicates, so it holds ours
    ours = {
        r["trial"]
        for r in report.pareto_rows(optuna.load_study(study_name="mqar-demo", storage=url))
    }
    assert ours < {t["number"] for t in detail["best_trials"]}


def test_dashboard_app_says_what_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    with pytest.raises(ImportError, match="pip install optuna-dashboard"):
        report.dashboard_app("sqlite:///unused.db")
