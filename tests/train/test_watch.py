"""TensorBoard event files, the curves file and `seqlab plot`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.watch import CURVES, EVENTS, read_curves
from tests.train.conftest import tiny_model, tiny_task, tiny_train
from tests.train.test_trainer import Crash, crash_at

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(out, steps=30, **options):
    from seqlab.train.trainer import train

    config = tiny_train(steps=steps, eval_every=10, out_dir=str(out), **options)
    return train(tiny_model(), tiny_task(), config)


def test_a_run_writes_every_update_and_evaluation_to_tensorboard(tmp_path):
    result = run(tmp_path / "run")
    got = scalars(tmp_path / "run" / EVENTS)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 31))
    assert [s for s, _ in got["train/lr"]] == list(range(1, 31))
    assert [s for s, _ in got["eval/all"]] == [10, 20, 30]
    slices = {k for k in result.final if k != "all"}
    assert slices and all(f"eval/{k}" in got for k in slices)
    assert [v for _, v in got["eval/all"]] == pytest.approx(
        [h["metrics"]["all"] for h in result.history]
    )
    assert all(v > 0 for _, v in got["perf/tokens_per_s"])


def test_tensorboard_can_be_turned_off(tmp_path):
    run(tmp_path / "run", steps=10, tensorboard=False)
    assert not (tmp_path / "run" / EVENTS).exists()
    assert (tmp_path / "run" / CURVES).exists()


def test_a_resumed_run_reads_as_one_run(tmp_path, monkeypatch):
    reference = run(tmp_path / "ref")
    crash_at(monkeypatch, 25)
    with pytest.raises(Crash):
        run(tmp_path / "run")
    monkeypatch.undo()
    resumed = run(tmp_path / "run")
    assert resumed.resumed_from == 20
    got, want = scalars(tmp_path / "run" / EVENTS), scalars(tmp_path / "ref" / EVENTS)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 31))  # 21-24 not twice
    assert got["train/loss"] == want["train/loss"]
    assert got["eval/all"] == want["eval/all"]
    curves = read_curves(tmp_path / "run")["evaluations"]
    assert [e["step"] for e in curves] == [10, 20, 30]
    assert [e["metrics"] for e in curves] == [h["metrics"] for h in reference.history]
    walls = [e["wall_time_s"] for e in curves]
    assert walls == sorted(walls) and walls[0] > 0
    tokens = [e["tokens"] for e in curves]
    assert tokens[0] > 0 and tokens == [tokens[0] * k for k in (1, 2, 3)]
    steps = [e["train_time_s"] for e in curves]  # the steps' time, without evaluations
    assert 0 < steps[0] < steps[1] < steps[2]
    assert all(t <= w for t, w in zip(steps, walls, strict=True))


def test_the_run_record_keeps_the_whole_curve(tmp_path):
    from seqlab.train.results import run_record
    from seqlab.train.trainer import TrainConfig

    result = run(tmp_path / "run")
    record = run_record("mqar", tiny_task(), tiny_model(), TrainConfig(), result)
    curve = record["metrics"]["curve"]
    assert [e["step"] for e in curve] == [10, 20, 30]
    assert curve[-1]["metrics"] == result.final
    assert {"wall_time_s", "tokens", "train_loss", "lr", "grad_norm"} <= set(curve[0])


def test_plot_draws_several_runs_into_one_png(tmp_path):
    run(tmp_path / "a", steps=20)
    run(tmp_path / "b", steps=20, lr=1e-3)
    png = tmp_path / "curves.png"
    args = ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(png)]
    result = CliRunner().invoke(app, [*args, "--label", "lr 3e-3", "--label", "lr 1e-3"])
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_names_a_folder_without_curves(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "empty"), "--out", "x.png"])
    assert result.exit_code != 0
    # the terminal width wraps the message wherever the temporary path's length puts a space
    assert "empty/curves.json:nosuchfile" in "".join(result.output.split())


def test_plot_names_a_damaged_curves_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / CURVES).write_text(json.dumps({"evaluations": [{"step": 1}]}))
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "damaged curves file" in result.output.replace("\n", " ")
