"""benchmarks/bench_triton_gpu.py on a CPU under Triton's interpreter, at tiny shapes, so a GPU
session (scarce, 10-minute commands) does not find the script's bugs: every section end to end,
the time limit, the partial files a killed run leaves, and a check that fails when Triton and
PyTorch disagree. Nothing asserts on speed.

The script runs in subprocesses, each with its own Triton: with TRITON_INTERPRET=1, or without
it to see the script refuse.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks.scripts import ROOT, script_env

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton ships for Linux only (the test extra)", allow_module_level=True)

SCRIPT = ROOT / "benchmarks" / "bench_triton_gpu.py"
TINY = ["--device", "cpu", "--dtype", "fp32", "--heads", "2", "--head-dim", "16"]
TINY += ["--shapes", "1x64", "--check-shape", "1x40", "--contexts", "16,64"]
TINY += ["--profile-shape", "1x32", "--profile-calls", "1"]
TINY += ["--decode-batches", "1", "--repeats", "1", "--no-fla"]
TRAINING_HEADER = "| op | B | T | pass | seqlab ms | fla ms | seqlab / fla | SDPA ms |"

# Runs the script with seqlab's Triton op output (and so its gradients) off by a factor.
SKEWED = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = sys.modules["bench"] = importlib.util.module_from_spec(spec)  # for its dataclass
spec.loader.exec_module(bench)
run_op = bench.run_op

def skewed(op, x, backend, **kw):
    o, s = run_op(op, x, backend, **kw)
    return (o * float(sys.argv[2]) if backend == "triton" else o), s

bench.run_op = skewed
bench.main(sys.argv[3:])
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_triton_gpu", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for its dataclass
    spec.loader.exec_module(module)
    return module


def run(args, interpret=True, code=None) -> subprocess.CompletedProcess:
    env = script_env(interpret)
    cmd = [sys.executable, str(SCRIPT)] if code is None else [sys.executable, "-c", code]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def results(out: Path) -> tuple[dict, str]:
    return json.loads((out / "triton_gpu.json").read_text()), (out / "triton_gpu.md").read_text()


def test_every_section_end_to_end(tmp_path):
    r = run([*TINY, "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    data, md = results(tmp_path)
    assert data["complete"] is True and "stopped" not in data
    assert [c["op"] for c in data["checks"]] == ["simple_gla", "gla", "gated_delta"]
    assert all(c["ok"] == "yes" for c in data["checks"]), data["checks"]
    assert {"o", "state", "dq", "dk", "dv", "dg"} <= data["checks"][0].keys()
    assert "dbeta" in data["checks"][2]
    rows = {(r["op"], r["pass"]): r for r in data["training"]}
    assert len(rows) == len(data["training"]) == 6
    for op in ("simple_gla", "gla", "gated_delta"):
        for pass_ in ("fwd", "fwd+bwd"):
            row = rows[op, pass_]
            assert (row["B"], row["T"]) == (1, 64)
            assert row["seqlab_ms"] > 0 and row["sdpa_ms"] > 0 and row["seqlab_first_s"] > 0
            assert row["seqlab_peak_gib"] is None  # not measured on a CPU
            assert not [k for k in row if k.endswith("error")], row
    decode = {(r["op"], r["context"], r["impl"]): r for r in data["decode"]}
    for ctx in (16, 64):
        for op in ("simple_gla", "gated_delta"):
            for impl in ("seqlab op", "seqlab kernel"):
                assert decode[op, ctx, impl]["ms"] > 0, decode[op, ctx, impl]
        assert decode["attention", ctx, "sdpa kv-cache"]["ms"] > 0
    assert len(decode) == len(data["decode"]) == 10
    profile = {(p["op"], p["pass"], p["impl"]): p for p in data["profile"]}
    assert len(profile) == len(data["profile"]) == 6  # seqlab only: --no-fla
    for p in profile.values():
        assert (p["B"], p["T"]) == (1, 32) and not p.get("error"), p
        us = [k["us"] for k in p["kernels"]]
        assert us == sorted(us, reverse=True) and 0 < sum(us) <= p["total_us"] + 1e-6, p
        # every launch's tensor arguments, per call: the output kernel reads q, k, v and writes o
        moved = p["launch_bytes"]
        assert moved["chunk_fwd_o_kernel"] >= 4 * 1 * 32 * 2 * 16 * 4, moved  # fp32 [1, 32, 2, 16]
        if p["op"] == "gated_delta":
            assert {"wy_fwd_kernel", "chunk_fwd_h_kernel"} <= moved.keys(), moved
        if p["pass"] == "fwd+bwd":
            assert "chunk_bwd_dqk_kernel" in moved, moved
    assert "Kernels (torch.profiler, B=1, T=32" in md
    assert not md.startswith("(partial run)")
    assert TRAINING_HEADER in md and "| op | B | context | impl | µs | BW |" in md
    assert "| gated_delta | 1 | 64 | fwd+bwd |" in md
    assert md in r.stdout


def test_time_limit_ends_the_run_normally(tmp_path):
    r = run([*TINY, "--time-limit", "0", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    data, md = results(tmp_path)
    assert data["complete"] is True
    assert data["stopped"] == "time limit 0 s reached before check simple_gla"
    assert data["checks"] == data["training"] == data["decode"] == data["profile"] == []
    assert not md.startswith("(partial run)") and "Stopped: time limit 0 s" in md


def test_check_failure_stops_before_timing(tmp_path):
    # 0.1 % off in o: ten times the float32 tolerance
    args = [*TINY, "--ops", "simple_gla", "--sections", "check,training", "--out", str(tmp_path)]
    r = run([str(SCRIPT), "1.001", *args], code=SKEWED)
    assert r.returncode == 1 and "differs from the PyTorch chunk form" in r.stderr
    data, _ = results(tmp_path)
    assert data["complete"] is True and "no timings taken" in data["stopped"]
    [check] = data["checks"]
    assert check["ok"].startswith("NO: o, ") and check["ok"].endswith("> 0.0001")
    assert data["training"] == []


def test_cpu_needs_the_interpreter(tmp_path):
    r = run([*TINY, "--out", str(tmp_path)], interpret=False)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr
    assert not (tmp_path / "triton_gpu.json").exists()


def test_compare_flags_the_tensors_beyond_tolerance():
    bench = load_bench()
    tol = bench.TOL[torch.float32]
    gen = torch.Generator().manual_seed(0)
    ref = {
        n: 1e3 * torch.randn(4, 8, generator=gen, dtype=torch.float64)
        for n in ("o", "state", "dq", "dg")
    }

    def off(name, by):
        """ref with one element of `name` moved by `by` x max |ref[name]|."""
        t = ref[name].clone()
        t[1, 2] += by * t.abs().max()
        return {**ref, name: t}

    errs, ok = bench.compare(off("dq", 0.5 * tol), ref, tol)
    assert ok == "yes" and errs["dq"] == pytest.approx(0.5 * tol) and errs["o"] == 0
    errs, ok = bench.compare(off("dq", 2 * tol), ref, tol)
    assert ok == "NO: dq > 0.0001" and errs["dq"] == pytest.approx(2 * tol)
    _, ok = bench.compare(off("state", -3 * tol) | {"dg": off("dg", 5 * tol)["dg"]}, ref, tol)
    assert ok == "NO: state, dg > 0.0001"
    _, ok = bench.compare(off("o", float("nan")), ref, tol)
    assert ok == "NO: o > 0.0001"


def test_partial_files_until_complete(tmp_path):
    bench = load_bench()
    meta = {
        "device": "cpu", "torch": "t", "triton": "3.6.0", "fla": None, "dtype": "fp32",
        "heads": 2, "head_dim": 16, "check_shape": [1, 40], "repeats": 1, "bw": 1e12,
        "date": "today", "time_limit_s": None,
    }  # fmt: skip
    report = bench.Report(tmp_path / "out", meta, bench.CompileLog(), deadline=None)
    row = {"op": "gla", "B": 1, "T": 64, "pass": "fwd", "seqlab_ms": 1.0, "sdpa_ms": 2.0}
    report.add("training", row)
    data, md = results(tmp_path / "out")
    assert data["complete"] is False and data["training"] == [row]
    assert md.startswith("(partial run)\n") and TRAINING_HEADER in md
    assert not report.stopped("anything")
    report.save(complete=True)
    data, md = results(tmp_path / "out")
    assert data["complete"] is True and not md.startswith("(partial run)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "triton_gpu.json",
        "triton_gpu.md",
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "computes tl.dot on bfloat16 wrongly"),
        (["--dtype", "fp32", "--ops", "gla,mamba"], "unknown mamba"),
        (["--dtype", "fp32", "--shapes", "1x64,2x"], "expected BxT"),
        (["--dtype", "fp32", "--passes", "bwd"], "choose from fwd, fwd+bwd"),
    ],
)
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit):
        load_bench().parse_args(["--device", "cpu", "--out", "x", *args])
    assert message in capsys.readouterr().err


def test_arguments():
    args = load_bench().parse_args(
        [*TINY, "--ops", "gated_delta,gla", "--sections", "decode,check", "--out", "x"]
    )
    assert args.ops == ["gla", "gated_delta"] and args.sections == ["check", "decode"]
    assert args.shapes == [(1, 64)] and args.check_shape == (1, 40) and args.contexts == [16, 64]
    assert args.passes == ("fwd", "fwd+bwd") and args.time_limit is None


def test_bandwidth_joins_a_kernels_bytes_to_its_time():
    bench = load_bench()
    rows = [{"kernel": "chunk_fwd_h_kernel", "us": 100.0}, {"kernel": "aten::copy_", "us": 5.0}]
    # 335 MB in 100 µs is 3.35 TB/s: the whole of an H100's bandwidth
    out = bench.with_bandwidth(rows, {"chunk_fwd_h_kernel": 335e6}, bw=3.35e12)
    assert out[0]["gbps"] == 3350.0 and abs(out[0]["bw_frac"] - 1.0) < 1e-12
    assert "bw_frac" not in out[1] and "bw_frac" not in rows[0]  # rows themselves untouched
