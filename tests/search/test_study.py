"""seqlab.search.study against real processes, a real SIGKILL and Ctrl-C, a real PostgreSQL and a
real Ray, with the toy objective of tests/search/toy.py (a few 50 ms steps per trial, a checkpoint
after each). Heartbeats every second, a trial lost after 2 s without one, so a lost trial comes
back within seconds."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from seqlab.search.study import (
    SearchError,
    StorageError,
    finished_trials,
    make_sampler,
    mask_url,
    open_storage,
    run_study,
)
from tests.search.toy import DIRECTIONS, Toy, checkpoint_step

ROOT = Path(__file__).resolve().parents[2]
BEAT = {"heartbeat_interval": 1, "grace_period": 2}
WAIT_S = 60  # for any one thing a test waits on; a hang fails instead of blocking the run


@pytest.fixture(autouse=True)
def study_deadline():
    """Fail a test that takes over 3 minutes (a worker loop that never ends, say)."""

    def expire(_signum, _frame):
        raise TimeoutError("the test took over 180 s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.fixture(params=["sqlite", "postgres"])
def study_backend(request):
    """The storage URL: None (the SQLite file in the search folder) or the PostgreSQL server's."""
    return None if request.param == "sqlite" else request.getfixturevalue("study_pg_url")


def unique_name() -> str:
    return f"toy-{uuid.uuid4().hex[:10]}"


def run(out: Path, url=None, name="toy", n=4, toy=None, **kwargs) -> optuna.Study:
    return run_study(
        Toy(str(out), **(toy or {})),
        out=out,
        storage_url=url,
        study_name=name,
        directions=DIRECTIONS,
        n_trials=n,
        **BEAT,
        **kwargs,
    )


def load(out: Path, url, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, out, **BEAT))


def spawn(out: Path, url, name: str, n: int, toy: dict, **kwargs) -> subprocess.Popen:
    """`python -m tests.search.toy` running the search: the command a user runs, and kills."""
    spec = {
        "toy": {"out": str(out), **toy},
        "run": {"out": str(out), "storage_url": url, "study_name": name, "n_trials": n}
        | BEAT
        | kwargs,
    }
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    }
    log = open(out / f"search-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (the child's)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search.toy", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def logs(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("search-*.log")))


def wait_until(predicate, what: str, out: Path | None = None):
    """predicate()'s first true value, tried every 50 ms for up to WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}" + (f"; logs:\n{logs(out)}" if out else ""))


def exit_code(proc: subprocess.Popen, out: Path) -> int:
    try:
        return proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the search did not end in {WAIT_S} s; logs:\n{logs(out)}") from None


def wait_for_study(out: Path, url, name: str) -> optuna.Study:
    """The study, once the search has made it and started a trial (opening the storage while the
    search makes its tables could race with it)."""
    wait_until(lambda: list(out.glob("trials/*")), "a trial's folder", out)
    return load(out, url, name)


def running_with_checkpoint(study: optuna.Study, out: Path, steps: range, complete: int = 1):
    """A RUNNING trial whose checkpoint is at one of `steps`, once `complete` trials are. (Steps
    well short of the last: the caller stops the trial next, which must not have ended by then.)"""
    trials = study.get_trials(deepcopy=False)
    if sum(t.state == TrialState.COMPLETE for t in trials) < complete:
        return None
    for t in trials:
        if t.state == TrialState.RUNNING and "key" in t.user_attrs:
            if checkpoint_step(out, t.user_attrs["key"]) in steps:
                return t
    return None


def by_state(study: optuna.Study) -> dict[str, list[int]]:
    states: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        states.setdefault(t.state.name, []).append(t.number)
    return states


def assert_retried(study: optuna.Study, lost: optuna.trial.FrozenTrial, step: int):
    """`lost` is FAIL and a COMPLETE trial with its params resumed from its checkpoint (≥ step)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[lost.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retries) == 1, retries
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == lost.params
    assert retry.user_attrs["resumed_from"] >= step > 0
    assert "fail_reason" not in retry.user_attrs
    return retry


def test_runs_n_trials_once_enqueued_first(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="seqlab.search.study")
    enqueue = [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    seen = []
    study = run(tmp_path, n=4, enqueue=enqueue, progress=seen.append, study_user_attrs={"k": 1})
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.params for t in trials[:2]] == enqueue
    assert sorted(t.number for t in seen) == [0, 1, 2, 3]
    assert study.user_attrs == {"k": 1}
    assert "trial 3 COMPLETE" in caplog.text and "[4/4 finished]" in caplog.text
    done = [t.datetime_complete for t in trials]

    again = run(tmp_path, n=4, enqueue=enqueue)
    assert [t.datetime_complete for t in again.get_trials()] == done
    more = run(tmp_path, n=5, enqueue=enqueue).get_trials()
    assert len(more) == 5 and more[4].state == TrialState.COMPLETE
    assert [sum(t.params == p for t in more) for p in enqueue] == [1, 1]


