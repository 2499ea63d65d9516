"""The results store: one record per run in SQLite (WAL, safe for concurrent writers) and as JSON.

    store = ResultsStore()                      # $SEQLAB_RESULTS or ./seqlab-results/results.db
    run_id = store.add(run_record(task_name, task, model_config, train_config, result))
    store.runs(task="mqar", arch="gdn", since="2d", where={"train.lr": 0.001})
    store.to_csv(store.runs(), "runs.csv")

A record is a JSON object: id, created (UTC, ISO 8601), status ("completed" or "diverged"),
task {name, config}, model, train, env, metrics {final, best, steps, stop_reason, ...} and cost
{params, state_bytes, wall_time_s, ...}. Each is also written, atomically, to runs/<id>.json next to
the database. Records are standard JSON: a NaN or Inf number is stored as null, and its dotted path
and value ("nan", "inf", "-inf") are listed under "non_finite".
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

import seqlab
from seqlab.files import writable_dir, write_atomic
from seqlab.model.lm import ModelConfig
from seqlab.tasks import TASKS, Task
from seqlab.train.trainer import TrainConfig, TrainResult, resolve_device

log = logging.getLogger(__name__)

ENV_VAR = "SEQLAB_RESULTS"
DEFAULT_PATH = Path("seqlab-results") / "results.db"
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    task TEXT NOT NULL,
    arch TEXT NOT NULL,
    stop_reason TEXT,
    accuracy REAL,
    best_accuracy REAL,
    params INTEGER,
    state_bytes INTEGER,
    wall_time_s REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_task ON runs (task, created);
"""
# The columns of the runs table, in order (`add` inserts by position).
RUN_COLUMNS = tuple(re.findall(r"^    (\w+) ", SCHEMA, re.MULTILINE))
# A temporary file `write_atomic` leaves in runs/ when its writer is killed mid-write:
# .<run id>.json.<random>.tmp. One older than STALE_TMP_S is removed when a writer opens the store.
_TMP = re.compile(r"^\.\d{8}-\d{6}-[0-9a-f]{8}\.json\.[A-Za-z0-9_]+\.tmp$")
STALE_TMP_S = 600.0
# Columns `seqlab results` shows, in order: (title, dotted path into the record).
COLUMNS = (
    ("id", "id"),
    ("created", "created"),
    ("task", "task.name"),
    ("arch", "model.pattern"),
    ("d", "model.d_model"),
    ("L", "model.n_layers"),
    ("steps", "metrics.steps"),
    ("stop", "metrics.stop_reason"),
    ("acc %", "metrics.final.all"),
    ("best %", "metrics.best.all"),
    ("params", "cost.params"),
    ("state B", "cost.state_bytes"),
    ("wall s", "cost.wall_time_s"),
)
_SQLITE_INT = range(-(2**63), 2**63)
# A record key for --where and the report: dotted names, slice keys may hold = and ,
RECORD_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_=,]+)*$")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def default_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def task_name(task: Task) -> str:
    return next(name for name, (_, cls) in TASKS.items() if type(task) is cls)


def git_commit() -> str | None:
    """The commit of the seqlab checkout in use, "+dirty" when it has changes; None outside git."""
    root = Path(seqlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str = "auto") -> dict[str, Any]:
    dev = resolve_device(device)
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = f"{platform.machine()} cpu, {torch.get_num_threads()} threads"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seqlab": seqlab.__version__,
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": device_name,
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }


