import errno
import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.model.checkpoint import CheckpointError, load_checkpoint
from seqlab.tasks import build_task
from seqlab.train import trainer as trainer_module
from seqlab.train.trainer import (
    Diverged,
    TrainConfig,
    Trainer,
    WarmupCosine,
    latest_checkpoint,
    train,
    verify_checkpoint,
)
from tests.train.conftest import TINY_MQAR_ARGS, tiny_model, tiny_task, tiny_train


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_schedule_values():
    f = WarmupCosine(warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert WarmupCosine(0, 10, 0.0)(0) == pytest.approx(1.0)


def test_trainer_follows_the_schedule():
    config = tiny_train(steps=12, warmup_steps=4, eval_every=1, lr=0.01, min_lr_ratio=0.2)
    result = train(tiny_model(), tiny_task(), config)
    schedule = WarmupCosine(4, 12, 0.2)
    # history[i]["lr"]: the rate the next update uses, after `step` updates.
    assert [h["lr"] for h in result.history] == pytest.approx(
        [0.01 * schedule(h["step"]) for h in result.history]
    )


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gradient_clipping(clip):
    trainer = Trainer(tiny_model(), tiny_task(), tiny_train(grad_clip=clip))
    inputs, targets = next(trainer.batches())
    _, norm = trainer.train_step(inputs, targets)
    after = torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm().item()
    if clip is None:
        assert after == pytest.approx(norm, rel=1e-5)
    else:
        assert norm > 10 * clip  # the clip was active
        assert after == pytest.approx(clip, rel=1e-3)


def test_weight_decay_spares_vectors():
    trainer = Trainer(tiny_model(), tiny_task(), tiny_train(weight_decay=0.5))
    decayed, spared = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and spared["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in spared["params"]) and spared["params"]


def test_training_learns_and_evaluates_by_slice():
    result = train(tiny_model("attn"), tiny_task(), tiny_train(steps=60, eval_every=20))
    assert [h["step"] for h in result.history] == [20, 40, 60]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.final) == {"all", "num_kv_pairs=2,seq_len=16", "num_kv_pairs=4,seq_len=16"}
    assert all(0 <= v <= 1 for v in result.final.values())
    assert result.best["all"] == max(h["metrics"]["all"] for h in result.history)
    assert result.stop_reason == "steps" and result.step == 60
    assert result.tokens == 60 * 8 * 16 and result.tokens_per_s > 0


def test_same_seed_same_weights_other_seed_not():
    a = train(tiny_model(), tiny_task(), tiny_train(steps=5))
    b = train(tiny_model(), tiny_task(), tiny_train(steps=5))
    c = train(tiny_model(), tiny_task(), tiny_train(steps=5, seed=1))
    assert_same_weights(weights(a.model), weights(b.model))
    assert not torch.equal(a.model.embed.weight, c.model.embed.weight)


def test_early_stop_at_target_accuracy(monkeypatch):
    scores = iter([0.3, 0.95, 0.99])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"all": next(scores)})
    result = train(tiny_model(), tiny_task(), tiny_train(target_accuracy=0.9))
    assert result.stop_reason == "target_accuracy"
    assert result.step == 20
    assert "0.95" in result.message and "step 20" in result.message


def test_text_task_reports_bits_per_byte():
    task = build_task("text", seq_len=16)
    model = tiny_model().model_copy(update={"vocab_size": 256})
    result = train(model, task, tiny_train(steps=4, eval_every=4, eval_batches=2))
    assert set(result.final) == {"all", "bits_per_byte"}
    # An untrained byte model is close to uniform: about 8 bits per byte.
    assert 6 < result.final["bits_per_byte"] < 9


def test_rejects_autoencode_tasks_and_small_vocabularies():
    with pytest.raises(ValueError, match="autoencode"):
        Trainer(tiny_model(), build_task("compression", preset="cpu"), tiny_train())
    with pytest.raises(ValueError, match="vocab_size 16"):
        Trainer(tiny_model().model_copy(update={"vocab_size": 16}), tiny_task(), tiny_train())