def test_failed_trials_keep_their_reason_and_the_study_goes_on(tmp_path):
    fail = {5: "raise", 6: "own", 7: "nan"}
    enqueue = [{"a": a, "b": 0} for a in fail]
    study = run(tmp_path, n=4, toy={"fail": fail}, enqueue=enqueue)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL", "COMPLETE"]
    reasons = [t.user_attrs["fail_reason"] for t in trials[:3]]
    assert reasons == [
        "ValueError: toy candidate a=5,b=0 broke at step 2",
        "loss diverged at step 2",  # the objective's own, not overwritten
        "the objective returned nan for objective 0",
    ]
    assert finished_trials(study) == 4
    assert len(run(tmp_path, n=4, toy={"fail": fail}).get_trials()) == 4  # failures stay failed


def test_reloading_with_other_directions_is_an_error(tmp_path):
    run(tmp_path, n=1)
    with pytest.raises(ValueError, match=r"'toy' in .* has directions maximize, minimize; this"):
        run_study(
            Toy(str(tmp_path)),
            out=tmp_path,
            study_name="toy",
            directions=["minimize", "minimize"],
            n_trials=1,
        )


def test_storage_errors_name_the_url_and_hide_its_password(tmp_path):
    with socket_closed() as port:
        with pytest.raises(StorageError) as e:
            open_storage(f"postgresql://ann:s3cret@127.0.0.1:{port}/db", tmp_path)
    assert f"cannot reach the study storage 'postgresql://ann:***@127.0.0.1:{port}/db'" in str(
        e.value
    )
    assert "s3cret" not in str(e.value) and "refused" in str(e.value)
    cases = {
        "not a url": "is not a database URL",
        "nosuch://ann:s3cret@host/db": "SQLAlchemy has no database driver 'nosuch'",
        "mysql://ann:s3cret@host/db": "needs the database driver 'MySQLdb', not installed",
        "postgresql+psycopg2://ann:s3cret@host/db": "needs the database driver 'psycopg2'",
        f"sqlite:///{tmp_path}/absent/study.db": "absent' does not exist",
    }
    for url, message in cases.items():
        with pytest.raises(StorageError, match=message) as e:
            open_storage(url, tmp_path)
        assert "s3cret" not in str(e.value)
    assert mask_url("x://ann:s3cret@host") == "x://ann:***@host"


