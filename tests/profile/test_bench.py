"""`seqlab bench`: argument parsing and errors, slope fitting, the skip budget, and the command
end to end on a tiny config (JSON keys, markdown, PNGs). Nothing asserts on speed."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.profile.bench import (
    MODEL_PASSES,
    BenchConfig,
    _Budget,
    command_line,
    fit_slope,
    parse_device,
    parse_dtype,
    parse_seq_lens,
    run_bench,
)
from seqlab.profile.report import markdown_report

TINY = ["--d-model", "16", "--n-layers", "2", "--repeats", "1", "--warmup", "0"]
TINY += ["--decode-repeats", "1", "--threads", "1"]
GDN = "gdn(num_heads=2, head_dim=8)"


@pytest.mark.parametrize(
    "text,lens",
    [
        ("512,2k,8k,32k", (512, 2048, 8192, 32768)),
        (" 1K , 512,1k", (512, 1024)),
        ("1m", (1024**2,)),
        ("3", (3,)),
    ],
)
def test_parse_seq_lens(text, lens):
    assert parse_seq_lens(text) == lens


@pytest.mark.parametrize("text", ["", "0", "-5", "2x", "1.5k", "512,,1k", "k"])
def test_parse_seq_lens_rejects(text):
    with pytest.raises(ValueError, match="bad sequence length"):
        parse_seq_lens(text)


def test_parse_dtype_and_device():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'f8'; valid: float32"):
        parse_dtype("f8")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="bad device"):
        parse_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_device("cuda")


def test_fit_slope_recovers_a_power_law():
    xs = [2**k for k in range(9, 16)]
    fit = fit_slope(xs, [3.0 * x**1.7 for x in xs])
    assert fit["slope"] == pytest.approx(1.7) and fit["last_slope"] == pytest.approx(1.7)
    assert fit["coefficient"] == pytest.approx(3.0) and fit["points"] == 7


def test_fit_slope_sees_attention_turn_quadratic():
    """a·T + b·T²: between 1 and 2 overall, close to 2 between the longest lengths."""
    xs = [2**k for k in range(9, 16)]
    fit = fit_slope(xs, [1000.0 * x + x * x for x in xs])
    assert 1.2 < fit["slope"] < 1.9
    assert fit["last_slope"] == pytest.approx(math.log2((1000 + 2**15) / (1000 + 2**14)) + 1)
    assert fit["last_slope"] > 1.9


def test_fit_slope_under_noise_and_gaps():
    rng = random.Random(0)
    xs = [2**k for k in range(9, 16)]
    ys = [x * rng.uniform(0.95, 1.05) for x in xs]
    assert fit_slope(xs, ys)["slope"] == pytest.approx(1.0, abs=0.05)
    ys[3] = None  # a skipped measurement is left out
    assert fit_slope(xs, ys)["points"] == 6
    assert fit_slope(xs[:2], [1.0, None]) is None


def test_budget_skips_by_predicted_time_and_memory():
    budget = _Budget(max_seconds=30, max_bytes=150)
    assert budget.check("a", 512, work=1, calls=10, extra_s=0) is None  # nothing to predict from
    budget.record("a", 512, work=1, seconds=1.0, peak=10)
    assert budget.check("a", 1024, work=2, calls=10, extra_s=0) is None  # 20 s
    reason = budget.check("a", 1024, work=4, calls=10, extra_s=0)
    assert reason == "predicted 40 s > max 30 s (at T = 1024)"
    assert budget.check("a", 2048, work=1, calls=1, extra_s=0) == reason  # longer: skipped too
    budget.record("b", 512, work=1, seconds=0.1, peak=100)
    assert "GiB > max" in budget.check("b", 1024, work=1, calls=1, extra_s=0)


def test_config_names_the_bad_arch():
    with pytest.raises(ValueError, match="arch 'foo'.*unknown mixer 'foo'"):
        BenchConfig.make(archs=("attn", "foo"))
    with pytest.raises(ValueError, match="arch 'gdn\\*3,attn'.*not a multiple"):
        BenchConfig.make(archs=("gdn*3,attn",), n_layers=2)
    with pytest.raises(ValueError, match="unknown option"):
        BenchConfig.make(seq_len=(4,))


def test_command_line_names_what_differs_from_the_defaults():
    config = BenchConfig.make(archs=("attn", "gdn*3,attn"), seq_lens=(512, 1024), threads=1)
    assert command_line(config, "out") == (
        "seqlab bench --arch attn --arch 'gdn*3,attn' --seq-lens 512,1024 --threads 1 --out out"
    )
    config = BenchConfig.make(channel=None, seed=3, dtype="bf16")
    assert "--channel '' --dtype bf16 --seed 3" in command_line(config, "out")


def test_longer_lengths_are_skipped_with_a_reason():
    config = BenchConfig.make(
        archs=("attn",), seq_lens=(8, 16, 32), d_model=16, n_layers=1, level="model",
        repeats=1, warmup=0, decode_repeats=1, max_seconds=1e-9,
    )  # fmt: skip
    model = run_bench(config)["models"][0]
    first, second, third = model["points"]
    assert "median_s" in first["forward"] and "peak_bytes" in first["forward"]
    assert second["forward"]["skipped"].startswith("predicted")
    assert third["forward"]["skipped"] == second["forward"]["skipped"]
    assert model["fits"]["forward"] is None  # one measured point is no slope


def test_bench_command_end_to_end(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--arch", "attn", "--arch", GDN, "--seq-lens", "16,32", *TINY]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Models" in result.output and "Core ops vs peers" in result.output

    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "seqlab.bench/1"
    assert data["command"].startswith("seqlab bench --arch attn --arch")
    assert {"settings", "machine", "memory_method", "peers", "models", "ops"} <= set(data)
    assert data["settings"]["seq_lens"] == [16, 32] and data["peers"]["fla"].startswith("unav")
    assert [m["arch"] for m in data["models"]] == ["attn", GDN]
    for model in data["models"]:
        assert model["params"] > 0 and set(model["fits"]) == {
            "forward",
            "forward_backward",
            "decode",
        }
        assert model["fits"]["forward"]["points"] == 2
        for point in model["points"]:
            assert {"seq_len", "analytic", "forward", "forward_backward", "decode"} <= set(point)
            assert {"median_s", "q1_s", "q3_s", "first_call_s", "peak_bytes"} <= set(
                point["forward"]
            )
            assert point["decode"]["state_bytes"] == point["analytic"]["state_bytes"]
            assert point["prefill_tokens_per_s"] > 0
    assert [op["op"].split()[0] for op in data["ops"]] == ["attention", "delta_rule/gated"]
    assert [op["seqlab_backend"] for op in data["ops"]] == ["sdpa", "torch"]  # CPU: no Triton
    for op in data["ops"]:
        assert op["impls"] == ["seqlab", "sdpa"]
        for point in op["points"]:
            assert set(point["ratios"]["sdpa"]) == {"forward", "forward_backward"}

    markdown = (out / "results.md").read_text()
    assert "| arch | params | T |" in markdown and "seqlab/sdpa" in markdown
    assert "seqlab delta_rule/gated H=2 K=8 V=16 C=64 runs on torch" in markdown
    for name in ("time", "decode", "state", "ops"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seq-lens", "12x"], "bad sequence length '12x'"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--arch", "foo"], "arch 'foo'"),
        (["--dtype", "f8"], "unknown dtype"),
        (["--level", "ops"], "level"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_bench_command_rejects_bad_arguments(args, message, tmp_path):
    result = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert not list(tmp_path.iterdir())


def test_budget_stops_at_the_time_limit():
    now = [0.0]
    budget = _Budget(max_seconds=30, max_bytes=None, time_limit=10, clock=lambda: now[0])
    assert budget.check("a", 512, work=1, calls=4, extra_s=0) is None
    budget.record("a", 512, work=1, seconds=1.0, peak=None)
    now[0] = 5.0
    assert budget.check("a", 1024, work=1, calls=4, extra_s=0) is None  # 4 s of 5 s left
    reason = budget.check("a", 1024, work=2, calls=4, extra_s=0)
    assert reason == "predicted 8 s > 5 s left of the time limit (at T = 1024)"
    assert budget.check("b", 512, work=1, calls=4, extra_s=0) is None and budget.stopped is None
    now[0] = 10.0
    stopped = "the run's time limit (10 s) passed"
    assert budget.check("b", 512, work=1, calls=4, extra_s=0) == stopped == budget.stopped
    assert budget.check("c", 8, work=1, calls=1, extra_s=0) == stopped


def tiny_config(**changes) -> BenchConfig:
    options = dict(
        archs=("attn", GDN), seq_lens=(8, 16), d_model=16, n_layers=2, repeats=1, warmup=0,
        decode_repeats=1, threads=1,
    )  # fmt: skip
    return BenchConfig.make(**{**options, **changes})


def test_progress_sees_every_measured_length_and_completion():
    seen = []
    result = run_bench(
        tiny_config(),
        progress=lambda r: seen.append((r["complete"], len(r["models"]), len(r["ops"]))),
    )
    # 2 archs x 2 lengths, then 2 ops x 2 lengths; complete only in the returned result
    assert seen == [(False, 1, 0), (False, 1, 0), (False, 2, 0), (False, 2, 0)] + [
        (False, 2, 1), (False, 2, 1), (False, 2, 2), (False, 2, 2)
    ]  # fmt: skip
    assert result["complete"] is True and "stopped" not in result
    assert [len(m["points"]) for m in result["models"] + result["ops"]] == [2, 2, 2, 2]


def test_time_limit_stops_the_run_with_a_reason():
    result = run_bench(tiny_config(time_limit=1e-9))
    assert result["complete"] is True
    assert result["stopped"] == "the run's time limit (1e-09 s) passed"
    for model in result["models"]:
        for point in model["points"]:
            assert all(point[p] == {"skipped": result["stopped"]} for p in MODEL_PASSES)
    assert "stopped early: the run's time limit" in markdown_report(result)


def test_a_run_that_dies_keeps_what_it_measured(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr("seqlab.profile.bench._bench_op", boom)
    (tmp_path / "time.png").write_bytes(b"an earlier run's plot")
    args = ["bench", "--arch", "attn", "--seq-lens", "8,16", *TINY, "--d-model", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["complete"] is False
    assert [p["seq_len"] for p in data["models"][0]["points"]] == [8, 16]
    assert "median_s" in data["models"][0]["points"][1]["forward"]
    assert "**partial results**" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    assert not (tmp_path / "time.png").exists()  # no stale plot beside the partial results


def test_the_first_length_is_skipped_by_predicted_memory_before_anything_is_made(tmp_path):
    """`--seq-lens 64m` was killed by the OOM killer with nothing written: now the first length
    is predicted from the analytic cost and skipped, with its reason, in well under a second."""
    import resource
    import time

    start, rss0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = ["bench", "--arch", GDN, "--seq-lens", "64m", "--max-memory-gb", "2", *TINY]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start < 30
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 500 * 1024  # 64m tokens of int64 ids alone would be 512 MiB
    data = json.loads((tmp_path / "bench.json").read_text())
    (point,) = data["models"][0]["points"]
    for name in MODEL_PASSES:
        assert "GiB > max 2.0 GiB (at T = 67108864)" in point[name]["skipped"]
    (op_point,) = data["ops"][0]["points"]
    assert "GiB > max 2.0 GiB" in op_point["seqlab"]["forward"]["skipped"]


def test_budget_skips_a_first_measurement_predicted_too_big():
    budget = _Budget(max_seconds=30, max_bytes=100)
    assert budget.check("a", 512, work=1, calls=1, extra_s=0, predicted_bytes=100) is None
    reason = budget.check("a", 512, work=1, calls=1, extra_s=0, predicted_bytes=2**31)
    assert reason.startswith("predicted 2.0 GiB > max")
    assert budget.check("a", 1024, work=1, calls=1, extra_s=0) == reason  # longer: skipped too


def test_default_memory_limit_skips_what_this_machine_cannot_hold():
    config = BenchConfig.make(
        archs=(GDN,), seq_lens=(1024**3,), d_model=16, n_layers=2, level="all", repeats=1,
        warmup=0, decode_repeats=1,
    )  # fmt: skip
    result = run_bench(config)  # a billion tokens: no machine this runs on holds that
    assert result["settings"]["max_memory_bytes"] > 0
    assert "GiB > max" in result["models"][0]["points"][0]["forward"]["skipped"]


def test_op_level_times_every_mixers_core_op(tmp_path):
    """`seqlab bench --level op` over every registered mixer: one op entry per distinct core op,
    each family's fast form timed (with its peers where installed), every family present."""
    from seqlab.mixers import MIXERS
    from seqlab.ops.registry import families

    archs = [a for name in MIXERS for a in ("--arch", name)]
    args = ["bench", *archs, "--level", "op", "--seq-lens", "16", *TINY, "--d-model", "32"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert not data["models"]
    used = {arch for op in data["ops"] for arch in op["used_by"]}
    assert used == set(MIXERS)
    assert {op["spec"]["family"] for op in data["ops"]} == set(families())
    for op in data["ops"]:
        (point,) = op["points"]
        for name in ("forward", "forward_backward"):
            assert point["seqlab"][name]["median_s"] > 0, (op["op"], point["seqlab"][name])
        assert point["predicted_peak_bytes"]["seqlab"]["forward"] > 0


def test_the_first_length_of_every_family_is_skipped_by_predicted_memory():
    from seqlab.mixers import MIXERS

    config = BenchConfig.make(
        archs=tuple(MIXERS), seq_lens=(1024**3,), d_model=32, n_layers=1, level="op",
        repeats=1, warmup=0, max_memory_gb=2,
    )  # fmt: skip
    for op in run_bench(config)["ops"]:
        (point,) = op["points"]
        assert "GiB > max 2.0 GiB" in point["seqlab"]["forward"]["skipped"], op["op"]


def test_an_architecture_whose_weights_are_over_the_limit_is_skipped_unbuilt(monkeypatch):
    """`--max-memory-gb 1 --d-model 32768 --n-layers 8` built the 4.6 GB model before any check
    and died allocating it: now the weights, counted on the meta device, are in every pass's
    predicted peak, and the architecture is skipped like any other over-budget measurement."""
    import seqlab.profile.bench as bench

    def never_built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(bench, "CausalLM", never_built)
    config = BenchConfig.make(
        archs=("attn",), seq_lens=(8, 16), d_model=32768, n_layers=8, level="model", repeats=1,
        warmup=0, decode_repeats=1, max_memory_gb=1,
    )  # fmt: skip
    (model,) = run_bench(config)["models"]
    weights = model["weight_bytes"]
    assert weights >= 4 * model["params"] > 2**30  # float32, the ties counted once
    for T, point in zip((8, 16), model["points"], strict=True):
        for name in MODEL_PASSES:
            reason = point[name]["skipped"]
            assert reason.startswith("predicted ") and "GiB > max 1.0 GiB (at T = 8)" in reason
            assert float(reason.split()[1]) >= weights / 2**30 - 0.05  # the weights counted
        assert point["predicted_peak_bytes"]["forward"] > 0, T


def test_the_float32_build_of_a_bfloat16_model_counts_before_it_is_built(monkeypatch):
    """A bfloat16 bench builds the model in float32 and casts it: for a moment 3x the bf16
    weights. Where the bf16 weights and the passes fit but that build does not, every pass is
    skipped naming the build, and nothing is allocated (the build once took 2x the counted
    weights on the host)."""
    import seqlab.profile.bench as bench

    def never_built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(bench, "CausalLM", never_built)
    config = BenchConfig.make(
        archs=("attn",), seq_lens=(8, 16), d_model=4096, n_layers=1, level="model", repeats=1,
        warmup=0, decode_repeats=1, max_memory_gb=1, dtype="bfloat16",
    )  # fmt: skip
    (model,) = run_bench(config)["models"]
    weights = model["weight_bytes"]
    assert 0.34 * 2**30 < weights < 0.5 * 2**30  # bf16 weights alone fit, 3x do not
    for point in model["points"]:
        for name in MODEL_PASSES:
            reason = point[name]["skipped"]
            assert reason.startswith("building the model: predicted "), reason
            assert "GiB > max 1.0 GiB (at T = 8)" in reason


def test_the_weights_count_in_the_predicted_and_the_extrapolated_peak():
    budget = _Budget(max_seconds=30, max_bytes=100)
    assert budget.check_memory("a", 8, 60, held_bytes=40) is None
    assert budget.check_memory("b", 8, 61, held_bytes=40).startswith("predicted")
    assert budget.check_memory("c", 8, None, held_bytes=101).startswith("predicted")
    budget.record("d", 8, work=1, seconds=0.001, peak=30)  # measured above the weights
    assert budget.check("d", 16, work=2, calls=1, extra_s=0, held_bytes=40) is None  # 40 + 60
    assert budget.check("d", 32, work=4, calls=1, extra_s=0, held_bytes=40).startswith("predicted")
