import csv

import matplotlib.image
import pytest
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.probe import human_bytes, layers_for, probe
from seqlab.train.results import ResultsStore
from tests.train.conftest import TINY_MQAR, TINY_MQAR_ARGS, tiny_train


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1000, 4096, 65552, 3 * 2**20)] == [
        "0 B",
        "1000 B",
        "4 KiB",
        "64 KiB",
        "3 MiB",
    ]


def test_layers_for():
    assert layers_for("gdn", None) == 2
    assert layers_for("gdn*3,attn", None) == 4
    assert layers_for("gdn,attn,gla", None) == 3
    assert layers_for("gdn", 5) == 5


def test_probe_gives_every_arch_the_same_budget(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    seen = []
    rows = probe(
        "mqar",
        ["attn", "gla"],
        task_options=TINY_MQAR,
        d_model=16,
        train_config=tiny_train(steps=6, eval_every=3, out_dir=str(tmp_path / "ignored")),
        store=store,
        on_result=lambda row: seen.append(row.arch),
    )
    assert seen == [r.arch for r in rows] == ["attn", "gla"]
    assert [r.result.step for r in rows] == [6, 6]
    assert not (tmp_path / "ignored").exists()
    # Attention's KV cache grows with T; GLA's state does not.
    assert rows[0].state_bytes > rows[1].state_bytes > 0
    records = store.runs(where={"tags.probe": "mqar"})
    assert [r["id"] for r in records] == [r.run_id for r in rows]
    assert [r["cost"]["state_bytes"] for r in records] == [r.state_bytes for r in rows]
    with pytest.raises(ValueError, match="at least one"):
        probe("mqar", [])


def test_probe_command_prints_a_table_and_writes_png_csv_and_runs(tmp_path, results_path):
    out = tmp_path / "probe"
    task_options = [arg for option in TINY_MQAR_ARGS for arg in ("--task-option", option)]
    args = ["probe", "--task", "mqar", *task_options, "--arch", "attn", "--arch", "gdn*1,gla"]
    args += ["--steps", "4", "--d-model", "16", "--batch-size", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("probe · mqar", "num_kv_pairs=4,seq_len=16", "state bytes", "gdn*1,gla"):
        assert text in result.output
    image = matplotlib.image.imread(out / "probe-mqar.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    rows = list(csv.DictReader((out / "probe-mqar.csv").open()))
    assert [(r["arch"], r["n_layers"]) for r in rows] == [("attn", "2"), ("gdn*1,gla", "2")]
    assert all(0 <= float(r["all"]) <= 1 and int(r["state_bytes"]) > 0 for r in rows)
    records = ResultsStore(results_path).runs()
    assert [r["model"]["pattern"] for r in records] == ["attn", "gdn*1,gla"]
    assert all(r["train"]["steps"] == 4 and r["task"]["preset"] == "cpu" for r in records)


def test_probe_command_exits_1_and_says_so_when_a_run_diverged(tmp_path):
    out = tmp_path / "probe"
    task_options = [arg for option in TINY_MQAR_ARGS for arg in ("--task-option", option)]
    args = ["probe", "--task", "mqar", *task_options, "--arch", "gla", "--arch", "attn"]
    args += ["--steps", "6", "--d-model", "16", "--batch-size", "8", "--lr", "1e6"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-record"])
    assert result.exit_code == 1, result.output
    assert "gla:" in result.output and "non-finite" in result.output.lower()
    rows = list(csv.DictReader((out / "probe-mqar.csv").open()))
    assert [r["stop_reason"] for r in rows] == ["non_finite", "non_finite"]


def test_probe_command_reports_bad_input(tmp_path):
    args = ["probe", "--task", "nope", "--arch", "attn", "--steps", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output


def test_probe_without_a_terminal_prints_a_line_per_evaluation(capsys):
    config = tiny_train(steps=4, eval_every=2, progress=True)
    probe("mqar", ["attn", "gla"], task_options=TINY_MQAR, d_model=16, train_config=config)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" · ")[0] for line in lines] == [
        "[attn] step 2/4",
        "[attn] step 4/4",
        "[gla] step 2/4",
        "[gla] step 4/4",
    ]
    assert all("loss" in line and "all" in line and "ETA" in line for line in lines)
