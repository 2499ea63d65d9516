"""`seqlab check` is bounded by memory like `seqlab bench` (issue 14, item 6): a form predicted
to need more than --max-memory-gb is skipped with the reason, and a --seq-len whose inputs alone
do not fit is an error naming the option, before anything is allocated.

Run: .venv/bin/python -m pytest tests/test_cli_check.py -q
"""

from __future__ import annotations

import resource
import time

from typer.testing import CliRunner

from seqlab.cli import app


def run(*args: str):
    result = CliRunner().invoke(app, ["check", *args], terminal_width=250)
    return result, " ".join(result.output.split())


def test_forms_that_do_not_fit_are_skipped_with_the_reason():
    # the parallel form would need tens of GiB at T = 4096 (T × T × K blocks in float64)
    result, text = run("--seq-len", "4096", "--max-memory-gb", "0.5")
    assert result.exit_code == 0, result.output
    assert text.count("skipped: predicted") == 7  # 6 parallel rows (mlstm's too), naive attention
    assert "max 0.5 GiB" in text
    assert "chunk" in text and "e-1" in text  # the chunk form still ran and matched


def test_a_length_whose_inputs_do_not_fit_is_an_error_before_any_work():
    start, rss0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, text = run("--seq-len", str(64 * 1024**2), "--max-memory-gb", "2")
    assert result.exit_code == 2
    assert "--seq-len" in text and "GiB" in text and "--max-memory-gb" in text
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB


def test_the_default_limit_is_what_this_machine_has_free():
    result, text = run("--seq-len", str(1024**3))  # no machine this runs on holds that
    assert result.exit_code == 2 and "--seq-len" in text


def test_ops_and_check_list_every_registered_family():
    from seqlab.ops.registry import families

    listing = CliRunner().invoke(app, ["ops"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    result, text = run("--seq-len", "40")
    assert result.exit_code == 0, result.output
    for name, fam in families().items():
        assert name in listing.output
        if len(fam.forms) > 1:
            for variant in fam.variants:
                assert f"{name}({variant})" in text
