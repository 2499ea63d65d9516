"""seqlab.search.study's storage: its errors, its samplers, and SQLite shared by processes."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import optuna
import pytest

from seqlab.search.study import StorageError, make_sampler, mask_url, open_storage

DIRECTIONS = ["maximize", "minimize"]
BEAT = {"heartbeat_interval": 1, "grace_period": 2}


def load(out: Path, url, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, out, **BEAT))


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
