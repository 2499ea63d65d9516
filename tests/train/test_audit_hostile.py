"""A hostile user of `seqlab train`, `results`, `plot` and the Python API: each case is a defect
that an audit found (a traceback, a silent wrong result, a late or misleading error), held fixed.

Run: .venv/bin/python -m pytest tests/train/test_audit_hostile.py -q
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.experiment import ExperimentError, load_experiment
from seqlab.model.generate import generate
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.train.report import parse_options
from seqlab.train.results import ResultsStore, parse_since
from seqlab.train.trainer import TrainConfig, train
from seqlab.train.watch import CURVES, EVENTS, read_curves
from tests.train.conftest import tiny_model, tiny_task, tiny_train
from tests.train.test_trainer import Crash, crash_at


def flat(output: str) -> str:
    """CLI output without the line breaks the terminal width puts anywhere."""
    return " ".join(output.split())


# `seqlab plot`


GOOD = {"step": 10, "metrics": {"all": 0.5}, "train_loss": 1.0, "wall_time_s": 2.0}


@pytest.mark.parametrize(
    "curves",
    [
        {"evaluations": [GOOD]},  # no label: was a KeyError traceback
        {"label": "gla", "evaluations": []},  # nothing to draw: was an empty PNG
        {"label": "gla", "evaluations": [{**GOOD, "metrics": {"all": "x"}}]},  # was drawn as text
        {"label": "gla", "evaluations": [{**GOOD, "metrics": [0.5]}]},  # was an AttributeError
        {"label": "gla", "evaluations": [{**GOOD, "step": "10"}]},
        {"label": "gla", "evaluations": [{**GOOD, "train_loss": "low"}]},
    ],
)
def test_plot_refuses_a_curves_file_it_cannot_draw(tmp_path, curves):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CURVES).write_text(json.dumps(curves))
    png = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(png)])
    assert result.exit_code == 2, result.output
    assert "damaged curves file" in flat(result.output)
    assert not png.exists()


def test_read_curves_takes_what_the_trainer_writes(tmp_path):
    (tmp_path / CURVES).write_text(
        json.dumps({"label": "gla", "task": "MQAR", "evaluations": [GOOD, {**GOOD, "step": 20}]})
    )
    assert [e["step"] for e in read_curves(tmp_path)["evaluations"]] == [10, 20]


def test_plot_refuses_a_folder_as_its_png(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CURVES).write_text(json.dumps({"label": "gla", "evaluations": [GOOD]}))
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output  # was an IsADirectoryError traceback
    assert "is a folder" in flat(result.output)


# `seqlab results`


def test_an_age_before_year_one_lists_every_run(results_path):
    assert parse_since("99999999999w") == datetime.min.replace(tzinfo=UTC)  # OverflowError
    store = ResultsStore(results_path)
    store.add({"task": {"name": "mqar"}, "model": {"pattern": "gla"}, "metrics": {}})
    result = CliRunner().invoke(
        app, ["results", "--db", str(results_path), "--since", "9" * 20 + "d"]
    )
    assert result.exit_code == 0, result.output
    assert "1 runs" in result.output


def test_a_negative_limit_is_refused(results_path):
    store = ResultsStore(results_path)
    store.add({"task": {"name": "mqar"}, "model": {"pattern": "gla"}, "metrics": {}})
    # it listed every run without --where and none with one
    with pytest.raises(ValueError, match="limit"):
        store.runs(limit=-1)
    result = CliRunner().invoke(app, ["results", "--db", str(results_path), "--limit", "-1"])
    assert result.exit_code == 2 and "limit" in result.output


def test_a_where_key_given_twice_with_other_values_is_refused(results_path):
    # the last one won: `--where status=diverged --where status=completed` listed completed runs
    with pytest.raises(ValueError, match="status given twice"):
        parse_options(["status=diverged", "status=completed"], "--where")
    assert parse_options(["status=diverged", "status=diverged"]) == {"status": "diverged"}
    ResultsStore(results_path)
    args = ["results", "--db", str(results_path), "--where", "status=a", "--where", "status=b"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "given twice" in flat(result.output)


# configs: checked when made, naming the key


@pytest.mark.parametrize("betas", [(1.5, 0.9), (0.9, 1.0), (-0.1, 0.9)])
def test_betas_outside_0_1_are_refused_naming_the_key(betas):
    # torch refused them only when the optimizer was made, without naming train.betas
    with pytest.raises(ExperimentError, match=r"train\.betas"):
        load_experiment(overrides=[f"train.betas=[{betas[0]}, {betas[1]}]"])


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "eval_batches"])
def test_sizes_beyond_64_bits_are_refused_before_training(key):
    # eval_batch_size = 10**20 failed at the first evaluation, after the training before it
    with pytest.raises(ValidationError, match=key):
        TrainConfig(**{key: 10**20})


def test_model_sizes_beyond_64_bits_are_refused_naming_the_key():
    with pytest.raises(ValidationError, match="d_model"):
        ModelConfig(vocab_size=32, d_model=2**64)
    # the TOML file's model.d_model = 10**20 was a TypeError traceback from torch.empty
    with pytest.raises(ExperimentError, match=r"model\.d_model"):
        load_experiment(overrides=[f"model.d_model={10**20}"])


@pytest.mark.parametrize("threads", ["0", "-1"])
@pytest.mark.parametrize("command", ["train", "probe"])
def test_threads_below_one_are_refused(tmp_path, monkeypatch, command, threads):
    def work(*args, **kwargs):
        raise AssertionError("work started before --threads was checked")

    monkeypatch.setattr("seqlab.train.trainer.Trainer.run", work)
    args = [command, "--threads", threads, "--no-record", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output  # -1 was a RuntimeError traceback
    assert "--threads" in result.output


# resuming


def test_a_refused_resume_names_each_model_field_that_differs(tmp_path):
    out = str(tmp_path / "run")
    train(tiny_model(), tiny_task(), tiny_train(steps=10, out_dir=out))
    with pytest.raises(ValueError, match="different run") as e:
        train(tiny_model(d_model=32), tiny_task(), tiny_train(steps=10, out_dir=out))
    # it printed both whole configs, leaving the reader to find the difference
    assert "model.d_model: checkpoint 16, now 32" in str(e.value)
    assert "pattern" not in str(e.value)


event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_a_restart_before_the_first_checkpoint_keeps_no_events_of_the_killed_run(
    tmp_path, monkeypatch
):
    out = str(tmp_path / "run")
    crash_at(monkeypatch, 7)
    with pytest.raises(Crash):
        train(tiny_model(), tiny_task(), tiny_train(steps=20, out_dir=out))
    monkeypatch.undo()
    # nothing to resume, so another lr starts a new run in the same folder
    train(tiny_model(), tiny_task(), tiny_train(steps=20, out_dir=out, lr=1e-3))
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / EVENTS))
    acc.Reload()
    # steps 1-6 of the killed run were kept beside the new run's
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))


# generation


def test_generate_names_a_seed_torch_cannot_take():
    model = CausalLM(ModelConfig(vocab_size=11, d_model=16, n_layers=1, pattern="gla")).eval()
    prompt = torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="seed"):  # was "Overflow when unpacking long long"
        generate(model, prompt, 2, seed=2**64)
    a = generate(model, prompt, np.int64(3), seed=np.int64(5))  # numpy ints, as top_k takes
    assert a.shape == (2, 6) and torch.equal(a, generate(model, prompt, 3, seed=5))


def test_an_empty_channel_pattern_is_named_as_the_channel():
    # the error named the token mixers' pattern: "pattern must be a non-empty string like
    # 'gdn*3,attn'", with model.pattern set and model.channel the one at fault
    with pytest.raises(ExperimentError, match="channel must be a channel mixer pattern"):
        load_experiment(overrides=['model.channel=""'])


def test_a_finished_run_repeated_is_not_recorded_twice(tmp_path):
    """The same `train` command twice in one --out: the second resumed at the last step and
    trained nothing, yet said 'trained 4 steps' and added a second record of the same run
    (counted twice by any aggregation). Now it says nothing was trained and records nothing."""
    from typer.testing import CliRunner

    from seqlab.cli import app
    from seqlab.train.results import ResultsStore
    from tests.train.conftest import TINY_MQAR_ARGS

    args = ["train", "--task", "mqar", *(a for o in TINY_MQAR_ARGS for a in ("--task-option", o))]
    args += ["--arch", "gla", "--d-model", "16", "--n-layers", "1", "--steps", "4"]
    args += ["--eval-every", "2", "--batch-size", "4", "--no-progress"]
    args += ["--out", str(tmp_path / "run"), "--results", str(tmp_path / "r.db")]
    texts = []
    for _ in range(2):
        result = CliRunner().invoke(app, args, terminal_width=200)
        assert result.exit_code == 0, result.output
        texts.append(" ".join(result.output.split()))
    (run,) = ResultsStore(tmp_path / "r.db", read_only=True).runs()
    assert f"recorded run {run['id']}" in texts[0]
    assert "had already trained 4 steps; nothing trained now" in texts[1]
    assert f"not recorded again: {tmp_path / 'r.db'} holds this run as {run['id']}" in texts[1]


def test_probe_refuses_a_model_too_large_and_an_unwritable_table_before_training(
    tmp_path, monkeypatch
):
    """probe trained every earlier arch before a later one failed to fit in memory, and wrote
    its PNG and CSV only after all of them (a folder in their place failed at the end)."""
    from typer.testing import CliRunner

    from seqlab.cli import app
    from tests.train.conftest import TINY_MQAR_ARGS

    def work(*args, **kwargs):
        raise AssertionError("training started before the checks")

    monkeypatch.setattr("seqlab.train.trainer.Trainer.run", work)
    args = ["probe", "--task", "mqar", *(a for o in TINY_MQAR_ARGS for a in ("--task-option", o))]
    args += ["--steps", "2", "--batch-size", "4", "--d-model", "16", "--no-progress"]
    args += ["--arch", "gla", "--arch", "attn", "--no-record", "--out", str(tmp_path / "p")]
    calls = []

    def free_memory(device):  # unknown for the first arch, 1000 bytes for the second
        calls.append(device)
        return None if len(calls) == 1 else 1000

    monkeypatch.setattr("seqlab.train.trainer.free_memory", free_memory)
    result = CliRunner().invoke(app, args, terminal_width=250)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "arch 'attn'" in text and "more than the" in text, text
    (tmp_path / "p" / "probe-mqar.png").mkdir(parents=True)
    monkeypatch.setattr("seqlab.train.trainer.free_memory", lambda device: None)
    result = CliRunner().invoke(app, args, terminal_width=250)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "probe-mqar.png" in text and "is a folder" in text, text
