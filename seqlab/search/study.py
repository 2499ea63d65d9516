"""A search's study storage, where its trials outlive every process: an SQLite file per search
folder, or any SQLAlchemy database (postgresql://... is read as psycopg 3's), with heartbeats so
that a trial whose process died is failed and retried; and the samplers a search can use.

    storage = open_storage(None, Path("runs/s1"), heartbeat_interval=10, grace_period=30)
    study = optuna.create_study(storage=storage, study_name="s1", directions=[...],
                                sampler=make_sampler("tpe", seed=0), load_if_exists=True)

A trial whose heartbeat is older than `grace_period` is marked FAIL by the next worker to claim a
trial, and a retry is enqueued: a new WAITING trial with the same params (optuna's system_attrs
"failed_trial" and "retry_history" name the trials it replaces). `n_trials` counts finished
trials less those a retry replaced (`finished_trials`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

STUDY_DB = "study.db"
SAMPLERS = ("tpe", "nsga2", "random")
SQLITE_BUSY_TIMEOUT_S = 60  # how long an SQLite writer waits for another's transaction to end
CONNECT_TIMEOUT_S = 10  # for a database server
INSTALL_SEARCH = "pip install -e '.[search]'"


class StorageError(ValueError):
    """A study storage that cannot be used: a bad URL, a driver not installed, a server not
    reached. The message names the URL, with its password masked."""


def study_url(out: str | os.PathLike) -> str:
    """The embedded SQLite study of a search folder: sqlite:///<out>/study.db."""
    return f"sqlite:///{Path(out).resolve() / STUDY_DB}"


def mask_url(url: str) -> str:
    """The URL with its password as ***."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _driver_url(url: str) -> sqlalchemy.URL:
    """Parsed, with postgresql:// (and postgres://) on psycopg 3 rather than SQLAlchemy's default
    psycopg2, and an SQLite file's path made absolute (workers may start in another folder)."""
    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"study storage {mask_url(url)!r} is not a database URL: give "
            "dialect+driver://user:password@host:port/database, e.g. "
            "postgresql://user@host/db or sqlite:///path/study.db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    db_file = _sqlite_file(parsed)
    return parsed.set(database=str(db_file.resolve())) if db_file else parsed


def _sqlite_file(url: sqlalchemy.URL) -> Path | None:
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database)
    return None


class _SQLiteStorage(RDBStorage):
    """RDBStorage whose every transaction on SQLite begins with BEGIN IMMEDIATE: it takes the
    database's write lock at once, so a transaction's reads and writes are one atomic step.

    Without it several processes pop the same enqueued trial: pysqlite starts a transaction only
    at the first write, so optuna's "read the WAITING trial, set it RUNNING if still WAITING"
    (a row lock, SELECT ... FOR UPDATE, on PostgreSQL) reads outside any transaction. Measured
    here: 4 processes asking 15 trials each of 60 enqueued ones got 29-41 distinct trials
    without it, 60 with it; the same on PostgreSQL gets 60 without help. The same race would let
    two workers fail one stale trial and enqueue two retries of it, or a trial's own worker
    complete it as another fails it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _begin_immediate(self.engine)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        _begin_immediate(self.engine)


def _begin_immediate(engine: sqlalchemy.Engine) -> None:
    # SQLAlchemy's recipe for pysqlite: the driver emits no BEGIN of its own, the engine emits ours
    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections made before the listeners were added


class RetryLostTrial(RetryHeartbeatStaleTrialCallback):
    """optuna's retry of a trial whose worker stopped (a new WAITING trial with its params, user
    attrs and system attrs, "retry_history" extended), less what belonged to the lost attempt:
    its fail_reason and the constraints it may have set."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}
        trial.system_attrs = {
            k: v for k, v in trial.system_attrs.items() if not k.startswith("constraints")
        }
        super().__call__(study, trial)


def _retry_callback(max_retry: int) -> RetryLostTrial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # a stable part of optuna since 2.8
        return RetryLostTrial(max_retry=max_retry)


