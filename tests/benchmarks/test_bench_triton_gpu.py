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
import time
from pathlib import Path

import pytest
import torch

from tests.benchmarks.scripts import ROOT, load_script, script_env

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton ships for Linux only (the test extra)", allow_module_level=True)

SCRIPT = ROOT / "benchmarks" / "bench_triton_gpu.py"
GPU_RUN = ROOT / "benchmarks" / "gpu_run.sh"
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


# Runs the script with the last element of each o row from torch.empty, as a kernel that never
# writes it would leave it.
UNWRITTEN = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
run_op = bench.run_op

def unwritten(op, x, backend, **kw):
    o, s = run_op(op, x, backend, **kw)
    if backend == "triton":
        out = torch.empty_like(o)
        out[..., :-1] = o[..., :-1]
        o = out
    return o, s

bench.run_op = unwritten
bench.main(sys.argv[2:])
"""


def load_bench():
    return load_script(SCRIPT)


def run(args, interpret=True, code=None) -> subprocess.CompletedProcess:
    env = script_env(interpret)
    cmd = [sys.executable, str(SCRIPT)] if code is None else [sys.executable, "-c", code]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def results(out: Path) -> tuple[dict, str]:
    return json.loads((out / "triton_gpu.json").read_text()), (out / "triton_gpu.md").read_text()


def smoke_run(tmp_path, extra_env=None) -> subprocess.CompletedProcess:
    """benchmarks/gpu_run.sh in its CPU smoke mode (TINY-like shapes, fp32 here and fp16 in a
    background process)."""
    env = script_env(interpret=False) | {"SMOKE": "1", "PYTHON": sys.executable}
    env |= {"DEST": str(tmp_path)} | (extra_env or {})
    return subprocess.run(
        ["bash", str(GPU_RUN)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_gpu_run_smoke_every_section_end_to_end(tmp_path):
    r = smoke_run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bench = load_bench()
    data, md = results(tmp_path)
    assert data["complete"] is True and "stopped" not in data
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "env.txt", "run.log", "triton_gpu.json", "triton_gpu.md"
    ]  # fmt: skip
    env = (tmp_path / "env.txt").read_text()
    assert "command: SMOKE=1 LIMIT=420" in env and "--check-dtypes fp32,fp16" in env
    assert "wall: " in env and "exit 0" in env
    meta = data["meta"]
    assert meta["bw"] > 0 and "measured in this run" in meta["bw_source"]
    assert isinstance(meta["seed"], int) and meta["check_dtypes"] == ["fp32", "fp16"]
    # first calls: seqlab's, here (no fla on CI)
    assert [(f["op"], f["impl"]) for f in data["first_call"]] == [
        ("simple_gla", "seqlab"), ("gla", "seqlab"), ("gated_delta", "seqlab")
    ]  # fmt: skip
    for f in data["first_call"]:
        assert (
            f["fwd_s"] > 0
            and f["bwd_s"] > 0
            and f["total_s"] == pytest.approx(f["fwd_s"] + f["bwd_s"])
        )
    # every case in both dtypes; fp16's came from the background process
    names = [c.name for c in bench.check_cases(bench.OPS)]
    got = [(c["case"], c["dtype"]) for c in data["checks"]]
    assert got == [(n, "fp32") for n in names] + [(n, "fp16") for n in names]
    assert all(c["ok"] == "yes" and c["impl"] == "seqlab" for c in data["checks"]), data["checks"]
    [bg] = data["background"]
    assert bg["job"] == "check fp16" and bg["rc"] == 0 and bg["cut"] is False
    rows = {(c["case"], c["dtype"]): c for c in data["checks"]}
    full = rows["gated_delta", "fp32"]
    assert {"o", "state", "dq", "dk", "dv", "dg", "dbeta", "dh0"} <= full.keys()
    assert (full["B"], full["T"]) == (1, 40) and full["tol"] == 1e-4
    decode = rows["gla decode", "fp16"]
    assert (decode["B"], decode["T"]) == (8, 1) and "dq" not in decode and "state" in decode
    assert (rows["gla packed", "fp32"]["B"], rows["gla packed", "fp32"]["T"]) == (1, 40)
    rows = {(r["op"], r["pass"], r["B"]): r for r in data["training"]}
    assert len(rows) == len(data["training"]) == 12  # 3 ops, 2 passes, shapes 1x64 and 2x32
    for op in bench.OPS:
        for pass_ in bench.PASSES:
            row = rows[op, pass_, 1]
            assert (row["B"], row["T"]) == (1, 64)
            assert row["seqlab_ms"] > 0 and row["sdpa_ms"] > 0 and row["seqlab_first_s"] > 0
            assert row["seqlab_peak_gib"] is None  # not measured on a CPU
            assert row["seqlab_bw_frac"] > 0 and row["sdpa_bw_frac"] > 0
            assert not [k for k in row if k.endswith("error")], row
    decode = {(r["op"], r["context"], r["impl"]): r for r in data["decode"]}
    for ctx in (16, 64):
        for op in ("simple_gla", "gated_delta"):
            for impl in ("seqlab op", "seqlab kernel"):
                assert decode[op, ctx, impl]["ms"] > 0, decode[op, ctx, impl]
        assert decode["attention", ctx, "sdpa kv-cache"]["ms"] > 0
    assert len(decode) == len(data["decode"]) == 10
    profile = {(p["op"], p["pass"], p["impl"]): p for p in data["profile"]}
    assert len(profile) == len(data["profile"]) == 6  # seqlab only: no fla
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
    assert "- correctness, seqlab (fp16, fp32): 34 of 34 pass" in md
    assert "| gated_delta neg-eig decode | seqlab | fp16 | 8 | 1 |" in md
    # the markdown on stdout, then the summary last
    assert md in r.stdout and r.stdout.rstrip().endswith(bench.summary(data).rstrip())


def test_gpu_run_refuses_bad_settings(tmp_path):
    r = smoke_run(tmp_path, {"LIMIT": "7m"})
    assert r.returncode == 2 and "LIMIT must be a whole number, got '7m'" in r.stderr
    r = smoke_run(tmp_path, {"LIMIT": "100", "BG_LIMIT": "200"})
    assert r.returncode == 2 and "BG_LIMIT (200) must not exceed LIMIT (100)" in r.stderr
    assert not list(tmp_path.iterdir())


def test_time_limit_ends_the_run_normally(tmp_path):
    r = run([*TINY, "--time-limit", "0", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    data, md = results(tmp_path)
    assert data["complete"] is True
    assert data["stopped"] == "time limit 0 s reached before first call seqlab simple_gla"
    for section in ("first_call", "checks", "training", "decode", "profile"):
        assert data[section] == [], section
    assert "background" not in data  # none started once out of time
    assert not md.startswith("(partial run)") and "Stopped: time limit 0 s" in md


def test_check_failure_stops_before_timing(tmp_path):
    # 0.1 % off in o: ten times the float32 tolerance
    args = [*TINY, "--ops", "simple_gla", "--sections", "check,training", "--out", str(tmp_path)]
    r = run([str(SCRIPT), "1.001", *args], code=SKEWED)
    assert r.returncode == 1 and "differs from the PyTorch chunk form" in r.stderr
    data, _ = results(tmp_path)
    assert data["complete"] is True and "no timings taken" in data["stopped"]
    checks = data["checks"]
    assert [c["case"] for c in checks] == [
        "simple_gla", "simple_gla strong", "simple_gla packed", "simple_gla decode",
        "simple_gla recurrent packed",
    ]  # fmt: skip
    # o is off everywhere; with it every gradient (dO is off too); the final state is not
    assert checks[0]["ok"] == "NO: o, dq, dk, dv, dg, dh0 > 0.0001"
    assert checks[3]["ok"] == "NO: o > 0.0001" and float(checks[3]["state"]) < 1e-4
    assert all(c["ok"].startswith("NO: o") for c in checks)
    assert data["training"] == []


def test_unwritten_output_elements_fail_the_check(tmp_path):
    """An op that leaves the last element of each o row unwritten (torch.empty) fails: the check
    poisons fresh memory with NaN. Off the poisoned path, empty memory could hold anything,
    plausible values included."""
    args = [*TINY, "--ops", "gla", "--sections", "check", "--out", str(tmp_path)]
    r = run([str(SCRIPT), *args], code=UNWRITTEN)
    assert r.returncode == 1, r.stderr
    data, _ = results(tmp_path)
    for c in data["checks"]:
        assert c["o"] == "nan" and c["ok"].startswith("NO: o"), c


def test_poisoned_fills_fresh_memory_with_nan_and_restores_the_mode():
    bench = load_bench()
    assert not torch.are_deterministic_algorithms_enabled()
    with bench.poisoned():
        assert torch.empty(5).isnan().all() and torch.empty_like(torch.ones(3, 2)).isnan().all()
        assert (torch.empty(3, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert not torch.are_deterministic_algorithms_enabled()


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
        "device": "cpu", "torch": "t", "triton": "3.6.0", "python": "3.11", "fla": None,
        "dtype": "fp32", "heads": 2, "head_dim": 16, "check_shape": [1, 40], "repeats": 1,
        "bw": 1e12, "date": "today", "time_limit_s": None,
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
        (["--dtype", "fp32", "--check-dtypes", "fp32,bf16"], "computes tl.dot on bfloat16"),
        (["--dtype", "fp32", "--check-dtypes", "fp8"], "unknown fp8; choose from bf16"),
        (["--dtype", "fp32", "--input-sets", "0"], "--input-sets must be at least 1, got 0"),
        (["--dtype", "fp32", "--shapes", "0x64"], "B and T must be at least 1"),
        (["--dtype", "fp32", "--tests-workers", "-2"], "--tests-workers must be 0 or more"),
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
    assert args.check_dtypes == ["fp32"] and args.background_limit is None and not args.serial
    args = load_bench().parse_args(
        [*TINY, "--check-dtypes", "fp16,fp32,fp16", "--time-limit", "100", "--out", "x"]
    )
    assert args.check_dtypes == ["fp16", "fp32"] and args.background_limit == pytest.approx(55)


def test_bandwidth_joins_a_kernels_bytes_to_its_time():
    bench = load_bench()
    rows = [{"kernel": "chunk_fwd_h_kernel", "us": 100.0}, {"kernel": "aten::copy_", "us": 5.0}]
    # 335 MB in 100 µs is 3.35 TB/s: the whole of an H100's bandwidth
    out = bench.with_bandwidth(rows, {"chunk_fwd_h_kernel": 335e6}, bw=3.35e12)
    assert out[0]["gbps"] == 3350.0 and abs(out[0]["bw_frac"] - 1.0) < 1e-12
    assert "bw_frac" not in out[1] and "bw_frac" not in rows[0]  # rows themselves untouched


def test_check_cases_cover_every_family_and_layout():
    bench = load_bench()
    cases = {c.name: c for c in bench.check_cases(bench.OPS)}
    for op in bench.OPS:
        for suffix in ("", " strong", " packed", " decode", " recurrent packed"):
            assert cases[op + suffix].op == op
    assert cases["gated_delta neg-eig"].neg_eig and cases["gated_delta neg-eig decode"].decode
    assert not any(c.neg_eig for c in cases.values() if c.op != "gated_delta")
    assert {c.form for c in cases.values() if c.grad} == {"chunk"}
    assert all(c.form == "recurrent" for c in cases.values() if c.decode)
    assert len(cases) == 17


@pytest.mark.parametrize("total", [1, 2, 40, 65, 103, 4000])
def test_packed_offsets_split_every_token_once(total):
    cu = load_bench().packed_offsets(total)
    assert cu[0] == 0 and cu[-1] == total
    assert all(b > a for a, b in zip(cu, cu[1:], strict=False)), cu
    if total >= 103:
        assert [b - a for a, b in zip(cu[:4], cu[1:4], strict=False)] == [1, 64, 37]


def test_summary_counts_the_shapes_that_meet_the_target():
    bench = load_bench()
    meta = {"device": "GPU", "dtype": "bf16", "bw": 4.3e12, "contexts": [1024]}
    training = [
        {"op": "gla", "pass": "fwd", "B": 8, "T": 2048, "seqlab_over_fla": 0.5},
        {"op": "gla", "pass": "fwd", "B": 1, "T": 32768, "seqlab_over_fla": 0.9},
        {"op": "gla", "pass": "fwd+bwd", "B": 8, "T": 2048},  # fla failed: no ratio
    ]
    checks = [
        {"case": "gla", "impl": "seqlab", "dtype": "bf16", "ok": "yes"},
        {"case": "gla strong", "impl": "seqlab", "dtype": "fp32", "ok": "NO: dg > 0.0001"},
        {"case": "gla", "impl": "fla", "dtype": "bf16", "ok": "yes"},
    ]
    data = {"meta": meta, "checks": checks, "first_call": [], "training": training, "decode": []}
    text = bench.summary(data)
    assert "| gla | fwd | 0.50 | 0.90 | 1 of 2 |" in text
    assert "| gla | fwd+bwd | – | – | – |" in text
    assert (
        "- correctness, seqlab (bf16, fp32): 1 of 2 pass; failing: gla strong fp32 NO: dg" in text
    )
    assert "- correctness, fla (bf16): 1 of 1 pass" in text


def test_background_jobs_cut_at_the_deadline_leave_a_row(tmp_path):
    """A background first call that outlives the deadline is ended (its whole process group)
    and recorded as cut, not dropped."""
    bench = load_bench()
    bg = bench.Background()
    sleeper = [sys.executable, "-c", "import time; print('compiling', flush=True); time.sleep(60)"]
    bg.start("fla first call gla", sleeper, tmp_path / "gla.log", tmp_path / "none.json")
    bg.start("check fp16", [sys.executable, "-c", "print('done')"], tmp_path / "fp16.log")
    meta = {"time_limit_s": None}
    report = bench.Report(tmp_path / "out", meta, bench.CompileLog(), deadline=None)
    report.save = lambda complete=False: None  # the markdown needs a full meta
    bench.finish_background(bg, report, deadline=time.perf_counter() + 2)
    gla, fp16 = report.data["background"]
    assert gla["cut"] is True and gla["rc"] is not None and gla["last_line"] == "compiling"
    assert fp16 == fp16 | {"cut": False, "rc": 0, "last_line": "done"}
    [row] = report.data["first_call"]
    assert row["op"] == "gla" and row["impl"] == "fla"
    assert row["error"].startswith("cut at the background limit after ")
