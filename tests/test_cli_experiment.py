"""`seqlab train` and `seqlab probe` with --config and --set: flags override the file, the old
defaults stay, --dump-config prints the resolved TOML, bad keys and values stop the command before
any training, and a run's exported TOML reproduces it exactly.

Run: .venv/bin/python -m pytest tests/test_cli_experiment.py -q
"""

from __future__ import annotations

import tomllib

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.experiment import ExperimentConfig, experiment_from_dict, experiment_to_toml
from seqlab.model.checkpoint import load_checkpoint
from seqlab.train.results import ResultsStore
from seqlab.train.trainer import latest_checkpoint
from tests.train.conftest import TINY_MQAR_ARGS

TASK = ["--task", "mqar", *(a for o in TINY_MQAR_ARGS for a in ("--task-option", o))]
TINY_FILE = """
[task]
name = "mqar"
[task.options]
vocab_size = 32
train_mix = [[16, 2, 256], [16, 4, 256]]
test_mix = [[16, 2, 64], [16, 4, 64]]
[model]
pattern = "gla"
d_model = 16
n_layers = 1
[train]
steps = 4
batch_size = 8
eval_every = 2
warmup_steps = 1
progress = false
device = "cpu"
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """One thread (tiny models), and a results store under tmp_path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("SEQLAB_RESULTS", str(tmp_path / "store" / "results.db"))
    yield
    torch.set_num_threads(threads)


def run(args):
    result = CliRunner().invoke(app, args, terminal_width=250)
    return result, " ".join(result.output.split())


def dumped(args) -> dict:
    result, _ = run([*args, "--dump-config"])
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output)


