"""MLflow and W&B beside TensorBoard (seqlab.train.tracking), through the real libraries, offline:
MLflow on SQLite stores in tmp_path, read back with MlflowClient; W&B with WANDB_MODE=offline,
read back from the run's .wandb file. Every value each logger holds is held against the
trainer's own numbers and TensorBoard's; a resumed run continues the same tracking runs; a
missing package is a clear error before any work.

Run: .venv/bin/python -m pytest tests/train/test_tracking.py -q
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.tracking import MLFLOW_DB, TRACKING, flat, mlflow_name
from seqlab.train.trainer import Trainer, train
from seqlab.train.watch import EVENTS
from tests.train.conftest import TINY_MQAR_ARGS, tiny_model, tiny_task, tiny_train
from tests.train.test_trainer import Crash, crash_at
from tests.train.test_watch import scalars

STEPS, EVERY = 30, 10


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its settings and caches under tmp_path, nothing sent anywhere."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def run(out: Path | None, **options):
    config = tiny_train(
        steps=STEPS, eval_every=EVERY, out_dir=None if out is None else str(out), **options
    )
    return train(tiny_model(), tiny_task(), config)


def mlflow_client(out: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out / MLFLOW_DB}")


def mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every value of every metric of the run, (step, value) in step order."""
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header: CRC, length, type full/first/middle/last) of
    wandb_internal_pb2.Record protos."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:header])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a .wandb file"
    records, pending, i = [], b"", header
    while i + header <= len(data):
        if block - i % block < header:  # a block's tail too short for a header is padding
            i += block - i % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i : i + header])
        if kind == 0:
            break
        pending += data[i + header : i + header + length]
        i += header + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def key(item) -> str:
    """A history or summary item's key: `key`, or `nested_key` (a list of parts) instead."""
    return item.key or "/".join(item.nested_key)