def test_checkpoints_every_evaluation_keep_only_the_latest(tmp_path):
    result = train(tiny_model(), tiny_task(), tiny_train(out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "curves.json",
        "latest.json",
        "step-00000030",
        "tensorboard",
    ]
    assert sorted(p.name for p in (tmp_path / "step-00000030").iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "trainer.pt",
    ]
    assert json.loads((tmp_path / "latest.json").read_text()) == {
        "dir": "step-00000030",
        "step": 30,
    }
    model = load_checkpoint(tmp_path / "step-00000030" / "model.safetensors")
    assert_same_weights(weights(model), weights(result.model))
    state = torch.load(tmp_path / "step-00000030" / "trainer.pt", weights_only=True)
    assert state["step"] == state["data_position"] == 30
    assert {"optimizer", "scheduler", "rng"} <= set(state)


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Make update number `step` (1-based) raise, as a killed process would stop there."""
    step_fn = Trainer.train_step

    def train_step(self, inputs, targets):
        if self.step + 1 == step:
            raise Crash
        return step_fn(self, inputs, targets)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    config = tiny_train(steps=30, eval_every=10)
    reference = train(tiny_model(), tiny_task(), config)

    out = tmp_path / "run"
    crash_at(monkeypatch, 25)
    with pytest.raises(Crash):
        train(tiny_model(), tiny_task(), config.model_copy(update={"out_dir": str(out)}))
    monkeypatch.undo()
    assert latest_checkpoint(out).name == "step-00000020"
    (out / "step-00000029").mkdir()  # a half-written checkpoint LATEST never pointed at

    resumed = train(tiny_model(), tiny_task(), config.model_copy(update={"out_dir": str(out)}))
    assert resumed.resumed_from == 20
    assert resumed.step == 30
    assert_same_weights(weights(resumed.model), weights(reference.model))
    assert [h["step"] for h in resumed.history] == [10, 20, 30]
    assert resumed.history == reference.history


def test_resume_refuses_a_different_run(tmp_path):
    train(tiny_model(), tiny_task(), tiny_train(steps=10, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"different run.*train\.lr"):
        train(tiny_model(), tiny_task(), tiny_train(steps=10, lr=0.1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="different run.*model"):
        train(tiny_model("attn"), tiny_task(), tiny_train(steps=10, out_dir=str(tmp_path)))
    # Settings that do not change the trajectory may differ.
    train(tiny_model(), tiny_task(), tiny_train(steps=10, out_dir=str(tmp_path), progress=True))


def poison_loss(monkeypatch, at_call: int, where: str) -> None:
    """Make the `at_call`-th training loss NaN ("loss"), or keep it finite but give it NaN
    gradients ("grad": 0 · sqrt(0) has value 0 and gradient 0 · inf)."""
    calls = 0
    lm_loss = trainer_module.lm_loss

    def poisoned(logits, targets):
        nonlocal calls
        calls += 1
        loss = lm_loss(logits, targets)
        if calls != at_call:
            return loss
        if where == "loss":
            return loss * math.nan
        return loss + 0 * torch.sqrt(0 * logits.sum())

    monkeypatch.setattr(trainer_module, "lm_loss", poisoned)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, where):
    poison_loss(monkeypatch, at_call=13, where=where)
    result = train(tiny_model(), tiny_task(), tiny_train(out_dir=str(tmp_path)))
    assert result.stop_reason == "non_finite"
    what = "loss" if where == "loss" else "gradient norm"
    assert f"non-finite {what} (nan) at step 13" in result.message
    assert "step-00000010" in result.message
    assert result.step == 12
    # The bad update was skipped: the weights in memory are finite and the checkpoint is step 10.
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step-00000010"
    saved = load_checkpoint(folder / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_train_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="valid options are"):
        TrainConfig.make(step=10)


def test_moe_aux_loss_is_trained_on():
    trainer = Trainer(tiny_model(channel="moe(num_experts=4)"), tiny_task(), tiny_train())
    inputs, targets = next(trainer.batches())
    with torch.no_grad():
        out = trainer.model(inputs)
        expected = trainer_module.lm_loss(out.logits, targets) + out.aux_loss
    assert out.aux_loss > 0
    loss, _ = trainer.train_step(inputs, targets)
    assert loss == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "option",
    [
        {"lr": math.inf},
        {"lr": math.nan},
        {"weight_decay": math.inf},
        {"betas": (math.nan, 0.95)},
        {"grad_clip": math.inf},
        {"min_lr_ratio": math.nan},
        {"target_accuracy": math.nan},
    ],
)
def test_non_finite_hyperparameters_are_refused(option):
    [name] = option
    with pytest.raises(ValueError, match=rf"TrainConfig: {name}.*finite"):
        TrainConfig.make(**option)


def test_train_command_refuses_an_infinite_lr(tmp_path):
    task_options = [arg for option in TINY_MQAR_ARGS for arg in ("--task-option", option)]
    args = ["train", "--task", "mqar", *task_options, "--lr", "inf", "--no-record"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "lr" in result.output and "finite" in result.output
    assert not (tmp_path / "run").exists()


def test_overflow_in_the_optimizer_is_a_clear_stop(tmp_path):
    # An lr this large is finite as a Python float but overflows float32 inside AdamW's update.
    config = tiny_train(lr=1e39, warmup_steps=0, out_dir=str(tmp_path))
    result = train(tiny_model(), tiny_task(), config)
    assert result.stop_reason == "non_finite"
    assert "overflow in the optimizer update at step 1" in result.message
    assert "lr 1e+39" in result.message and "none" in result.message
    assert latest_checkpoint(tmp_path) is None


def poison_update(monkeypatch, at_update: int) -> None:
    """Make optimizer update number `at_update` (1-based) leave an Inf in the embedding."""
    calls = 0
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        out = step(self, *args, **kwargs)
        if calls == at_update:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def test_a_non_finite_parameter_after_an_update_stops_the_run(tmp_path, monkeypatch):
    poison_update(monkeypatch, at_update=13)
    result = train(tiny_model(), tiny_task(), tiny_train(out_dir=str(tmp_path)))
    assert result.stop_reason == "non_finite"
    assert "non-finite parameter embed.weight after the update at step 13" in result.message
    assert "step-00000010" in result.message
    assert result.step == 12
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step-00000010"
    saved = load_checkpoint(folder / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_a_checkpoint_with_non_finite_weights_is_not_written(tmp_path):
    trainer = Trainer(tiny_model(), tiny_task(), tiny_train(out_dir=str(tmp_path)))
    with torch.no_grad():
        trainer.model.embed.weight[1, 2] = math.nan
    with pytest.raises(Diverged, match=r"embed\.weight.*not finite.*not written"):
        trainer.save()
    assert latest_checkpoint(tmp_path) is None
    assert not list(tmp_path.glob("step-*"))


def checkpointed_run(out, steps=10):
    return train(tiny_model(), tiny_task(), tiny_train(steps=steps, out_dir=str(out)))


def interrupted_run(out, monkeypatch) -> None:
    """A 30-step run that crashed after its checkpoint at step 20."""
    crash_at(monkeypatch, 25)
    with pytest.raises(Crash):
        checkpointed_run(out, steps=30)
    monkeypatch.undo()


def test_a_damaged_trainer_state_is_refused_naming_the_file(tmp_path):
    checkpointed_run(tmp_path)
    path = tmp_path / "step-00000010" / "trainer.pt"
    good = path.read_bytes()
    # Flip one byte inside an optimizer moment: torch.load alone would read the changed number.
    state = torch.load(path, weights_only=True)
    moment = state["optimizer"]["state"][0]["exp_avg"].numpy().tobytes()
    at = good.index(moment) + len(moment) // 2
    cases = {
        "digest": good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1 :],
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }
    for problem, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{path}.*{problem}"):
            checkpointed_run(tmp_path)
        assert path.exists()
    path.write_bytes(good)
    weights_path = tmp_path / "step-00000010" / "model.safetensors"
    weights_bytes = weights_path.read_bytes()
    weights_path.write_bytes(weights_bytes[:-7])
    with pytest.raises(CheckpointError, match=rf"{weights_path}: truncated"):
        checkpointed_run(tmp_path)
    weights_path.write_bytes(weights_bytes)
    assert checkpointed_run(tmp_path).resumed_from == 10


def test_a_lost_latest_json_resumes_from_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    interrupted_run(tmp_path, monkeypatch)
    (tmp_path / "latest.json").unlink()
    partial = tmp_path / ".step-00000030.partial"  # a checkpoint whose writing was killed
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    result = checkpointed_run(tmp_path, steps=30)
    assert result.resumed_from == 20 and result.step == 30
    assert not partial.exists()


@pytest.mark.parametrize("pointer", ["{not json", '{"dir": "../elsewhere", "step": 10}'])
def test_a_damaged_latest_json_never_restarts_from_zero(tmp_path, monkeypatch, pointer):
    out = tmp_path / "run"
    checkpointed_run(tmp_path / "elsewhere")
    interrupted_run(out, monkeypatch)
    (out / "latest.json").write_text(pointer)
    assert checkpointed_run(out, steps=30).resumed_from == 20  # never the folder outside

    for folder in out.glob("step-*"):
        (folder / "checkpoint.json").unlink()  # as a folder an older seqlab wrote: unverifiable
    (out / "latest.json").write_text(pointer)
    with pytest.raises(CheckpointError, match=rf"{out}.*latest\.json.*step-00000030"):
        checkpointed_run(out, steps=30)
    assert (out / "step-00000030" / "trainer.pt").exists()


def test_only_the_runs_own_step_folders_are_removed(tmp_path, monkeypatch):
    """A checkpoint removes the older step-NNNNNNNN folders, never a user's folder whose name
    merely starts with step- (a backup, notes in a working folder used as out_dir)."""
    interrupted_run(tmp_path, monkeypatch)
    mine = {"step-by-step": "notes", "step-00000010-backup": "copy", "step-best": "x"}
    for name, text in mine.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(text)
    (tmp_path / ".step-best.partial").mkdir()  # not a partial checkpoint of the trainer's
    assert checkpointed_run(tmp_path, steps=30).resumed_from == 20
    for name, text in mine.items():
        assert (tmp_path / name / "notes.txt").read_text() == text
    assert (tmp_path / ".step-best.partial").is_dir()
    assert sorted(p.name for p in tmp_path.glob("step-????????")) == ["step-00000030"]


@pytest.mark.parametrize(
    "entry",
    [None, "abc", {"bytes": "12", "sha256": "0"}, {"bytes": 12}, {"bytes": 1.5, "sha256": "0"}],
)
def test_a_wrongly_shaped_manifest_is_a_checkpoint_error(tmp_path, entry):
    checkpointed_run(tmp_path)
    manifest = tmp_path / "step-00000010" / "checkpoint.json"
    record = json.loads(manifest.read_text())
    record["files"]["trainer.pt"] = entry
    manifest.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=rf"{manifest}: damaged .*trainer\.pt"):
        verify_checkpoint(manifest.parent)


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(ValueError, match=rf"{tmp_path} is in use.*pid {holder.pid}"):
            checkpointed_run(tmp_path)
        assert not list(tmp_path.glob("step-*"))
    finally:
        holder.kill()
        holder.wait()
    checkpointed_run(tmp_path)  # the lock went with its holder


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    checkpointed_run(tmp_path)
    stale = [tmp_path / ".latest.json.x1.tmp", tmp_path / "step-00000010" / ".trainer.pt.x2.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed write")
    checkpointed_run(tmp_path)
    assert not any(path.exists() for path in stale)


LOG_LINE = (
    r"\[gla\] step {step}/30 · loss \d+\.\d+ · all \d+\.\d% · elapsed [\dms.]+ · ETA [\dms.]+"
)


def test_without_a_terminal_every_evaluation_prints_a_log_line(capsys):
    train(tiny_model(), tiny_task(), tiny_train(progress=True))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    for line, step in zip(lines, (10, 20, 30), strict=True):
        assert re.fullmatch(LOG_LINE.format(step=step), line), line
    assert lines[-1].endswith("ETA 0.0s")
    train(tiny_model(), tiny_task(), tiny_train(progress=False))
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_shows_the_held_out_metric(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "200")
    result = train(tiny_model(), tiny_task(), tiny_train(progress=True, eval_every=5))
    shown = terminal.getvalue()
    assert "step 10/30" not in shown  # the bar, not log lines
    # Frames are drawn a few times a second; the last, drawn as the bar closes, shows the last.
    assert f"held-out all {100 * result.final['all']:.1f}%" in shown, shown


def test_a_full_disk_while_writing_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step-00000020.*No space left on device"):
        checkpointed_run(tmp_path, steps=30)
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "curves.json",
        "latest.json",
        "step-00000010",
        "tensorboard",
    ]