def tiny_file(tmp_path, text=TINY_FILE):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def no_training(monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("training started before the config was checked")

    monkeypatch.setattr("seqlab.train.trainer.Trainer.run", work)


def test_without_a_config_the_defaults_are_the_old_flags():
    data = dumped(["train"])
    assert experiment_from_dict(data) == ExperimentConfig()
    assert data["task"] == {"name": "mqar", "preset": "cpu", "options": {}}
    model = {k: data["model"][k] for k in ("d_model", "pattern", "channel")}
    assert model == {"d_model": 64, "pattern": "attn", "channel": "swiglu"}
    assert ExperimentConfig().model_config_for(8).n_layers == 2
    old = dict(steps=1000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.1)
    old |= dict(eval_every=100, seed=0, device="auto", progress=True, out_dir="none")
    assert {k: data["train"][k] for k in old} == old


def test_flags_override_the_file_and_set_overrides_the_flags(tmp_path):
    path = tiny_file(tmp_path)
    data = dumped(["train", "--config", str(path), "--steps", "3", "--arch", "gdn", "--lr", "0.01"])
    assert (data["train"]["steps"], data["model"]["pattern"], data["train"]["lr"]) == (
        3,
        "gdn",
        0.01,
    )
    # what no flag gives keeps the file's value, then the default
    assert data["model"]["d_model"] == 16 and data["train"]["batch_size"] == 8
    assert data["train"]["weight_decay"] == 0.1
    assert data["task"]["options"]["vocab_size"] == 32
    data = dumped(["train", "--config", str(path), "--steps", "3", "--set", "train.steps=5"])
    assert data["train"]["steps"] == 5
    data = dumped(["train", "--config", str(path), "--channel", "", "--preset", ""])
    assert data["model"]["channel"] == "none" and data["task"]["preset"] == "none"
    data = dumped(["train", "--config", str(path), "--no-progress", "--out", str(tmp_path / "o")])
    assert data["train"]["progress"] is False and data["train"]["out_dir"] == str(tmp_path / "o")
    data = dumped(["train", "--config", str(path), "--mlflow", "out", "--wandb", "study"])
    assert (data["train"]["mlflow"], data["train"]["wandb"]) == ("out", "study")
    assert data["train"]["tensorboard"] is True


def test_set_reaches_fields_no_flag_has(tmp_path):
    sets = ["train.eval_batches=7", "train.min_lr_ratio=0.5", "train.grad_clip=none"]
    sets += ["train.betas=[0.9,0.99]", "model.norm_eps=1e-6", "task.options.power_a=0.5"]
    data = dumped(["train", *(a for s in sets for a in ("--set", s))])
    assert data["train"]["eval_batches"] == 7 and data["train"]["min_lr_ratio"] == 0.5
    assert data["train"]["grad_clip"] == "none" and data["train"]["betas"] == [0.9, 0.99]
    assert data["model"]["norm_eps"] == 1e-6 and data["task"]["options"]["power_a"] == 0.5


@pytest.mark.parametrize("command", ["train", "probe"])
@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ["--set", "train.lrr=1"],
            ["unknown key 'train.lrr'", "valid keys of [train]", "train.lr"],
        ),
        (["--set", "train.steps=true"], ["train.steps", "valid integer", "True"]),
        (["--set", "model.pattern=nope"], ["unknown mixer 'nope'"]),
        (["--set", "train.lr"], ["must read KEY=VALUE"]),
        (["--steps", "0"], ["train.steps", "greater than or equal to 1"]),
        (["--task-option", "nope=1"], ["unknown option(s) nope"]),
        (["--config", "missing.toml"], ["missing.toml: no such file"]),
    ],
)
def test_bad_keys_and_values_stop_before_training(command, args, fragments, monkeypatch, tmp_path):
    no_training(monkeypatch)
    result, text = run([command, *args, "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 2, result.output
    assert all(f in text for f in fragments), text


def test_a_bad_file_names_itself(tmp_path, monkeypatch):
    no_training(monkeypatch)
    path = tiny_file(tmp_path, TINY_FILE.replace("steps = 4", "stepz = 4"))
    result, text = run(["train", "--config", str(path)])
    assert result.exit_code == 2 and "run.toml: unknown key 'train.stepz'" in text


def test_the_exported_toml_of_a_run_reproduces_it(tmp_path):
    """A run from flags and --set, recorded; its record's config written as TOML by
    experiment_to_toml; `seqlab train --config` of that file alone: the same metrics and
    weights. The first command's --dump-config is that same TOML."""
    first = tmp_path / "first"
    args = ["train", *TASK, "--arch", "gla", "--d-model", "16", "--n-layers", "1", "--steps", "6"]
    args += ["--batch-size", "8", "--eval-every", "3", "--warmup-steps", "2", "--no-progress"]
    args += ["--seed", "3", "--device", "cpu", "--out", str(first)]
    args += ["--set", "train.grad_clip=0.5", "--set", "model.norm_eps=1e-6"]
    result, text = run(args)
    assert result.exit_code == 0, result.output
    (record,) = ResultsStore().runs()
    assert record["train"]["grad_clip"] == 0.5 and record["model"]["norm_eps"] == 1e-6
    cfg = experiment_from_dict(record["experiment"])
    assert run([*args, "--dump-config"])[0].output == experiment_to_toml(cfg)

    second = tmp_path / "second"
    path = tmp_path / "exported.toml"
    path.write_text(experiment_to_toml(cfg.updated({"train.out_dir": str(second)})))
    result, text = run(["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    again = ResultsStore().runs()[-1]
    assert again["metrics"]["final"] == record["metrics"]["final"]
    assert again["metrics"]["loss"] == record["metrics"]["loss"]
    a = load_checkpoint(latest_checkpoint(first) / "model.safetensors").state_dict()
    b = load_checkpoint(latest_checkpoint(second) / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_defaults_are_the_old_ones_and_follow_the_steps(tmp_path):
    data = dumped(["probe"])["train"]
    assert (data["steps"], data["batch_size"], data["lr"]) == (200, 32, 3e-3)
    assert (data["warmup_steps"], data["eval_every"]) == (20, 200)
    data = dumped(["probe", "--steps", "50"])["train"]
    assert (data["warmup_steps"], data["eval_every"]) == (5, 50)
    path = tiny_file(tmp_path)  # steps 4, warmup 1, eval_every 2: the file's, not derived
    data = dumped(["probe", "--config", str(path), "--steps", "30"])["train"]
    assert (data["steps"], data["warmup_steps"], data["eval_every"]) == (30, 1, 2)


def test_probe_runs_each_arch_on_the_config(tmp_path):
    path = tiny_file(tmp_path)
    out = tmp_path / "probe"
    result, text = run(["probe", "--config", str(path), "--arch", "attn", "--arch", "gla",
                        "--set", "train.steps=2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "d_model 16 · 2 steps" in text
    records = ResultsStore().runs()
    assert [r["model"]["pattern"] for r in records] == ["attn", "gla"]
    assert all(r["train"]["steps"] == 2 and r["model"]["d_model"] == 16 for r in records)
    assert [r["experiment"]["model"]["pattern"] for r in records] == ["attn", "gla"]
    assert all(r["tags"]["archs"] == ["attn", "gla"] for r in records)
    # without --arch, the config's own pattern is the one probed
    result, text = run(
        ["probe", "--config", str(path), "--set", "train.steps=2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert [r["model"]["pattern"] for r in ResultsStore().runs()[2:]] == ["gla"]
