"""The search objective on real tiny MQAR trainings: values and user_attrs that the report reads,
no training twice (in the study, from the results store), limits, divergence, resumption after a
crash, a candidate another trial is training, pickling, and clear errors.

Run: .venv/bin/python -m pytest tests/search/test_objective.py -q
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from seqlab.experiment import experiment_from_dict, load_experiment, run_experiment
from seqlab.files import exclusive_folder
from seqlab.profile.cost import model_cost
from seqlab.search import report
from seqlab.search.objective import (
    Objective,
    TrialFailed,
    constraints,
    identity_hash,
    trial_folder_name,
)
from seqlab.train import trainer as trainer_module
from seqlab.train.results import ResultsStore
from tests.search.spaces_util import tiny_base, tiny_space

NAMES = ("accuracy", "state_bytes", "params")


class CountingTrain:
    """run_experiment, counting the runs that end (not those refused or killed)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, cfg, **kwargs):
        out = run_experiment(cfg, **kwargs)
        self.calls += 1
        return out


def make(tmp_path, space=None, base=None, name="out", **kwargs):
    train = CountingTrain()
    objective = Objective(
        space or tiny_space(),
        base or tiny_base(),
        tmp_path / name,
        objectives=kwargs.pop("objectives", NAMES),
        store_path=kwargs.pop("store_path", tmp_path / "store" / "results.db"),
        train_fn=train,
        threads=kwargs.pop("threads", 1),  # tiny models only lose from more threads
        **kwargs,
    )
    return objective, train


