import csv
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.report import parse_options
from seqlab.train.results import ResultsError, ResultsStore, flatten, parse_since, run_record
from seqlab.train.trainer import best_metrics, train
from tests.train.conftest import tiny_model, tiny_task, tiny_train
from tests.train.test_trainer import poison_loss


def record(task="mqar", pattern="gdn", lr=1e-3, accuracy=0.5, **extra) -> dict:
    return {
        "task": {"name": task, "config": {}},
        "model": {"pattern": pattern, "d_model": 64, "n_layers": 2},
        "train": {"lr": lr, "steps": 10},
        "metrics": {
            "final": {"all": accuracy, "num_kv_pairs=2,seq_len=64": accuracy},
            "best": {"all": accuracy},
            "steps": 10,
            "stop_reason": "steps",
        },
        "cost": {"params": 1000, "state_bytes": 4096, "wall_time_s": 1.5},
        **extra,
    }


def test_default_path_from_the_environment(results_path):
    store = ResultsStore()
    assert store.path == results_path and results_path.exists()


def test_add_writes_the_database_and_a_json_file(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    run_id = store.add(record())
    [stored] = store.runs()
    assert stored["id"] == run_id
    assert json.loads((tmp_path / "runs" / f"{run_id}.json").read_text()) == stored
    assert stored["metrics"]["final"]["all"] == 0.5
    assert datetime.fromisoformat(stored["created"]) <= datetime.now(UTC)


def test_filters(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    a = store.add(record("mqar", "gdn", lr=1e-3))
    b = store.add(record("mqar", "attn", lr=3e-3))
    c = store.add(record("parity", "gdn", lr=1e-3, tags={"probe": "x", "ok": True}))

    def ids(**kw):
        return [r["id"] for r in store.runs(**kw)]

    assert ids() == [a, b, c]  # oldest first
    assert ids(task="mqar") == [a, b]
    assert ids(arch="gdn") == [a, c]
    assert ids(task="mqar", arch="gdn") == [a]
    assert ids(where={"train.lr": 0.003}) == [b]
    assert ids(where={"model.d_model": 64, "task.name": "parity"}) == [c]
    assert ids(where={"tags.ok": True}) == [c]
    assert ids(where={"metrics.final.num_kv_pairs=2,seq_len=64": 0.5}) == [a, b, c]
    assert ids(where={"train.lr": 0.5}) == []
    assert ids(limit=2) == [b, c]
    assert ids(since="1h") == [a, b, c]
    assert ids(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    with pytest.raises(ValueError, match="dotted key"):
        store.runs(where={"train.lr'; DROP TABLE runs; --": 1})


def test_parse_since():
    now = datetime(2026, 1, 10, 12, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2026, 1, 8, 12, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 1, 10, 11, 30, tzinfo=UTC)
    assert parse_since("2026-01-01") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="age like"):
        parse_since("yesterday")


def test_csv_export_has_one_column_per_key(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.add(record("mqar", "gdn"))
    store.add(record("parity", "attn", tags={"probe": "mqar"}))
    path = store.to_csv(store.runs(), tmp_path / "out" / "runs.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["task.name"] for r in rows] == ["mqar", "parity"]
    assert rows[0]["metrics.final.all"] == "0.5"
    assert rows[0]["tags.probe"] == "" and rows[1]["tags.probe"] == "mqar"
    assert flatten({"a": {"b": [1, 2]}}) == {"a.b": "[1, 2]"}


def test_run_record_of_a_real_run(tmp_path):
    task, model = tiny_task(), tiny_model()
    config = tiny_train(steps=10, eval_every=5)
    result = train(model, task, config)
    rec = run_record("mqar", task, model, config, result, preset="cpu", tags={"probe": "mqar"})
    assert rec["task"] == {
        "name": "mqar",
        "preset": "cpu",
        "config": task.config.model_dump(mode="json"),
    }
    assert rec["model"]["pattern"] == "gla" and rec["train"]["steps"] == 10
    env = rec["env"]
    assert {"python", "torch", "seqlab", "device", "hostname", "git_commit"} <= set(env)
    assert env["device"] == "cpu"
    metrics = rec["metrics"]
    assert metrics["final"] == result.final and metrics["steps"] == 10
    assert metrics["stop_reason"] == "steps"
    assert [step for step, _ in metrics["loss"]["curve"]] == [5, 10]
    cost = rec["cost"]
    assert cost["params"] == result.model.num_params()
    assert cost["state_bytes"] == result.model.state_bytes_for(1, task.seq_len) > 0
    assert cost["seq_len"] == 16 and cost["tokens"] == 10 * 8 * 16
    assert cost["wall_time_s"] >= cost["train_time_s"] > 0 and cost["tokens_per_s"] > 0
    store = ResultsStore(tmp_path / "r.db")
    store.add(rec)
    assert store.runs(where={"tags.probe": "mqar"})[0]["cost"] == json.loads(json.dumps(cost))


WRITER = """
import sys, time
from pathlib import Path
from seqlab.train.results import ResultsStore
path, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = ResultsStore(path)
(path.parent / f"ready-{name}").touch()
while len(list(path.parent.glob("ready-*"))) < 2:  # begin together
    time.sleep(0.01)
for i in range(n):
    store.add({"task": {"name": name}, "model": {"pattern": "gdn"}, "i": i})
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    path, n = tmp_path / "r.db", 150
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n)])
        for name in ("a", "b")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    store = ResultsStore(path)
    runs = store.runs()
    assert store.count() == 2 * n == len(runs) == len({r["id"] for r in runs})
    for name in ("a", "b"):
        assert sorted(r["i"] for r in store.runs(task=name)) == list(range(n))
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2 * n
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    # The writes really interleaved: each writer's rows are not one block.
    order = [r["task"]["name"] for r in runs]
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) > 2, order


def test_results_command_filters_and_exports(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    a = store.add(record("mqar", "gdn", lr=1e-3))
    store.add(record("mqar", "attn", lr=3e-3))
    store.add(record("parity", "gdn", lr=1e-3))
    out = tmp_path / "runs.csv"
    args = ["results", "--db", str(store.path), "--task", "mqar", "--arch", "gdn"]
    result = CliRunner().invoke(app, [*args, "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 runs in" in result.output and a in result.output
    assert [r["id"] for r in csv.DictReader(out.open())] == [a]

    result = CliRunner().invoke(
        app, ["results", "--db", str(store.path), "--where", "train.lr=0.003", "--since", "1d"]
    )
    assert result.exit_code == 0 and "1 runs in" in result.output and "attn" in result.output

    c = store.add(record("mqar", "gdn(head_dim=16)"))
    where = ["--where", "model.pattern=gdn(head_dim=16)", "--where", "task.name=mqar"]
    result = CliRunner().invoke(app, ["results", "--db", str(store.path), *where])
    assert result.exit_code == 0 and "1 runs in" in result.output and c in result.output

    result = CliRunner().invoke(app, ["results", "--db", str(store.path), "--where", "lr"])
    assert result.exit_code != 0 and "key=value" in result.output


def test_results_command_uses_the_environment_path(results_path):
    ResultsStore().add(record())
    result = CliRunner().invoke(app, ["results"])
    assert result.exit_code == 0 and "1 runs in" in result.output
    assert Path(results_path).exists()


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as SQLite and every other JSON reader do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def diverged(**extra) -> dict:
    rec = record(accuracy=math.nan, **extra)
    rec["metrics"]["stop_reason"] = "non_finite"
    rec["metrics"]["best"] = {"all": math.inf}
    rec["metrics"]["loss"] = {"last": math.inf, "curve": [(5, 2.0), (10, -math.inf)]}
    return rec


def test_a_diverged_run_does_not_poison_the_store(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    bad = store.add(diverged())
    good = store.add(record(lr=3e-3))
    # Every query still works: SQLite's json_extract reads the whole table.
    assert [r["id"] for r in store.runs(where={"train.lr": 0.003})] == [good]
    [stored] = store.runs(where={"train.lr": 0.001})
    assert stored["id"] == bad
    assert strict_json((tmp_path / "runs" / f"{bad}.json").read_text()) == stored
    assert stored["metrics"]["final"]["all"] is None
    assert stored["metrics"]["loss"]["curve"] == [[5, 2.0], [10, None]]
    assert stored["non_finite"] == {
        "metrics.final.all": "nan",
        "metrics.final.num_kv_pairs=2,seq_len=64": "nan",
        "metrics.best.all": "inf",
        "metrics.loss.last": "inf",
        "metrics.loss.curve.1.1": "-inf",
    }
    assert stored["status"] == "diverged"
    assert [r["id"] for r in store.runs(where={"status": "diverged"})] == [bad]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM runs WHERE json_valid(record)").fetchone() == (2,)
    db.close()


def test_an_old_database_with_nan_records_stays_queryable(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    a = store.add(record(lr=1e-3))
    db = sqlite3.connect(store.path)
    with db:  # a record as older versions wrote it: NaN and Infinity, not JSON
        old = {"id": "old", "created": datetime.now(UTC).isoformat(), **diverged()}
        row = ("old", old["created"], "mqar", "gdn", "non_finite", None, None, 1, 1, 1.0)
        row += (json.dumps(old),)
        db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    db.close()
    c = store.add(record(lr=3e-3))
    assert [r["id"] for r in store.runs(where={"train.lr": 0.001})] == [a, "old"]
    assert [r["id"] for r in store.runs(where={"train.lr": 0.003})] == [c]
    assert [r["id"] for r in store.runs(where={"metrics.final.all": None})] == ["old"]
    assert [r["id"] for r in store.runs(where={"train.lr": 0.001}, limit=1)] == ["old"]
    [old] = store.runs(where={"metrics.stop_reason": "non_finite"})
    assert old["metrics"]["best"]["all"] is None and old["non_finite"]["metrics.best.all"] == "inf"
    args = ["results", "--db", str(store.path), "--where", "train.lr=0.001"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "2 runs in" in result.output, result.output


def test_best_metrics_are_never_infinite():
    history = [
        {"metrics": {"all": math.nan, "bits_per_byte": math.nan}},
        {"metrics": {"all": 0.25, "bits_per_byte": math.inf}},
    ]
    assert best_metrics(history) == {"all": 0.25}
    assert best_metrics(history[:1]) == {}


def test_a_diverged_run_is_recorded_as_diverged(tmp_path, monkeypatch):
    task, model, config = tiny_task(), tiny_model(), tiny_train(steps=10, eval_every=5)
    ok = run_record("mqar", task, model, config, train(model, task, config))
    poison_loss(monkeypatch, at_call=7, where="loss")
    result = train(model, task, config)
    rec = run_record("mqar", task, model, config, result)
    assert (ok["status"], rec["status"]) == ("completed", "diverged")
    store = ResultsStore(tmp_path / "r.db")
    run_id = store.add(rec)
    assert store.runs(where={"status": "diverged"})[0]["id"] == run_id


def test_a_foreign_runs_table_is_refused_up_front(tmp_path):
    path = tmp_path / "r.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (task TEXT, created TEXT)")
    db.commit()
    db.close()
    for read_only in (False, True):
        with pytest.raises(ResultsError, match=r"not a seqlab results store.*task, created"):
            ResultsStore(path, read_only=read_only)
    result = CliRunner().invoke(app, ["results", "--db", str(path)])
    assert result.exit_code != 0 and "not a seqlab results store" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_json_folder_that_cannot_be_written_is_refused_up_front(tmp_path):
    ResultsStore(tmp_path / "r.db").add(record())
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ResultsError, match=r"JSON folder.*r\.db'.*runs' is a file"):
        ResultsStore(tmp_path / "r.db")
    assert ResultsStore(tmp_path / "r.db", read_only=True).count() == 1  # reading needs no folder


def test_a_read_only_filesystem_still_reads_the_write_ahead_log(tmp_path, monkeypatch):
    src = ResultsStore(tmp_path / "src" / "r.db")
    first = src.add(record())
    hold = src.connect()  # a live reader keeps the WAL from being folded into the database
    hold.execute("SELECT 1").fetchone()
    later = [src.add(record(lr=3e-3)) for _ in range(3)]
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copyfile(src.path, ro / "r.db")
    shutil.copyfile(f"{src.path}-wal", ro / "r.db-wal")  # no -shm, as left by a killed writer
    hold.close()
    assert (ro / "r.db-wal").stat().st_size > 0

    connect = sqlite3.connect

    class CannotMakeShm(sqlite3.Connection):
        def execute(self, *args):
            raise sqlite3.OperationalError("attempt to write a readonly database")

    def read_only_fs(database, *args, **kwargs):  # mode=ro cannot make the -shm file there
        if "mode=ro" in str(database):
            kwargs["factory"] = CannotMakeShm
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_fs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    store = ResultsStore(ro / "r.db", read_only=True)
    assert [r["id"] for r in store.runs()] == [first, *later]
    assert [r["id"] for r in store.runs(where={"train.lr": 0.003})] == later
    assert store.count() == 4
    assert list((tmp_path / "tmp").iterdir()) == []  # the copies are gone
    assert sorted(p.name for p in ro.iterdir()) == ["r.db", "r.db-wal"]

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(ResultsError, match=r"write-ahead log '.*r\.db-wal'"):
        store.runs()
    # Without a WAL, the database is read as it is.
    (ro / "r.db-wal").unlink()
    assert [r["id"] for r in store.runs()] == [first]


def test_where_compares_lists_and_dicts_as_json(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    a = store.add(record(betas=[0.9, 0.95], mix={"seq_len": 16, "pairs": [2, 4]}))
    b = store.add(record(betas=[0.9, 0.99], mix={"seq_len": 16, "pairs": [2]}))

    def ids(**where):
        return [r["id"] for r in store.runs(where=where)]

    assert ids(betas=[0.9, 0.95]) == [a]
    assert ids(betas=(0.9, 0.99)) == [b]
    assert ids(betas=[0.9]) == []
    assert ids(mix={"pairs": [2, 4], "seq_len": 16}) == [a]  # keys in any order
    assert ids(mix={"seq_len": 16}) == []
    assert ids(**{"mix.pairs": [2]}) == [b]
    assert [r["id"] for r in store.runs(where={"betas": [0.9, 0.99]}, limit=1)] == [b]
    with pytest.raises(ValueError, match="train.seed=.*too large"):
        store.runs(where={"train.seed": 10**20})
    args = ["results", "--db", str(store.path), "--where", "betas=[0.9,0.95]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "1 runs in" in result.output, result.output
    args = ["results", "--db", str(store.path), "--where", "train.seed=99999999999999999999"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "too large" in result.output


def test_where_keys_may_contain_equals_signs(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    a = store.add(record(accuracy=0.25))
    store.add(record(accuracy=0.75))
    assert parse_options(["metrics.final.num_kv_pairs=2,seq_len=64=0.25"]) == {
        "metrics.final.num_kv_pairs=2,seq_len=64": 0.25
    }
    assert parse_options(["model.pattern=gdn(head_dim=16)", "x=a=b"]) == {
        "model.pattern": "gdn(head_dim=16)",
        "x": "a=b",
    }
    where = ["--where", "metrics.final.num_kv_pairs=2,seq_len=64=0.25"]
    result = CliRunner().invoke(app, ["results", "--db", str(store.path), *where])
    assert result.exit_code == 0 and "1 runs in" in result.output and a in result.output


def test_a_writer_removes_stale_temporary_files(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.add(record())
    runs = tmp_path / "runs"
    stale = runs / ".20260101-120000-0123abcd.json.k2j_x9q.tmp"  # a writer killed mid-write
    fresh = runs / ".20260101-120001-4567ef01.json.a8f3hh2.tmp"  # a live writer's
    other = runs / ".notes.json.old.tmp"  # not the store's
    for path in (stale, fresh, other):
        path.write_text("{")
    old = time.time() - 3600
    for path in (stale, other):
        os.utime(path, (old, old))
    ResultsStore(tmp_path / "r.db", read_only=True)
    assert stale.exists()  # a reader removes nothing
    ResultsStore(tmp_path / "r.db")
    assert not stale.exists() and fresh.exists() and other.exists()
