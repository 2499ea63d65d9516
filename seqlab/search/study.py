"""Running a search's trials durably and in parallel: an Optuna study in a database that outlives
every process, trials claimed one at a time by any number of workers, lost trials retried.

    study = run_study(objective, out=Path("runs/s1"), study_name="s1",
                      directions=["maximize", "minimize"], n_trials=40, workers=2)

Storage: `storage_url=None` is an SQLite file, <out>/study.db, which the processes of one
machine share; any SQLAlchemy URL otherwise (postgresql://... is read as psycopg 3's), which a
search over several machines needs (Ray's workers then reach it from every node).

How many: `n_trials` is the number of finished trials the study should hold: COMPLETE, PRUNED and
FAIL, less the trials that a retry replaced. A run stops when the study has that many, counted
from the database, so running the same command again after a crash or a kill finishes the
remaining trials and trains no more; once the study is full a rerun does nothing. A worker
claims a trial only while finished + running trials are fewer than `n_trials` (the count and the
claim are one step under a lock: an advisory lock on PostgreSQL, an flock on <study.db>.lock
or <out>/study.lock elsewhere), and otherwise waits for the running ones, so a lost trial's
retry is run in the same run. A trial whose objective raises is finished (FAIL, with its reason
in the user_attr "fail_reason") and is not run again; a larger `n_trials` is the way to try
more. Enqueued params beyond `n_trials` stay WAITING for a later, larger run.

Lost trials: every running trial beats a heartbeat into the database; a trial whose process died
(SIGKILL, out of memory, a lost machine) stops beating and, `grace_period` seconds later, the next
worker to claim a trial marks it FAIL and enqueues a retry: a new WAITING trial with the same
params (optuna's system_attrs "failed_trial" and "retry_history" name the trials it replaces), at
most `failed_trial_max_retry` times. Ctrl-C (KeyboardInterrupt) does the same at once: the trial
is marked FAIL ("interrupted") and retried by the next run. For the retry to resume rather than
start over, the objective keeps its progress in a folder of its own named by the trial's params
(not its number), writes checkpoints atomically and resumes from the last one.

Workers: `workers=1` runs the trials in the calling process. executor "local" with more workers
starts that many processes (multiprocessing's spawn: the objective must be picklable, a
module-level function or an instance of a module-level class). Executor "ray" runs them as Ray
tasks: `ray_address=None` uses the Ray instance this process is connected to, else starts a local
one (and stops it at the end); an address ("auto", "host:6379") joins that cluster. Each worker
gives torch `threads` threads (default: the machine's cores, or the Ray cluster's CPUs, over
the number of workers) and, on Ray, reserves that many CPUs. Progress: each trial that finishes
during the run is logged by the calling process (logger "seqlab.search.study", one line: number,
state, values or reason, duration) and passed to `progress` if given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import sqlite3
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
import sqlalchemy.orm
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
SAMPLERS = ("tpe", "nsga2", "random")
EXECUTORS = ("local", "ray")
SQLITE_BUSY_TIMEOUT_S = 60  # how long an SQLite writer waits for another's transaction to end
CONNECT_TIMEOUT_S = 10  # for a database server
POLL_S = 1.0  # how often the calling process, and an idle worker, look for finished trials
STOP_TIMEOUT_S = 30  # how long an interrupted worker gets to record its trial before it is killed
FAIL_REASON_CHARS = 300
WORKER_ERROR_CHARS = 4000  # of a worker process's traceback, sent to the caller
INSTALL_SEARCH = "pip install -e '.[search]'"
Objective = Callable[[optuna.Trial], Sequence[float]]


class StorageError(ValueError):
    """A study storage that cannot be used: a bad URL, a driver not installed, a server not
    reached. The message names the URL, with its password masked."""


class SearchError(RuntimeError):
    """The workers stopped before the study had its trials; the message says why."""


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
    complete it as another fails it. (run_study's workers also claim under a lock of their own,
    `_Claim`, but that one spans the several transactions of a claim and leaves the rest of
    optuna's writes, and any other user of the storage, to this.)"""

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