def open_storage(
    url: str | None,
    out: str | os.PathLike,
    *,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    failed_trial_max_retry: int = 3,
) -> RDBStorage:
    """The study storage at `url` (None: the SQLite file <out>/study.db, `out` made if needed),
    with heartbeats every `heartbeat_interval` seconds and the retry of a trial whose heartbeat is
    older than `grace_period`, at most `failed_trial_max_retry` times (see the module's doc).

    SQLite runs in WAL mode (readers do not wait for the writer) with a busy timeout, so the
    processes of one machine can share the file. A StorageError names what is wrong."""
    if isinstance(heartbeat_interval, bool) or not isinstance(heartbeat_interval, int):
        raise ValueError(
            f"heartbeat_interval must be a whole number of seconds, not {heartbeat_interval!r}"
        )
    if not isinstance(grace_period, int) or grace_period <= heartbeat_interval:
        raise ValueError(
            f"grace_period ({grace_period!r}) must be a whole number of seconds above "
            f"heartbeat_interval ({heartbeat_interval}), or a live trial could be taken for lost"
        )
    if heartbeat_interval < 1 or failed_trial_max_retry < 0:
        raise ValueError(
            f"heartbeat_interval must be ≥ 1 (got {heartbeat_interval}) and "
            f"failed_trial_max_retry ≥ 0 (got {failed_trial_max_retry})"
        )
    if url is None:
        Path(out).mkdir(parents=True, exist_ok=True)
        url = study_url(out)
    parsed = _driver_url(url)
    shown = mask_url(url)
    engine_kwargs: dict[str, Any] = {}
    storage_cls = RDBStorage
    db_file = _sqlite_file(parsed)
    if parsed.get_backend_name() == "sqlite":
        storage_cls = _SQLiteStorage
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        engine_kwargs["pool_pre_ping"] = True  # a trial can outlast the server's idle timeout
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(
            f"study storage {shown!r}: SQLAlchemy has no database driver {parsed.drivername!r} "
            "(postgresql, postgresql+psycopg, sqlite, mysql+pymysql, ...)"
        ) from None
    except ImportError as e:
        raise StorageError(_missing_driver(shown, e)) from None
    if db_file is not None:
        if not db_file.parent.is_dir():
            raise StorageError(
                f"study storage {shown!r}: the folder {str(db_file.parent)!r} does not exist"
            )
        try:
            # WAL is a property of the file: set once, every later connection uses it
            with contextlib.closing(sqlite3.connect(db_file, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise StorageError(f"study storage {shown!r} cannot be opened: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
            return storage_cls(
                parsed.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=_retry_callback(failed_trial_max_retry),
            )
    except ImportError as e:
        raise StorageError(_missing_driver(shown, e.__cause__ or e)) from None
    except sqlalchemy.exc.DBAPIError as e:
        reason = " ".join(str(e.orig or e).split())
        raise StorageError(f"cannot reach the study storage {shown!r}: {reason}") from None


def _missing_driver(shown: str, error: BaseException) -> str:
    module = getattr(error, "name", None) or str(error)
    how = {
        "psycopg": INSTALL_SEARCH,
        "psycopg2": f"or use postgresql+psycopg:// (psycopg 3: {INSTALL_SEARCH})",
    }.get(module, "install it with pip")
    return f"study storage {shown!r} needs the database driver {module!r}, not installed: {how}"


def make_sampler(
    name: str,
    seed: int | None,
    constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None,
) -> optuna.samplers.BaseSampler:
    """ "tpe" (multivariate TPE over groups of params sampled together, for conditional spaces;
    multi-objective), "nsga2" or "random", seeded. `constraints_func` (a trial's constraints,
    each ≤ 0 when feasible) goes to TPE and NSGA-II; optuna 5 deprecates it with a FutureWarning
    in favour of trial.set_constraint in the objective, which both samplers read anyway."""
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # group
            return optuna.samplers.TPESampler(
                multivariate=True, group=True, seed=seed, constraints_func=constraints_func
            )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def replaced_trials(trials: Iterable[FrozenTrial]) -> set[int]:
    """The numbers of the trials a retry replaced."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def finished_trials(study: optuna.Study) -> int:
    """COMPLETE, PRUNED and FAIL trials, less those a retry replaced: what `n_trials` counts."""
    return _finished(study.get_trials(deepcopy=False))


def _finished(trials: Sequence[FrozenTrial]) -> int:
    replaced = replaced_trials(trials)
    return sum(t.state.is_finished() and t.number not in replaced for t in trials)