def wandb_run(folder: Path) -> dict:
    """An offline run folder read back: its run record's config, its history rows by step,
    its last summary value of each key and its exit code."""
    (path,) = folder.glob("run-*.wandb")
    config, history, summary, exit_code, run_id = {}, {}, {}, None, None
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            row = {key(it): json.loads(it.value_json) for it in r.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({key(u): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return dict(id=run_id, config=config, history=history, summary=summary, exit_code=exit_code)


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_mlflow_and_wandb_hold_what_tensorboard_and_the_trainer_hold(tmp_path, offline_wandb):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    result = run(out, mlflow="out", wandb="seqlab-tests")
    board = scalars(out / EVENTS)
    ids = json.loads((out / TRACKING).read_text())
    assert ids["mlflow"]["uri"] == "out" and ids["wandb"]["project"] == "seqlab-tests"

    client = mlflow_client(out)
    mlflow_run = client.get_run(ids["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.tags["seqlab.run_folder"] == str(out.resolve())
    params = mlflow_run.data.params
    assert params["train.lr"] == "0.003" and params["model.pattern"] == "gla"
    assert params["train.mlflow"] == "out" and params["task.class"] == "MQAR"
    assert json.loads(params["task.config.train_mix"]) == [[16, 2, 256], [16, 4, 256]]
    got = mlflow_history(client, mlflow_run.info.run_id)
    # the same names (MLflow's spelling of the slices) and steps as TensorBoard, values to its
    # float32
    assert set(got) == {mlflow_name(k) for k in board}
    for name, points in board.items():
        mine = got[mlflow_name(name)]
        assert [s for s, _ in mine] == [s for s, _ in points], name
        assert [v for _, v in mine] == pytest.approx([v for _, v in points], rel=1e-6), name
    # and the trainer's own numbers: each evaluation's mean loss and largest grad norm over its
    # updates, its metrics
    loss, norm = [v for _, v in got["train/loss"]], [v for _, v in got["train/grad_norm"]]
    for i, record in enumerate(result.history):
        part = slice(i * EVERY, (i + 1) * EVERY)
        assert math.fsum(loss[part]) / EVERY == pytest.approx(record["train_loss"], rel=1e-12)
        assert max(norm[part]) == record["grad_norm"]
        for name, value in record["metrics"].items():
            assert got[mlflow_name(f"eval/{name}")][i] == (record["step"], value)

    (folder,) = offline_runs(out)
    w = wandb_run(folder)
    assert w["id"] == ids["wandb"]["id"] and w["exit_code"] == 0
    assert w["config"]["run_folder"] == str(out.resolve())
    assert w["config"]["train"]["lr"] == 0.003 and w["config"]["model"]["pattern"] == "gla"
    assert w["config"]["task"]["class"] == "MQAR"
    assert w["config"]["task"]["config"]["train_mix"] == [[16, 2, 256], [16, 4, 256]]
    assert sorted(w["history"]) == list(range(1, STEPS + 1))
    for name, points in board.items():  # W&B keeps TensorBoard's names as they are
        assert [(s, w["history"][s][name]) for s, _ in points] == [
            (s, v) for s, v in got[mlflow_name(name)]
        ], name
    assert w["summary"]["train/loss"] == loss[-1]
    assert w["summary"]["eval/all"] == result.final["all"]


def test_a_resumed_run_continues_the_same_tracking_runs(tmp_path, monkeypatch, offline_wandb):
    pytest.importorskip("mlflow")
    reference = run(tmp_path / "ref")  # TensorBoard alone: the uninterrupted curve
    want = scalars(tmp_path / "ref" / EVENTS)
    out = tmp_path / "run"
    crash_at(monkeypatch, 25)
    with pytest.raises(Crash):
        run(out, mlflow="out", wandb="seqlab-tests")
    monkeypatch.undo()
    ids = json.loads((out / TRACKING).read_text())
    client = mlflow_client(out)
    first = client.get_run(ids["mlflow"]["run_id"])
    assert first.info.status == "FAILED"
    assert [s for s, _ in mlflow_history(client, first.info.run_id)["train/loss"]] == list(
        range(1, 25)
    )

    resumed = run(out, mlflow="out", wandb="seqlab-tests")
    assert resumed.resumed_from == 20
    assert json.loads((out / TRACKING).read_text()) == ids
    (experiment,) = [e for e in client.search_experiments() if e.name == "seqlab"]
    (again,) = client.search_runs([experiment.experiment_id])  # one run, continued
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    got = mlflow_history(client, again.info.run_id)
    # steps 21-24, logged by the killed process and trained again, are not logged twice
    assert [s for s, _ in got["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in got["train/loss"]] == pytest.approx(
        [v for _, v in want["train/loss"]], rel=1e-6
    )
    assert [v for _, v in got["eval/all"]] == [h["metrics"]["all"] for h in reference.history]
    assert len(got["perf/tokens_per_s"]) == 3

    # W&B offline: each process wrote its own folder for the one run id; the resumed one
    # carries on from the checkpoint's step
    killed, later = (wandb_run(f) for f in offline_runs(out))
    assert killed["id"] == later["id"] == ids["wandb"]["id"]
    assert (killed["exit_code"], later["exit_code"]) == (1, 0)
    assert sorted(killed["history"]) == list(range(1, 25))
    assert sorted(later["history"]) == list(range(21, STEPS + 1))
    assert later["summary"]["train/loss"] == got["train/loss"][-1][1]


def test_a_run_started_afresh_starts_new_tracking_runs(tmp_path, offline_wandb):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    config = tiny_train(steps=10, eval_every=10, out_dir=str(out), mlflow="out", wandb="p")
    train(tiny_model(), tiny_task(), config)
    first = json.loads((out / TRACKING).read_text())
    train(tiny_model(), tiny_task(), config, resume=False)
    second = json.loads((out / TRACKING).read_text())
    assert second["mlflow"]["run_id"] != first["mlflow"]["run_id"]
    assert second["wandb"]["id"] != first["wandb"]["id"]


def test_an_mlflow_uri_without_an_out_folder(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = train(tiny_model(), tiny_task(), tiny_train(steps=10, eval_every=5, mlflow=uri))
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "seqlab"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "gla" and "seqlab.run_folder" not in mlflow_run.data.tags
    got = mlflow_history(client, mlflow_run.info.run_id)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 11))
    assert [v for _, v in got["eval/all"]] == [h["metrics"]["all"] for h in result.history]


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_package_is_a_clear_error_before_any_work(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails, find_spec finds nothing
    value = "out" if package == "mlflow" else "proj"
    config = tiny_train(out_dir=str(tmp_path / "run"), **{package: value})
    with pytest.raises(ValueError) as error:
        Trainer(tiny_model(), tiny_task(), config)
    message = str(error.value)
    assert f"the {package} package is not installed" in message
    assert "pip install -e '.[tracking]'" in message
    assert not (tmp_path / "run").exists()

    def work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "run", work)
    task = [a for o in TINY_MQAR_ARGS for a in ("--task-option", o)]
    args = ["train", *task, "--out", str(tmp_path / "cli"), f"--{package}", value]
    done = CliRunner().invoke(app, [*args, "--no-record"], terminal_width=250)
    text = " ".join(done.output.split())
    assert done.exit_code == 2, done.output
    assert f"the {package} package is not installed" in text and ".[tracking]" in text


def test_the_mlflow_store_in_the_out_folder_needs_one():
    with pytest.raises(ValueError, match="train.mlflow = 'out'.*set train.out_dir"):
        Trainer(tiny_model(), tiny_task(), tiny_train(mlflow="out"))


def test_an_unusable_mlflow_store_names_itself(tmp_path):
    pytest.importorskip("mlflow")
    uri = "nosuch://store"  # a scheme MLflow has no store for
    config = tiny_train(steps=2, out_dir=str(tmp_path / "run"), mlflow=uri)
    with pytest.raises(ValueError, match=f"train.mlflow '{uri}': MLflow could not open"):
        train(tiny_model(), tiny_task(), config)
    assert not (tmp_path / "run" / "latest.json").exists()  # nothing trained


def test_names_and_settings_as_mlflow_takes_them():
    assert mlflow_name("eval/num_kv_pairs=2,seq_len=64") == "eval/num_kv_pairs_2_seq_len_64"
    assert mlflow_name("train/loss") == "train/loss"
    settings = {"train": {"lr": 0.001, "betas": [0.9, 0.95], "out_dir": None, "x": "a b"}}
    assert flat({**settings, "task": {"config": {"mix": [[1, 2]]}}}) == {
        "train.lr": "0.001",
        "train.betas": "[0.9, 0.95]",
        "train.out_dir": "null",
        "train.x": "a b",
        "task.config.mix": "[[1, 2]]",
    }