@dataclass(frozen=True)
class _Plan:
    """What every worker needs, picklable."""

    storage_url: str
    out: str
    study_name: str
    n_trials: int
    sampler: str
    seed: int | None
    constraints_func: Callable[[FrozenTrial], Sequence[float]] | None
    heartbeat_interval: int
    grace_period: int
    failed_trial_max_retry: int
    threads: int
    optuna_verbosity: int
    trials_at_start: int  # makes a rerun's sampler seeds differ from the first run's

    def open(self) -> RDBStorage:
        return open_storage(
            self.storage_url,
            self.out,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            failed_trial_max_retry=self.failed_trial_max_retry,
        )

    def worker_seed(self, index: int) -> int | None:
        if self.seed is None:
            return None
        return int(
            np.random.SeedSequence([self.seed, index, self.trials_at_start]).generate_state(1)[0]
        )


class _Claim:
    """The lock held while a worker counts the study's trials and claims the next one, so that
    workers together never start more than `n_trials` (each would count the same free places).
    PostgreSQL: an advisory lock per study name (held by a connection, so it covers every
    machine and goes with a dead worker's connection). Elsewhere: an flock on a file beside the
    SQLite database (or <out>/study.lock), which covers the processes of one machine."""

    def __init__(self, storage: RDBStorage, study_name: str, out: str | os.PathLike) -> None:
        self._held = False
        self._conn = None
        self._fd = None
        if storage.engine.dialect.name == "postgresql":
            digest = hashlib.blake2b(f"seqlab.search:{study_name}".encode(), digest_size=8)
            self._key = int.from_bytes(digest.digest(), "big", signed=True)
            self._conn = storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        else:
            db_file = _sqlite_file(storage.engine.url)
            path = Path(f"{db_file}.lock") if db_file else Path(out) / "study.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def acquire(self) -> None:
        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        else:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        else:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
        if self._fd is not None:
            os.close(self._fd)

    def __enter__(self) -> _Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _reason(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= FAIL_REASON_CHARS else text[: FAIL_REASON_CHARS - 1] + "…"


def _bad_values(values: Any, n_objectives: int) -> str | None:
    """Why optuna will fail a trial that returned `values`, or None."""
    items = values if isinstance(values, Sequence) and not isinstance(values, str) else [values]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        return f"the objective returned {values!r}, not {n_objectives} numbers"
    if len(numbers) != n_objectives:
        return f"the objective returned {len(numbers)} values for {n_objectives} objectives"
    nan = [str(i) for i, v in enumerate(numbers) if math.isnan(v)]
    if nan:
        return f"the objective returned nan for objective {', '.join(nan)}"
    return None


class _Recorder:
    """The objective as a worker runs it: it lets the claim go once its trial is RUNNING (and so
    counted), and records why a trial failed in the user_attr "fail_reason" unless the
    objective set one itself."""

    def __init__(self, objective: Objective, claim: _Claim, n_objectives: int) -> None:
        self.objective = objective
        self.claim = claim
        self.n_objectives = n_objectives
        self.trial: optuna.Trial | None = None

    def __call__(self, trial: optuna.Trial) -> Sequence[float]:
        self.claim.release()
        self.trial = trial
        try:
            values = self.objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            self._fail(trial, _reason(e))
            raise
        except KeyboardInterrupt:
            self._fail(trial, "interrupted (KeyboardInterrupt); retried by the next run")
            raise
        bad = _bad_values(values, self.n_objectives)
        if bad:
            self._fail(trial, bad)
        return values

    @staticmethod
    def _fail(trial: optuna.Trial, reason: str) -> None:
        if "fail_reason" not in trial.user_attrs:
            trial.set_user_attr("fail_reason", reason)


def _beat_for_silent_trials(
    storage: RDBStorage, study_name: str, trials: Sequence[FrozenTrial], grace_period: int
) -> None:
    """Give one heartbeat to each RUNNING trial that started over `grace_period` ago and never
    beat: its worker stopped between claiming it and its heartbeat thread's first beat (optuna
    starts that thread after the claim), and optuna's stale check passes over trials with no
    heartbeat at all, so without this the trial would stay RUNNING, and counted, for ever. With
    one beat it goes stale and is retried like any other."""
    cutoff = datetime.now() - timedelta(seconds=grace_period)
    old = [
        t.number
        for t in trials
        if t.state == TrialState.RUNNING and t.datetime_start and t.datetime_start < cutoff
    ]
    if not old:
        return
    from optuna.storages._rdb import models  # optuna's schema: the heartbeats' table

    trial, beat = models.TrialModel, models.TrialHeartbeatModel
    study_id = storage.get_study_id_from_name(study_name)
    with sqlalchemy.orm.Session(storage.engine) as session:
        silent = session.scalars(
            sqlalchemy.select(trial.trial_id)
            .outerjoin(beat, beat.trial_id == trial.trial_id)
            .where(trial.study_id == study_id, trial.number.in_(old), beat.trial_id.is_(None))
        ).all()
    for trial_id in silent:
        storage.record_heartbeat(trial_id)


def _work(
    objective: Objective, plan: _Plan, index: int, poll: Callable[[], None] | None = None
) -> None:
    """One worker: claim a trial and run it, until the study has `plan.n_trials` finished trials.
    When the rest are running elsewhere it waits for them (a lost one goes stale and comes back
    as a retry for whoever claims next). `poll` is called after each trial and each wait."""
    import torch

    optuna.logging.set_verbosity(plan.optuna_verbosity)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    storage = plan.open()
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(plan.sampler, plan.worker_seed(index), plan.constraints_func),
    )
    claim = _Claim(storage, plan.study_name, plan.out)
    recorder = _Recorder(objective, claim, len(study.directions))
    callbacks = [lambda _study, _trial: poll()] if poll else []
    try:
        while True:
            with claim:
                _beat_for_silent_trials(
                    storage, plan.study_name, study.get_trials(deepcopy=False), plan.grace_period
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                finished = _finished(trials)
                if finished >= plan.n_trials:
                    return
                running = sum(t.state == TrialState.RUNNING for t in trials)
                claimed = finished + running < plan.n_trials
                if claimed:
                    recorder.trial = None
                    try:
                        study.optimize(
                            recorder, n_trials=1, catch=(Exception,), callbacks=callbacks
                        )
                    except KeyboardInterrupt:
                        _retry_interrupted(study, recorder.trial, plan.failed_trial_max_retry)
                        raise
            if not claimed:
                # Every POLL_S, not every heartbeat: the last trials' ends (and a lost one's
                # retry) are seen within a second, so an idle worker does not hold up the run's
                # end (a 10 s sleep here cost 2 workers about 5 s a run).
                if poll:
                    poll()
                time.sleep(POLL_S)
    finally:
        claim.close()
        torch.set_num_threads(threads_before)


def _retry_interrupted(study: optuna.Study, trial: optuna.Trial | None, max_retry: int) -> None:
    """Enqueue the retry of a trial that Ctrl-C stopped (optuna has marked it FAIL)."""
    if trial is None:
        return
    frozen = study.get_trials(states=(TrialState.FAIL,))
    for t in frozen:
        if t.number == trial.number:
            _retry_callback(max_retry)(study, t)


def _interrupt_once(_signum: int, _frame: Any) -> None:
    # a worker's first SIGINT stops its trial; later ones (the terminal's Ctrl-C reaches the whole
    # process group, and the caller passes it on too) must not cut short its recording
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _process_worker(
    objective: Objective, plan: _Plan, index: int, conn: multiprocessing.connection.Connection
) -> None:
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        _work(objective, plan, index)
    except KeyboardInterrupt:
        conn.send(("interrupted", None))
    except BaseException as e:
        # the traceback's end only: the caller reads once the worker has ended, and a message
        # over the pipe's buffer would keep it from ending
        conn.send((f"raised {_reason(e)}", traceback.format_exc()[-WORKER_ERROR_CHARS:]))
    else:
        conn.send(None)


class _Monitor:
    """Logs each trial that finishes during the run, from the calling process."""

    def __init__(
        self,
        study: optuna.Study,
        n_trials: int,
        progress: Callable[[FrozenTrial], None] | None,
    ) -> None:
        self.study = study
        self.n_trials = n_trials
        self.progress = progress
        self.names = study.user_attrs.get("objectives")
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def poll(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        new = sorted(
            (t for t in trials if t.state.is_finished() and t.number not in self.seen),
            key=lambda t: (t.datetime_complete, t.number),
        )
        replaced = replaced_trials(trials)
        for t in new:
            self.seen.add(t.number)
            finished = len(self.seen - replaced)
            log.info("%s [%d/%d finished]", describe_trial(t, self.names), finished, self.n_trials)
            if self.progress is not None:
                self.progress(t)


def describe_trial(trial: FrozenTrial, names: Sequence[str] | None = None) -> str:
    """One line: "trial 7 (retry of 3) COMPLETE in 12.3 s: accuracy 0.91, params 1.2e+05"."""
    retry_of = trial.system_attrs.get("failed_trial")
    head = f"trial {trial.number}" + (f" (retry of {retry_of})" if retry_of is not None else "")
    took = f" in {trial.duration.total_seconds():.1f} s" if trial.duration else ""
    if trial.state == TrialState.COMPLETE:
        names = names if names and len(names) == len(trial.values) else None
        what = ", ".join(
            f"{names[i]} {v:.4g}" if names else f"{v:.4g}" for i, v in enumerate(trial.values)
        )
    elif trial.state == TrialState.FAIL:
        what = trial.user_attrs.get("fail_reason") or "its worker stopped (its heartbeat did)"
    else:
        what = ""
    return f"{head} {trial.state.name}{took}" + (f": {what}" if what else "")


def _directions(directions: Sequence[str | StudyDirection]) -> list[StudyDirection]:
    valid = {"maximize": StudyDirection.MAXIMIZE, "minimize": StudyDirection.MINIMIZE}
    out = []
    for d in directions:
        if isinstance(d, StudyDirection) and d != StudyDirection.NOT_SET:
            out.append(d)
        elif isinstance(d, str) and d.lower() in valid:
            out.append(valid[d.lower()])
        else:
            raise ValueError(f"unknown direction {d!r}; valid: maximize, minimize")
    if not out:
        raise ValueError("a study needs at least one direction")
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_study(
    objective: Objective,
    *,
    out: str | os.PathLike,
    study_name: str,
    directions: Sequence[str | StudyDirection],
    n_trials: int,
    storage_url: str | None = None,
    workers: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    sampler: str = "tpe",
    seed: int | None = 0,
    constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None,
    enqueue: Sequence[Mapping[str, Any]] = (),
    study_user_attrs: Mapping[str, Any] = MappingProxyType({}),
    threads: int | None = None,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    failed_trial_max_retry: int = 3,
    progress: Callable[[FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Run `objective` until study `study_name` has `n_trials` finished trials (see the module's
    doc for the count, the storage, the executors and the retries); returns the study.

    The study is made, or loaded if it exists (with the same `directions`, else a ValueError);
    `study_user_attrs` are set on it. Each of `enqueue` (params dicts) is enqueued unless a trial
    with those params exists already, so they run first, once. Ctrl-C stops the workers after
    they mark their trials for a retry, then raises KeyboardInterrupt; a SearchError says why if
    the workers stopped before the study was full."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    counts = {
        "n_trials": n_trials,
        "workers": workers,
        "threads": 1 if threads is None else threads,
    }
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, not {value!r}")
    wanted = _directions(directions)
    storage = open_storage(
        storage_url,
        out,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        failed_trial_max_retry=failed_trial_max_retry,
    )
    url = storage.url
    shown = mask_url(url)
    if _sqlite_file(storage.engine.url) is None and storage.engine.dialect.name == "sqlite":
        if workers > 1 or executor == "ray":
            raise ValueError(
                f"study storage {shown!r} lives in one process's memory; workers need a file or "
                "a server"
            )
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=wanted, load_if_exists=True
    )
    if list(study.directions) != wanted:
        have = ", ".join(d.name.lower() for d in study.directions)
        raise ValueError(
            f"study {study_name!r} in {shown} has directions {have}; this search has "
            f"{', '.join(d.name.lower() for d in wanted)}: give another study name or storage"
        )
    for key, value in study_user_attrs.items():
        study.set_user_attr(key, value)
    claim = _Claim(storage, study_name, out)
    try:
        with claim:
            for params in enqueue:
                study.enqueue_trial(dict(params), skip_if_exists=True)
    finally:
        claim.close()
    plan = _Plan(
        storage_url=url,
        out=str(Path(out).resolve()),
        study_name=study_name,
        n_trials=n_trials,
        sampler=sampler,
        seed=seed,
        constraints_func=constraints_func,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        failed_trial_max_retry=failed_trial_max_retry,
        threads=threads or max(1, _cores() // workers),
        optuna_verbosity=optuna.logging.get_verbosity(),
        trials_at_start=len(study.get_trials(deepcopy=False)),
    )
    monitor = _Monitor(study, n_trials, progress)
    done = finished_trials(study)
    log.info(
        "study %r in %s: %d of %d trials finished; %s",
        study_name,
        shown,
        done,
        n_trials,
        "nothing to run" if done >= n_trials else f"{workers} worker(s), executor {executor}",
    )
    if done >= n_trials:
        return study
    if executor == "local" and workers == 1:
        _work(objective, plan, 0, poll=monitor.poll)
        monitor.poll()
        return study
    if executor == "local":
        stops = _run_processes(objective, plan, workers, monitor)
    else:
        stops = _run_ray(objective, plan, workers, threads, ray_address, monitor)
    monitor.poll()
    done = finished_trials(study)
    problems = "; ".join(f"worker {i}: {why}" for i, (why, _) in sorted(stops.items()))
    tracebacks = "".join(
        f"\n\nworker {i}'s traceback:\n{trace}" for i, (_, trace) in sorted(stops.items()) if trace
    )
    if done < n_trials:
        raise SearchError(
            f"study {study_name!r} has {done} of {n_trials} finished trials and its workers "
            f"stopped: {problems}. Rerun the same command to go on.{tracebacks}"
        )
    if problems:
        log.warning(
            "study %r is complete, though a worker stopped early: %s%s",
            study_name,
            problems,
            tracebacks,
        )
    return study


def _check_picklable(objective: Objective) -> None:
    try:
        pickle.dumps(objective)
    except Exception as e:
        raise ValueError(
            f"workers in other processes need a picklable objective (a module-level function, "
            f"or an instance of a module-level class), and {objective!r} is not: {e}"
        ) from None


def _run_processes(
    objective: Objective, plan: _Plan, workers: int, monitor: _Monitor
) -> dict[int, tuple[str, str | None]]:
    """`workers` spawned processes; returns, for each that did not end well, why (and its
    traceback, if it raised)."""
    _check_picklable(objective)
    context = multiprocessing.get_context("spawn")
    procs = {}
    for i in range(workers):
        receive, send = context.Pipe(duplex=False)
        p = context.Process(
            target=_process_worker,
            args=(objective, plan, i, send),
            name=f"seqlab-search-worker-{i}",
        )
        p.start()
        send.close()
        procs[i] = (p, receive)
    stops: dict[int, tuple[str, str | None]] = {}

    def collect(i: int) -> None:
        p, receive = procs.pop(i)
        p.join()
        try:
            message = receive.recv()
        except EOFError:  # it died before it could say
            message = None
        if p.exitcode != 0:
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            stops[i] = (f"process {p.pid} ended by {how}", None)
        elif message is not None:
            stops[i] = (f"process {p.pid} {message[0]}", message[1])

    try:
        while procs:
            ended = multiprocessing.connection.wait(
                [p.sentinel for p, _ in procs.values()], timeout=POLL_S
            )
            for i in [i for i, (p, _) in procs.items() if p.sentinel in ended]:
                collect(i)
            monitor.poll()
    except KeyboardInterrupt:
        for p, _ in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p, _ in procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        monitor.poll()
        raise
    return stops


def _run_ray(
    objective: Objective,
    plan: _Plan,
    workers: int,
    threads: int | None,
    address: str | None,
    monitor: _Monitor,
) -> dict[int, tuple[str, str | None]]:
    """`workers` Ray tasks; returns, for each that did not end well, why (and its traceback)."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"executor 'ray' needs Ray: {INSTALL_SEARCH}") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, **({"include_dashboard": False} if address is None else {}))
    elif address is not None:
        log.info("using the Ray instance this process is connected to, not %s", address)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if threads is None:
            plan = replace(plan, threads=max(1, cpus // workers))
        elif threads > cpus:
            raise ValueError(f"threads={threads} per worker, but the Ray cluster has {cpus} CPUs")
        task = ray.remote(_work).options(num_cpus=plan.threads, name="seqlab-search-worker")
        pending = {task.remote(objective, plan, i): i for i in range(workers)}
        stops: dict[int, tuple[str, str | None]] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # RayTaskError and the like: `cause` is what was raised
                        stops[i] = (f"raised {_reason(getattr(e, 'cause', None) or e)}", str(e))
                monitor.poll()
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=STOP_TIMEOUT_S)
            monitor.poll()
            raise
        return stops
    finally:
        if started_here:
            ray.shutdown()
