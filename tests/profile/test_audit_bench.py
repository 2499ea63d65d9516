"""Defects found by an audit of `seqlab bench`, `seqlab check` and the cost API: bad input is a
clear error before any work, not a silent default, a traceback or a wrong number.

Run: .venv/bin/python -m pytest tests/profile/test_audit_bench.py -q
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.model.lm import ModelConfig
from seqlab.profile.bench import BenchConfig, memory_limit, parse_seq_lens
from seqlab.profile.cost import memory_bytes

TINY = ["--arch", "gdn", "--level", "model", "--repeats", "1", "--warmup", "0"]
TINY += ["--decode-repeats", "1", "--seq-lens", "16"]


def run(*args: str):
    result = CliRunner().invoke(app, list(args), terminal_width=250)
    return result, " ".join(result.output.split())


@pytest.mark.parametrize("flag", ["--d-model", "--n-layers"])
def test_a_zero_size_is_an_error_not_the_presets_size(flag, tmp_path):
    # `--d-model 0` used to be dropped as falsy: the run went on at the preset's 256 (or 4 layers)
    # tiny memory limit: were it to run, every pass would be skipped at once
    out = tmp_path / "out"
    result, text = run("bench", *TINY, flag, "0", "--max-memory-gb", "1e-9", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert flag.lstrip("-").replace("-", "_") in text
    assert not out.exists()


def test_a_sequence_length_torch_cannot_index_is_refused():
    # 99999999999999999999999m used to run (every pass skipped), then fail plotting it
    with pytest.raises(ValueError, match="2\\^63"):
        parse_seq_lens("16,99999999999999999999999m")
    with pytest.raises(ValueError, match="seq_lens"):
        BenchConfig(archs=("gdn",), seq_lens=(16, 2**63), d_model=16, n_layers=1)
    assert parse_seq_lens("8k,16") == (16, 8192)


def test_bench_refuses_a_huge_length_before_any_work(tmp_path):
    out = tmp_path / "out"
    result, text = run(
        "bench", "--arch", "gdn", "--seq-lens", "99999999999999999999999m", "--out", str(out)
    )
    assert result.exit_code == 2, result.output
    assert "--seq-lens" in text and "2^63" in text
    assert not out.exists()


@pytest.mark.parametrize("name", ["bench.json", "results.md", "time.png"])
def test_a_folder_where_bench_writes_a_file_is_refused_before_measuring(name, tmp_path):
    # it used to measure the first length, then fail renaming its JSON over the folder (or
    # removing an old plot) with an IsADirectoryError traceback
    (tmp_path / name).mkdir()
    result, text = run("bench", *TINY, "--d-model", "16", "--n-layers", "1", "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "--out" in text and name in text and "folder" in text
    assert "T=16" not in text  # nothing was measured
    assert not (tmp_path / "bench.json").is_file()


def test_bench_still_writes_into_a_folder_of_an_earlier_run(tmp_path):
    args = [*TINY, "--d-model", "16", "--n-layers", "1", "--out", str(tmp_path)]
    for _ in range(2):
        result, _ = run("bench", *args)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bench.json").read_text())["complete"] is True


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0"])
def test_check_max_memory_gb_must_be_finite_and_positive(value):
    # inf used to end in an OverflowError traceback (int(inf * 2**30))
    result, text = run("check", "--seq-len", "4", "--max-memory-gb", value)
    assert result.exit_code == 2, result.output
    assert "--max-memory-gb" in text and "positive finite" in text


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_memory_limit_rejects_a_bad_limit(value):
    import torch

    with pytest.raises(ValueError, match="max_memory_gb"):
        memory_limit(value, torch.device("cpu"))


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True])
def test_memory_bytes_rejects_a_bad_batch_size(batch_size):
    # a negative batch used to predict negative bytes (a bound that every limit passes)
    config = ModelConfig(vocab_size=64, d_model=16, n_layers=1, pattern="gdn")
    with pytest.raises(ValueError, match="batch_size"):
        memory_bytes(config, 16, batch_size=batch_size)
    one, two = memory_bytes(config, 16, 1), memory_bytes(config, 16, 2)
    assert 0 < one["forward"] < two["forward"]


def test_a_skip_reason_never_reads_as_zero_against_a_tiny_limit():
    from seqlab.profile.bench import _Budget

    # --max-seconds 1e-6 used to give "predicted 0 s > max 1e-06 s", a contradiction
    budget = _Budget(max_seconds=1e-6, max_bytes=1000)
    budget.record("a", 16, work=1, seconds=2e-5, peak=10)
    assert budget.check("a", 32, work=2, calls=1, extra_s=0) == (
        "predicted 4e-05 s > max 1e-06 s (at T = 32)"
    )
    # a tiny --max-memory-gb: "predicted 0.0 GiB > max 0.0 GiB" before
    reason = budget.check_memory("b", 16, 2000)
    assert reason == "predicted 1.9e-06 GiB > max 9.3e-07 GiB (at T = 16)"
    big = _Budget(max_seconds=30, max_bytes=2**31)
    assert big.check_memory("c", 8, 3 * 2**30) == "predicted 3.0 GiB > max 2.0 GiB (at T = 8)"


def test_check_names_tiny_sizes_in_its_error():
    result, text = run("check", "--seq-len", "17", "--max-memory-gb", "0.0000005")
    assert result.exit_code == 2, result.output
    assert "0.0 GiB" not in text and "GiB allowed" in text