def study_for(objective, name="s"):
    study = optuna.create_study(
        directions=objective.directions,
        study_name=name,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    for key, value in objective.study_user_attrs().items():
        study.set_user_attr(key, value)
    return study


def trial_folder(objective, params):
    """The folder a trial of `params` trains in."""
    candidate = objective.space.sample(optuna.trial.FixedTrial(params))
    cfg = candidate.experiment(objective.base)
    name = trial_folder_name(candidate.key, identity_hash(cfg))
    return candidate, Path(objective.out) / "trials" / name


def run(study, objective, *params):
    """Enqueue each params dict and run one trial per dict; returns the new trials."""
    before = len(study.trials)
    for p in params:
        study.enqueue_trial(p)
    study.optimize(objective, n_trials=len(params), catch=(Exception,))
    return study.trials[before:]


def test_a_trial_trains_and_leaves_what_the_report_reads(tmp_path):
    objective, train = make(tmp_path)
    study = study_for(objective)
    space = objective.space
    [trial] = run(study, objective, space.known()["hybrid"])
    assert trial.state == TrialState.COMPLETE and train.calls == 1
    attrs = trial.user_attrs
    assert attrs["known"] == "hybrid" and attrs["arch"].startswith("gdn(num_heads=2),attn")
    assert attrs["key"] == space.sample(optuna.trial.FixedTrial(trial.params)).key
    # values: the final held-out accuracy, then the costs from seqlab.profile
    accuracy, state_bytes, params = trial.values
    assert accuracy == attrs["metrics"]["all"] and 0 <= accuracy <= 1
    assert "num_kv_pairs=2,seq_len=16" in attrs["metrics"]
    cfg = experiment_from_dict(attrs["config"])
    cost = model_cost(cfg.model_config_for(32), 16)
    assert (state_bytes, params) == (cost.state_bytes, cost.params)
    assert set(attrs["costs"]) == {
        "params",
        "state_bytes",
        "flops_per_token",
        "decode_flops_per_token",
    }
    assert attrs["steps"] == 20 and attrs["stop_reason"] == "steps"
    # the config is what `seqlab train --config` of the exported TOML runs
    path = tmp_path / "trial.toml"
    path.write_text(report.export_trial(study, trial.number))
    assert load_experiment(path) == cfg
    assert cfg.model.pattern == "gdn(num_heads=2),attn(num_heads=2)" and cfg.train.out_dir is None
    json.dumps(dict(trial.user_attrs))
    # the run is in the store, with its key, study and trial
    [record] = ResultsStore(tmp_path / "store" / "results.db").runs()
    assert record["id"] == attrs["run_id"]
    assert record["search"]["key"] == attrs["key"]
    assert (record["search"]["study"], record["search"]["trial"]) == ("s", trial.number)
    assert record["search"]["identity"] == identity_hash(cfg)
    # the report reads the study
    [row] = report.pareto_rows(study)
    assert row["trial"] == trial.number and row["known"] == "hybrid"
    assert report.objectives(study) == list(NAMES)
    json.dumps(study.user_attrs)


def test_a_candidate_evaluated_in_the_study_is_not_trained_again(tmp_path):
    objective, train = make(tmp_path, store_path=None)
    study = study_for(objective)
    params = objective.space.known()["gla"]
    first, second = run(study, objective, params, params)
    assert train.calls == 1
    assert second.state == TrialState.COMPLETE
    assert second.values == first.values
    assert second.user_attrs["duplicate_of"] == first.number
    assert second.user_attrs["metrics"] == first.user_attrs["metrics"]
    [third] = run(study, objective, params)
    assert third.user_attrs["duplicate_of"] == first.number and train.calls == 1
    assert [r["trial"] for r in report.pareto_rows(study)] == [first.number]


def test_a_run_in_the_results_store_is_reused(tmp_path):
    objective, train = make(tmp_path)
    params = objective.space.known()["gla"]
    [trained] = run(study_for(objective, "first"), objective, params)
    assert train.calls == 1
    again, train_again = make(tmp_path, name="other-out")
    [reused] = run(study_for(again, "second"), again, params)
    assert train_again.calls == 0
    assert reused.values == trained.values
    assert reused.user_attrs["reused_run"] == trained.user_attrs["run_id"]
    assert reused.user_attrs["run_id"] == trained.user_attrs["run_id"]
    # another budget is another run
    longer, train_longer = make(tmp_path, base=tiny_base(steps=30), name="longer")
    [retrained] = run(study_for(longer, "third"), longer, params)
    assert train_longer.calls == 1 and "reused_run" not in retrained.user_attrs


def test_a_plain_training_run_of_the_same_architecture_is_reused(tmp_path):
    """Recorded by `seqlab train` with the pattern spelled out: canonically the same run."""
    objective, train = make(tmp_path)
    params = objective.space.known()["attention"] | {"n_layers": 2}
    candidate = objective.space.sample(optuna.trial.FixedTrial(params))
    assert candidate.pattern == "attn(num_heads=2)"
    spelled = objective.base.updated(
        {
            "model.pattern": "attn(rope_base=10000.0, num_heads=2),attn(num_heads=2, window=None)",
            "model.d_model": 16,
            "model.channel": None,
            "train.lr": candidate.train["lr"],
        }
    )
    _, record = run_experiment(spelled, store=ResultsStore(tmp_path / "store" / "results.db"))
    [trial] = run(study_for(objective), objective, params)
    assert train.calls == 0 and trial.user_attrs["reused_run"] == record["id"]
    assert trial.values[0] == record["metrics"]["final"]["all"]


def test_a_candidate_over_a_limit_is_not_trained(tmp_path):
    objective, train = make(tmp_path, limits={"params": 1000, "state_bytes": 1e9})
    study = study_for(objective)
    [trial] = run(study, objective, objective.space.known()["gla"])
    assert train.calls == 0 and trial.state == TrialState.COMPLETE
    assert trial.user_attrs["infeasible"] is True
    params = trial.user_attrs["costs"]["params"]
    assert trial.values == [0.0, trial.user_attrs["costs"]["state_bytes"], params]
    assert trial.user_attrs["constraints"][0] == params - 1000 > 0
    assert trial.user_attrs["constraints"][1] < 0
    assert trial.constraints == {
        "params": params - 1000,
        "state_bytes": pytest.approx(trial.user_attrs["costs"]["state_bytes"] - 1e9),
    }
    assert constraints(trial) == trial.user_attrs["constraints"]
    assert not report.front_candidates(study)
    assert study.user_attrs["limits"] == {"params": 1000.0, "state_bytes": 1e9}


def test_a_diverging_run_fails_the_trial_and_leaves_the_store_valid(tmp_path):
    space = tiny_space(train={"lr": 1e39})  # finite, but AdamW's update overflows float32
    objective, train = make(tmp_path, space=space)
    study = study_for(objective)
    [trial] = run(study, objective, space.known()["gla"])
    assert trial.state == TrialState.FAIL and trial.values is None
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith("diverged: overflow in the optimizer update at step 1")
    store = ResultsStore(tmp_path / "store" / "results.db")
    [record] = store.runs(where={"status": "diverged"})
    assert record["id"] == trial.user_attrs["run_id"]
    assert store.runs() == [record]
    # a failed trial is no candidate for reuse: the same params fail again, and are trained
    [again] = run(study, objective, space.known()["gla"])
    assert again.state == TrialState.FAIL and train.calls == 2
    report.trials_csv(study, tmp_path / "trials.csv")


class Crash(Exception):
    pass


def test_a_trial_killed_after_a_checkpoint_resumes_from_it(tmp_path, monkeypatch):
    objective, train = make(tmp_path)
    study = study_for(objective)
    params = objective.space.known()["gla"]
    save = trainer_module.Trainer.save

    def save_then_crash(self):
        folder = save(self)
        raise Crash(f"killed after writing {folder.name}")

    monkeypatch.setattr(trainer_module.Trainer, "save", save_then_crash)
    [failed] = run(study, objective, params)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "Crash: killed after writing step-00000010"
    monkeypatch.undo()
    # what a retry does: the same params again
    [retried] = run(study, objective, failed.params)
    assert retried.state == TrialState.COMPLETE and train.calls == 1
    assert retried.user_attrs["resumed_from"] == 10 and retried.user_attrs["steps"] == 20
    folders = list((tmp_path / "out" / "trials").iterdir())
    assert len(folders) == 1 and (folders[0] / "latest.json").exists()


def test_a_trial_waits_for_another_training_the_same_candidate(tmp_path):
    objective, train = make(tmp_path, store_path=None)
    objective.LOCK_POLL_S = 0.05
    study = study_for(objective)
    params = objective.space.known()["gla"]
    candidate, folder = trial_folder(objective, params)
    with exclusive_folder(folder):  # "another trial" is training it
        waiting = threading.Thread(target=run, args=(study, objective, params))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()
        # the other trial completes
        study.add_trial(
            create_trial(
                values=[0.5, 1.0, 2.0],
                params=params,
                distributions=study.trials[0].distributions,
                user_attrs={"key": candidate.key},
            )
        )
        waiting.join(timeout=30)
    assert not waiting.is_alive() and train.calls == 0
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["duplicate_of"] == 1
    assert trial.values == [0.5, 1.0, 2.0]


def test_waiting_too_long_for_another_trial_fails_saying_so(tmp_path):
    objective, _ = make(tmp_path, store_path=None, lock_wait_s=0.2)
    objective.LOCK_POLL_S = 0.05
    study = study_for(objective)
    _, folder = trial_folder(objective, objective.space.known()["gla"])
    with exclusive_folder(folder):
        [trial] = run(study, objective, objective.space.known()["gla"])
    assert trial.state == TrialState.FAIL
    assert "is in use by another process" in trial.user_attrs["fail_reason"]
    assert "not waiting longer" in trial.user_attrs["fail_reason"]


def test_the_objective_pickles_without_its_task_or_store(tmp_path):
    objective, _ = make(tmp_path, threads=1)
    [trial] = run(study_for(objective), objective, objective.space.known()["gla"])
    assert trial.state == TrialState.COMPLETE and objective._cache
    copy = pickle.loads(pickle.dumps(objective))
    assert copy._cache == {} and copy.names == list(NAMES)
    assert copy.directions == ["maximize", "minimize", "minimize"]
    assert copy.space.known() == objective.space.known()
    assert copy.study_user_attrs() == objective.study_user_attrs()


def test_decode_latency_is_measured_when_asked(tmp_path):
    objective, _ = make(tmp_path, objectives=("accuracy", "decode_latency"))
    cfg = objective.base.updated({"model.pattern": "gla", "model.d_model": 16})
    costs = objective.costs(cfg.model_config_for(32))
    assert 0 < costs["decode_latency"] < 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"objectives": ("state_bytes", "accuracy")}, "the first is the quality, one of accuracy"),
        ({"objectives": ("accuracy", "flops")}, "unknown cost 'flops'; valid costs: state_bytes"),
        ({"objectives": ("accuracy", "params", "params")}, "a name repeats"),
        ({"objectives": ("bits_per_byte", "params")}, "task 'mqar' reports accuracy only"),
        ({"limits": {"memory": 1.0}}, "limits: unknown cost 'memory'"),
        ({"limits": {"params": float("inf")}}, "limits: params must be a finite number"),
        ({"context_len": 0}, "context_len must be a positive int"),
        ({"quality_at": "last"}, "quality_at must be one of ('final', 'best')"),
    ],
)
def test_bad_objectives_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(tmp_path, **kwargs)


def test_a_results_store_that_cannot_be_used_fails_before_any_trial(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database")
    with pytest.raises(ValueError, match="is not an SQLite database"):
        make(tmp_path, store_path=text)


def test_a_task_the_trainer_cannot_fit_is_refused(tmp_path):
    base = load_experiment(defaults={"task.name": "compression", "task.preset": "cpu"})
    with pytest.raises(ValueError, match="'compression' is not a next-token task"):
        make(tmp_path, base=base)


def test_trial_failed_is_a_runtime_error():
    assert issubclass(TrialFailed, RuntimeError)
