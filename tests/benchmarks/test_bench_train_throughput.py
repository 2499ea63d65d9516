"""benchmarks/bench_train_throughput.py: its cases, the throughput it reads from a run's
curves.json, and one tiny real `seqlab train` case end to end (nothing asserts on speed)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import ROOT, load_script


def load():
    return load_script(ROOT / "benchmarks" / "bench_train_throughput.py")


def test_cases_cross_precision_and_mode_in_one_process_then_more_processes():
    bench = load()
    got = [c.name for c in bench.cases(["fp32", "bf16"], ["eager", "compile"], [1, 2])]
    assert got == [
        "fp32 · eager · 1 proc",
        "fp32 · compile · 1 proc",
        "bf16 · eager · 1 proc",
        "bf16 · compile · 1 proc",
        "fp32 · eager · 2 proc",
    ]


def test_throughput_leaves_the_warm_up_out(tmp_path):
    bench = load()
    points = [
        {"step": 10, "tokens": 1000, "train_time_s": 9.0, "train_loss": 3.0},
        {"step": 20, "tokens": 2000, "train_time_s": 10.0, "train_loss": 2.5},
        {"step": 30, "tokens": 3000, "train_time_s": 11.0, "train_loss": 2.0},
    ]
    (tmp_path / "curves.json").write_text(json.dumps({"evaluations": points}))
    got = bench.throughput(tmp_path, warmup=10)
    assert got["tokens_per_s"] == pytest.approx(2000 / 2.0)
    assert got["steps"] == 20 and got["first_steps_s"] == 9.0 and got["final_loss"] == 2.0
    with pytest.raises(ValueError, match="no evaluation after step 30"):
        bench.throughput(tmp_path, warmup=30)


# a tiny model and run for the real cases: 2 timed steps after 2 of warm-up, fp32
TINY = ["--arch", "gla,attn", "--d-model", "32", "--n-layers", "2", "--seq-len", "32"]
TINY += ["--batch-size", "4", "--steps", "4", "--warmup", "2", "--precisions", "fp32"]


def test_one_real_case_end_to_end(tmp_path):
    bench = load()
    out = tmp_path / "t.md"
    bench.main([*TINY, "--modes", "eager", "--procs", "1", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    (row,) = rows
    assert "failed" not in row, row
    assert row["steps"] == 2 and row["tokens"] == 2 * 4 * 32 and row["tokens_per_s"] > 0
    assert "| fp32 · eager · 1 proc |" in out.read_text()


def test_two_ddp_processes_count_the_global_batch(tmp_path):
    """The torchrun case launches (its flags are the CLI's) and counts every rank's tokens."""
    bench = load()
    out = tmp_path / "t.md"
    bench.main([*TINY, "--modes", "eager", "--procs", "2", "--threads", "2", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["fp32 · eager · 1 proc", "fp32 · eager · 2 proc"]
    for row in rows:
        assert "failed" not in row, row
        assert row["steps"] == 2 and row["tokens"] == 2 * 4 * 32
