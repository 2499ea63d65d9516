"""Mixed precision, gradient accumulation and torch.compile in the trainer."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.trainer import TrainConfig, Trainer, train
from tests.train.conftest import TINY_MQAR_ARGS, tiny_model, tiny_task, tiny_train
from tests.train.test_trainer import Crash, assert_same_weights, crash_at, weights


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_weights_and_state():
    trainer = Trainer(tiny_model("gdn,attn", n_layers=2), tiny_task(), tiny_train(precision="bf16"))
    seen = []
    hook = trainer.model.blocks[0].mixer.o_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype)
    )
    inputs, targets = next(trainer.batches())
    loss, norm = trainer.train_step(inputs, targets)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert torch.isfinite(torch.tensor([loss, norm])).all()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in trainer.model.parameters() if p.grad is not None} == {
        torch.float32
    }
    states = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]
    assert states and {t.dtype for t in states} == {torch.float32}


def test_bf16_differs_from_fp32_but_learns():
    fp32 = train(tiny_model(), tiny_task(), tiny_train(steps=40))
    bf16 = train(tiny_model(), tiny_task(), tiny_train(steps=40, precision="bf16"))
    a, b = weights(fp32.model), weights(bf16.model)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast really changed the math
    first, last = bf16.history[0]["train_loss"], bf16.history[-1]["train_loss"]
    assert last < first


def test_a_resumed_bf16_run_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, monkeypatch):
    config = tiny_train(steps=20, eval_every=10, precision="bf16")
    reference = train(tiny_model("gdn"), tiny_task(), config)
    out = tmp_path / "run"
    crash_at(monkeypatch, 15)
    with pytest.raises(Crash):
        train(tiny_model("gdn"), tiny_task(), config.model_copy(update={"out_dir": str(out)}))
    monkeypatch.undo()
    resumed = train(tiny_model("gdn"), tiny_task(), config.model_copy(update={"out_dir": str(out)}))
    assert resumed.resumed_from == 10
    assert_same_weights(weights(resumed.model), weights(reference.model))
    assert resumed.history == reference.history


@pytest.mark.parametrize("pieces", [2, 4])
def test_accumulated_micro_batches_give_the_update_of_the_whole_batch(pieces):
    config = dict(steps=6, eval_every=6, batch_size=8)
    torch.manual_seed(0)
    model = tiny_model("gla,attn", n_layers=2)
    whole = train(model, tiny_task(), tiny_train(**config))
    split = train(model, tiny_task(), tiny_train(**config, grad_accum=pieces))
    a, b = weights(whole.model), weights(split.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert split.tokens == whole.tokens
    assert split.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], 1e-5)


def test_accumulation_counts_ignored_targets_over_the_whole_batch():
    """Pieces with different numbers of scored targets weigh by tokens, not by piece."""
    trainer = Trainer(tiny_model(), tiny_task(), tiny_train(grad_accum=2))
    inputs, targets = next(trainer.batches())
    targets = targets.clone()
    targets[: len(targets) // 2, :-1] = -100  # the first piece keeps one scored target a row
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss_split, _ = trainer.train_step(inputs, targets)
    one = Trainer(tiny_model(), tiny_task(), tiny_train())
    one.model.load_state_dict(state)
    loss_whole, _ = one.train_step(inputs, targets)
    assert loss_split == pytest.approx(loss_whole, rel=1e-5)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(
        ValueError, match=r"batch_size \(8\) must be a multiple of grad_accum \(3\)"
    ):
        TrainConfig.make(batch_size=8, grad_accum=3)


@pytest.mark.parametrize("value", ["fp16", "bfloat16", True])
def test_unknown_precisions_are_refused(value):
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.make(precision=value)


def test_train_command_takes_precision_accumulation_and_compile_flags(tmp_path):
    args = ["train", "--task", "mqar", "--arch", "gla", "--d-model", "16", "--no-progress"]
    for option in TINY_MQAR_ARGS:
        args += ["--task-option", option]
    args += ["--precision", "bf16", "--grad-accum", "2", "--compile", "--dump-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert 'precision = "bf16"' in result.output
    assert "grad_accum = 2" in result.output
    assert "compile = true" in result.output


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one():
    eager = train(tiny_model("gla"), tiny_task(), tiny_train(steps=3, eval_every=3))
    compiled = train(
        tiny_model("gla"), tiny_task(), tiny_train(steps=3, eval_every=3, compile=True)
    )
    a, b = weights(eager.model), weights(compiled.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