class socket_closed:
    """A local port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_samplers_are_seeded_and_named():
    def params(name, seed):
        study = optuna.create_study(directions=DIRECTIONS, sampler=make_sampler(name, seed))
        for _ in range(3):
            trial = study.ask()
            study.tell(trial, (trial.suggest_float("x", 0, 1), trial.suggest_int("y", 0, 9)))
        return [t.params for t in study.trials]

    kinds = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler"}
    for name, kind in kinds.items():
        assert type(make_sampler(name, 0)).__name__ == kind
        assert params(name, 7) == params(name, 7) != params(name, 8)
    with pytest.raises(ValueError, match="unknown sampler 'cmaes'; valid: tpe, nsga2, random"):
        make_sampler("cmaes", 0)


def test_ctrl_c_marks_the_trial_for_a_retry_that_resumes(tmp_path):
    toy = {"steps": 12}
    proc = spawn(tmp_path, None, "toy", 3, toy)
    study = wait_for_study(tmp_path, None, "toy")
    first = wait_until(
        lambda: running_with_checkpoint(study, tmp_path, range(3, 9), complete=0),
        "step 3",
        tmp_path,
    )
    proc.send_signal(signal.SIGINT)
    assert exit_code(proc, tmp_path) == 130
    trials = study.get_trials()
    assert trials[first.number].state == TrialState.FAIL
    assert trials[first.number].user_attrs["fail_reason"].startswith("interrupted")
    assert [t.state for t in trials[first.number + 1 :]] == [TrialState.WAITING]
    step = checkpoint_step(tmp_path, first.user_attrs["key"])

    study = run(tmp_path, n=3, toy=toy)
    assert_retried(study, first, step)
    assert finished_trials(study) == 3
    states = by_state(study)
    assert states["FAIL"] == [first.number] and len(states["COMPLETE"]) == 3
    assert set(states) == {"FAIL", "COMPLETE"}


def test_sigkill_mid_trial_then_the_same_command_resumes(tmp_path, study_backend):
    name, toy = unique_name(), {"steps": 10}
    proc = spawn(tmp_path, study_backend, name, 3, toy)
    study = wait_for_study(tmp_path, study_backend, name)
    wait_until(
        lambda: running_with_checkpoint(study, tmp_path, range(3, 7)), "a trial at step 3", tmp_path
    )
    proc.kill()
    assert exit_code(proc, tmp_path) == -signal.SIGKILL
    trials = study.get_trials()
    lost = next(t for t in trials if t.state == TrialState.RUNNING)
    complete = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    step = checkpoint_step(tmp_path, lost.user_attrs["key"])
    assert complete and step >= 3

    study = run(tmp_path, study_backend, name, n=3, toy=toy)
    trials = {t.number: t for t in study.get_trials()}
    assert {n: trials[n].values for n in complete} == complete  # none lost
    assert_retried(study, lost, step)
    assert finished_trials(study) == 3
    states = by_state(study)
    assert states["FAIL"] == [lost.number] and len(states["COMPLETE"]) == 3
    assert set(states) == {"FAIL", "COMPLETE"}


def test_two_worker_processes(tmp_path, study_backend):
    name = unique_name()
    enqueue = [{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3, "b": 3}]
    study = run(tmp_path, study_backend, name, n=8, workers=2, threads=1, enqueue=enqueue)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert len({t.number for t in trials}) == 8
    assert [sum(t.params == p for t in trials) for p in enqueue] == [1, 1, 1]
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {t.user_attrs["threads"] for t in trials} == {1}


def test_a_killed_worker_s_trial_is_retried_by_the_other(tmp_path, study_pg_url):
    name, toy = unique_name(), {"steps": 10}
    proc = spawn(tmp_path, study_pg_url, name, 5, toy, workers=2, threads=1)
    study = wait_for_study(tmp_path, study_pg_url, name)
    lost = wait_until(
        lambda: running_with_checkpoint(study, tmp_path, range(2, 7)), "a trial", tmp_path
    )
    os.kill(lost.user_attrs["pid"], signal.SIGKILL)
    assert exit_code(proc, tmp_path) == 0, logs(tmp_path)
    assert f"ended by signal {int(signal.SIGKILL)}" in logs(tmp_path)
    retry = assert_retried(study, lost, 2)
    assert retry.user_attrs["pid"] != lost.user_attrs["pid"]
    assert finished_trials(study) == 5
    assert len(by_state(study)["COMPLETE"]) == 5


def test_a_trial_claimed_but_never_beating_is_retried(tmp_path):
    storage = open_storage(None, tmp_path, **BEAT)
    study = optuna.create_study(storage=storage, study_name="toy", directions=DIRECTIONS)
    with pytest.warns(UserWarning, match="Heartbeat"):
        silent = study.ask()  # RUNNING, and no heartbeat thread: a worker killed as it claimed
    silent.suggest_int("a", 0, 999)
    silent.suggest_int("b", 0, 999)
    study = run(tmp_path, n=2)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert finished_trials(study) == 2


def test_ray_workers_join_a_cluster_by_its_address(tmp_path, study_ray):
    # a search started apart from the cluster, as `--ray-address` does, its workers Ray tasks
    proc = spawn(
        tmp_path, None, "toy", 4, {}, workers=2, threads=1, executor="ray", ray_address=study_ray
    )
    assert exit_code(proc, tmp_path) == 0, logs(tmp_path)
    study = load(tmp_path, None, "toy")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and proc.pid not in pids
    assert {t.user_attrs["threads"] for t in trials} == {1}


def ask(out: str, count: int) -> list[int]:
    """In a process of its own: claim `count` trials of study "race" (no run_study, no lock)."""
    study = load(Path(out), None, "race")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are meant for optimize
        return [study.ask().number for _ in range(count)]


def test_sqlite_hands_each_waiting_trial_to_one_process(tmp_path):
    # optuna's own claim of an enqueued trial, from 3 processes at once: without BEGIN IMMEDIATE
    # a third of the claims took a trial another process had (measured), with it none
    study = optuna.create_study(
        storage=open_storage(None, tmp_path, **BEAT), study_name="race", directions=DIRECTIONS
    )
    for i in range(45):
        study.enqueue_trial({"a": i})
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        claims = pool.starmap(ask, [(str(tmp_path), 15)] * 3, chunksize=1)
    numbers = sorted(n for c in claims for n in c)
    assert numbers == list(range(45))


def test_workers_need_a_picklable_objective(tmp_path):
    with pytest.raises(ValueError, match="need a picklable objective"):
        run_study(
            lambda trial: (0.0, 0.0),
            out=tmp_path,
            study_name="toy",
            directions=DIRECTIONS,
            n_trials=2,
            workers=2,
        )


def test_workers_that_stop_are_a_search_error(tmp_path):
    # one worker's trial crashes its process (exit code 3), the other's raises SystemExit
    with pytest.raises(SearchError) as e:
        run(
            tmp_path,
            n=3,
            workers=2,
            threads=1,
            toy={"fail": {5: "exit", 6: "quit"}},
            enqueue=[{"a": 5, "b": 0}, {"a": 6, "b": 0}],
            failed_trial_max_retry=0,
        )
    message = str(e.value)
    # the crashed trial is finished (FAIL, no retry) only if the other worker saw it go stale
    assert re.search(r"has [01] of 3 finished trials and its workers stopped", message), message
    assert re.search(r"worker [01]: process \d+ ended by exit code 3", message), message
    quits = r"worker ([01]): process \d+ raised SystemExit: toy candidate a=6,b=0 quits[;.]"
    assert re.search(quits, message), message
    worker = re.search(quits, message).group(1)
    assert f"worker {worker}'s traceback:\nTraceback (most recent call last)" in message