def run_record(
    task_name: str,
    task: Task,
    model_config: ModelConfig,
    train_config: TrainConfig,
    result: TrainResult,
    preset: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of one finished (or stopped) run, ready for `ResultsStore.add`."""
    losses = [h["train_loss"] for h in result.history]
    finite = all(math.isfinite(v) for v in result.final.values())
    return {
        "status": "completed" if result.stop_reason != "non_finite" and finite else "diverged",
        "task": {
            "name": task_name,
            "preset": preset,
            "config": task.config.model_dump(mode="json"),
        },
        "model": model_config.model_dump(mode="json"),
        "train": train_config.model_dump(mode="json"),
        "env": {**environment(train_config.device), "world_size": result.world_size},
        "metrics": {
            "final": result.final,
            "best": result.best,
            "steps": result.step,
            "stop_reason": result.stop_reason,
            "message": result.message,
            "resumed_from": result.resumed_from,
            "loss": {
                "first": losses[0] if losses else None,
                "last": losses[-1] if losses else None,
                "min": min(losses) if losses else None,
                # (step, mean training loss since the previous evaluation), one per evaluation.
                "curve": [(h["step"], h["train_loss"]) for h in result.history],
            },
            # every evaluation: step, wall_time_s, tokens, train_loss, lr, grad_norm, metrics
            "curve": result.curve,
        },
        "cost": {
            "params": result.model.num_params(),
            "seq_len": task.seq_len,
            "state_bytes": result.model.state_bytes_for(1, task.seq_len),
            "wall_time_s": result.wall_time_s,
            "train_time_s": result.train_time_s,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens_per_s,
        },
        "tags": tags or {},
    }


def lookup(record: dict[str, Any], path: str) -> Any:
    """record["a"]["b"] for path "a.b"; None where a key is missing."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def finite_json(value: Any, path: str = "", non_finite: dict[str, str] | None = None) -> Any:
    """`value` with every NaN or Inf float replaced by None (tuples become lists);
    non_finite[dotted path] = "nan", "inf" or "-inf" for each one replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        if non_finite is not None:
            non_finite[path] = str(value)
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}".lstrip("."), non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v, f"{path}.{i}", non_finite) for i, v in enumerate(value)]
    return value


# A non-finite number at one of these paths means the run itself diverged.
_DIVERGED = ("metrics.final.", "metrics.best.", "metrics.loss.last")


def standard_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as standard JSON (see the module docstring); a NaN or Inf final metric, best
    metric or last loss marks it "diverged"."""
    non_finite: dict[str, str] = {}
    record = finite_json(record, non_finite=non_finite)
    if non_finite:
        record["non_finite"] = {**record.get("non_finite", {}), **non_finite}
        if any(p.startswith(_DIVERGED) for p in non_finite):
            record["status"] = "diverged"
    return record


def _matches(record: dict[str, Any], where: dict[str, Any]) -> bool:
    """`where` as SQL's `json_extract(record, path) IS value` reads it, in Python."""
    return all(lookup(record, key) == value for key, value in where.items())


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become JSON text."""
    flat: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, list | tuple) else v
    return flat


def parse_since(since: str, now: datetime | None = None) -> datetime:
    """An age such as 30m, 12h, 2d, 1w, or an ISO date/time (UTC if it has no zone)."""
    now = now or datetime.now(UTC)
    if m := _AGE.match(since.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m[2]]
        try:
            return now - timedelta(**{unit: float(m[1])})
        except OverflowError:  # an age before year 1: every run is that recent
            return datetime.min.replace(tzinfo=UTC)
    try:
        when = datetime.fromisoformat(since.strip())
    except ValueError:
        raise ValueError(
            f"since: expected an age like 30m, 12h, 2d, 1w or an ISO date, got {since!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_value(text: str) -> Any:
    """A --where value: a JSON literal (1, 0.5, true, null, "x") if it reads as one, else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ResultsError(ValueError):
    """The results database cannot be opened, or is not one."""


class ResultsStore:
    """Runs in an SQLite database. Every call opens its own connection, so one store may be used
    from many processes; WAL and a busy timeout make concurrent writers wait, never fail.

    The database is opened (made if missing) and checked when the store is made, so a run that
    will record its result fails before it trains. `read_only=True` only reads: the database
    must exist, and is opened read-only (so it may lie on a read-only file or filesystem)."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        self.path = Path(path) if path is not None else default_path()
        self.read_only = read_only
        self.json_dir = self.path.parent / "runs"
        self._check_header()
        if read_only:
            if not self.path.is_file():
                raise ResultsError(
                    f"no results database at {str(self.path)!r}: no run has been recorded there"
                )
            self._check(self._check_columns)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResultsError(
                f"cannot make the folder of the results database {str(self.path)!r}: "
                f"{e.strerror or e}"
            ) from None
        try:
            writable_dir(self.json_dir)
        except ValueError as e:
            raise ResultsError(
                f"the JSON folder of the results database {str(self.path)!r} cannot be written: {e}"
            ) from None
        self._check(lambda db: (db.executescript(SCHEMA), self._check_columns(db)))
        self._remove_stale_tmp()

    def _check_columns(self, db: sqlite3.Connection) -> None:
        """The runs table must have the columns `add` writes, in that order."""
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(runs)"))
        if not columns:
            raise sqlite3.DatabaseError("no such table: runs")
        if columns != RUN_COLUMNS:
            raise ResultsError(
                f"{str(self.path)!r} is an SQLite database but not a seqlab results store "
                f"(its runs table has the columns {', '.join(columns)}; "
                f"expected {', '.join(RUN_COLUMNS)})"
            )

    def _remove_stale_tmp(self) -> None:
        """Remove the temporary files of writers killed mid-write (only old ones: a fresh one may
        be a live writer's)."""
        try:
            names = [p for p in self.json_dir.iterdir() if _TMP.match(p.name)]
        except OSError:
            return  # not made yet
        for tmp in names:
            try:
                if time.time() - tmp.lstat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
                    log.info("%s: removed %s, left by a writer killed mid-write", self.path, tmp)
            except OSError:
                pass  # gone already, or not ours to remove

    def _check_header(self) -> None:
        """A file that is there and not empty must start as an SQLite database does (SQLite
        itself takes a short text file for an empty database, and would write into it)."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return  # made below, or SQLite says why not
        except OSError as e:
            why = f"cannot read the results database {str(self.path)!r}: {e.strerror or e}"
            raise ResultsError(why) from None
        if head and head != b"SQLite format 3\x00":
            raise ResultsError(f"{str(self.path)!r} is not an SQLite database")

    def _check(self, use) -> None:
        """Open a connection and `use` it, turning SQLite's errors into one naming the file."""
        try:
            db = self.connect()
            try:
                use(db)
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e):
                why = "is not an SQLite database"
            elif "no such table" in str(e):
                why = "is an SQLite database but not a seqlab results store (no runs table)"
            else:
                why = "cannot be opened as a results database"
            raise ResultsError(f"{str(self.path)!r} {why} ({e})") from None

    def connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # reading WAL needs its -shm file
            return db
        except sqlite3.OperationalError:
            # On a read-only filesystem SQLite cannot make that file; nobody can write the
            # database there either, so it is read as immutable (no locks, no WAL index).
            db.close()
        wal = Path(f"{self.path}-wal")
        try:
            has_wal = wal.stat().st_size > 0
        except OSError:
            has_wal = False
        if not has_wal:
            return sqlite3.connect(f"{uri}?immutable=1", uri=True)
        # Immutable ignores the WAL, and the runs in it: read a copy of both, held in memory.
        try:
            with tempfile.TemporaryDirectory(prefix="seqlab-results-") as tmp:
                copy = Path(tmp) / "results.db"
                shutil.copyfile(self.path, copy)
                shutil.copyfile(wal, f"{copy}-wal")
                disk = sqlite3.connect(copy)
                try:
                    db = sqlite3.connect(":memory:")
                    disk.backup(db)
                finally:
                    disk.close()
                return db
        except (OSError, sqlite3.Error) as e:
            raise ResultsError(
                f"{str(self.path)!r} is on a read-only filesystem and has runs in its write-ahead "
                f"log {str(wal)!r}, which cannot be read there nor copied to a temporary folder "
                f"({e})"
            ) from None

    def add(self, record: dict[str, Any]) -> str:
        """Store a record (from `run_record`); returns its new id."""
        if self.read_only:
            raise ResultsError(f"{str(self.path)!r} was opened read-only")
        now = datetime.now(UTC)
        run_id = f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        # Microseconds always, so that text order is time order.
        record = {"id": run_id, "created": now.isoformat(timespec="microseconds"), **record}
        record = standard_record(json.loads(json.dumps(record, default=str)))
        text = json.dumps(record, allow_nan=False)
        self.json_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.json_dir / f"{run_id}.json", lambda tmp: Path(tmp).write_text(text))
        row = (
            run_id,
            record["created"],
            lookup(record, "task.name"),
            lookup(record, "model.pattern"),
            lookup(record, "metrics.stop_reason"),
            lookup(record, "metrics.final.all"),
            lookup(record, "metrics.best.all"),
            lookup(record, "cost.params"),
            lookup(record, "cost.state_bytes"),
            lookup(record, "cost.wall_time_s"),
            text,
        )
        db = self.connect()
        try:
            with db:
                db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        finally:
            db.close()
        return run_id

    def runs(
        self,
        task: str | None = None,
        arch: str | None = None,
        since: str | datetime | None = None,
        where: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Records, oldest first. `arch` matches the pattern exactly; `where` maps dotted paths
        into the record (e.g. "train.lr", "model.d_model", "tags.probe") to required values."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"limit: expected a whole number ≥ 0, got {limit!r}")
        clauses, params = [], []
        if task is not None:
            clauses.append("task = ?")
            params.append(task)
        if arch is not None:
            clauses.append("arch = ?")
            params.append(arch)
        if since is not None:
            when = parse_since(since) if isinstance(since, str) else since
            clauses.append("created >= ?")
            params.append(when.astimezone(UTC).isoformat(timespec="microseconds"))
        # A list or dict value as it reads back from a record (tuples become lists).
        where = {k: json.loads(json.dumps(v, default=str)) for k, v in (where or {}).items()}
        objects = {}  # dict values: their keys may be in any order, so compared in Python
        for key, value in where.items():
            if not RECORD_KEY.match(key):
                raise ValueError(f"where: {key!r} is not a dotted key like train.lr")
            path = "$" + "".join(f'."{part}"' for part in key.split("."))
            if isinstance(value, bool):
                value = int(value)  # json_extract gives JSON true/false as 1/0
            if isinstance(value, int) and value not in _SQLITE_INT:
                raise ValueError(f"where: {key}={value} is too large an integer for SQLite")
            test = "json_extract(record, ?) IS ?"
            if isinstance(value, list):
                test = "json_extract(record, ?) = json(?)"  # an array reads back as JSON text
                value = json.dumps(value)
            elif isinstance(value, dict):
                test = "json_type(record, ?) = ?"
                objects[key], value = value, "object"
            # Records older versions wrote with NaN or Infinity are not JSON to SQLite, and one
            # would fail the whole query: they pass here and are filtered in Python below.
            clauses.append(f"CASE WHEN json_valid(record) THEN {test} ELSE 1 END")
            params += [path, value]
        sql = "SELECT record, created, id, json_valid(record) FROM runs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        if limit is None or where:
            # With `where`, SQL cannot tell which old records match: the limit is applied below.
            sql += " ORDER BY created, id"
        else:
            # The newest `limit` runs, still listed oldest first.
            sql = (
                f"SELECT * FROM ({sql} ORDER BY created DESC, id DESC LIMIT ?) ORDER BY created, id"
            )
            params.append(limit)
        db = self.connect()
        try:
            rows = db.execute(sql, params).fetchall()
        finally:
            db.close()
        records = []
        for text, _, run_id, valid in rows:
            if valid:
                record = json.loads(text)
                if _matches(record, objects):
                    records.append(record)
                continue
            try:
                record = standard_record(json.loads(text))
            except json.JSONDecodeError as e:
                log.warning("%s: run %s is not readable JSON, skipped (%s)", self.path, run_id, e)
                continue
            if _matches(record, where):
                records.append(record)
        return records if limit is None or not where else records[max(0, len(records) - limit) :]

    def count(self) -> int:
        db = self.connect()
        try:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            db.close()

    @staticmethod
    def to_csv(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
        """One row per record, one column per dotted key (the union over records)."""
        flat = [flatten(r) for r in records]
        keys = list(dict.fromkeys(k for row in flat for k in row))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(flat)

        write_atomic(path, write)
        return path
