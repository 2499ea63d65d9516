"""Sequence parallelism in the trainer: `seqlab train --sequence-parallel N` under torchrun (gloo,
real processes) gives the loss curve, gradient norms, held-out metrics and final weights of the
one-process run of the same config; settings that cannot run are refused before any training;
the checkpoint of a split run resumes in one process, and a one-process run's resumes split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.parallel import run_group
from seqlab.tasks import build_task
from seqlab.train.distributed import check_world
from seqlab.train.results import ResultsStore
from seqlab.train.trainer import (
    TrainConfig,
    Trainer,
    lm_loss,
)
from tests.train.conftest import tiny_model, tiny_task, tiny_train
from tests.train.test_distributed import (
    EVERY,
    LONG,
    assert_same_run,
    files,
    kill_after_a_checkpoint,
    run_alone,
    run_torchrun,
    torchrun,
    train_args,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

# Weights: a split sequence sums its states in another order than one process, and Adam divides
# each gradient entry by its own running scale, so the round-off of a small entry moves its weight
# by more than the weight's own round-off (up to 3e-7 seen after 8 steps, weights of ~0.07).
ATOL = 1e-6
# A hybrid (GLA state exchange, attention gathering keys and values) and a pure recurrent model
# (Mamba-2: per-head gates and a short convolution taking the previous rank's tail; two chunks
# per rank's slice of T = 16 / 2).
HYBRID = "gla,attn"
RECURRENT = "mamba2(head_dim=8,d_state=8,chunk_size=4)"


def sp_args(out: Path, arch: str, *extra: str, **options) -> list[str]:
    """`seqlab train` arguments of test_distributed's tiny run, with another pattern."""
    args = train_args(out, *extra, **options)
    args[args.index("--arch") + 1] = arch
    return args


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The one-process run of each pattern, made once per module."""
    runs: dict[str, Path] = {}

    def run(arch: str) -> Path:
        if arch not in runs:
            out = tmp_path_factory.mktemp("alone")
            run_alone(sp_args(out / "run", arch), out / "results.db")
            runs[arch] = out / "run"
        return runs[arch]

    return run


@pytest.mark.parametrize(
    ("arch", "kind"), [(HYBRID, "ddp"), (RECURRENT, "ddp"), ("gdn,attn", "fsdp")]
)
def test_two_ranks_sharing_each_sequence_train_like_one_process(arch, kind, alone, tmp_path):
    out = tmp_path / "run"
    args = sp_args(out, arch, "--distributed", kind, "--sequence-parallel", "2")
    done = run_torchrun(2, args, tmp_path / "results.db")
    reference = alone(arch)
    assert_same_run(out, reference, atol=ATOL)
    assert done.stdout.count("recorded run") == 1, done.stdout
    (record,) = ResultsStore(tmp_path / "results.db").runs()
    assert record["env"]["world_size"] == 2
    assert record["train"]["sequence_parallel"] == 2
    assert files(out) == files(reference)


def layout_worker(rank: int, world_size: int) -> dict:
    """One rank of a 4-process job with sequence_parallel 2: what its trainer made of the job,
    and the token ids its model was given in one update."""
    import torch.distributed as dist

    trainer = Trainer(
        tiny_model(HYBRID, n_layers=2),
        tiny_task(),
        tiny_train(distributed="ddp", sequence_parallel=2),
    )
    seen = []
    trainer.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    world = trainer.world
    loss, _ = trainer.train_step(*next(trainer.batches()))
    groups = {m.sequence_group for m in trainer.model.modules() if hasattr(m, "sequence_group")}
    out = {
        "replica": world.replica,
        "replicas": world.replicas,
        "group": dist.get_process_group_ranks(world.sequence_group),
        "mixer_groups_are_the_world_s": groups == {world.sequence_group},
        "seen": seen,
        "loss": loss,
    }
    trainer.release()
    return out


def test_ranks_take_their_replica_rows_and_their_slice_of_t():
    """Rank r trains rows of replica r // 2 and tokens [(r % 2)·T/2, (r % 2 + 1)·T/2) of them."""
    trainer = Trainer(tiny_model(HYBRID, n_layers=2), tiny_task(), tiny_train())
    inputs, targets = next(trainer.batches())
    whole = lm_loss(trainer.model(inputs).logits, targets).item()
    B, T = inputs.shape
    for rank, got in enumerate(run_group(layout_worker, 4, timeout=300)):
        replica, part = divmod(rank, 2)
        assert (got["replica"], got["replicas"]) == (replica, 2)
        assert got["group"] == [2 * replica, 2 * replica + 1]
        assert got["mixer_groups_are_the_world_s"]
        rows = slice(replica * B // 2, (replica + 1) * B // 2)
        (ids,) = got["seen"]
        assert torch.equal(ids, inputs[rows, part * T // 2 : (part + 1) * T // 2])
        assert got["loss"] == pytest.approx(whole, rel=1e-5)  # the global batch's mean


@pytest.mark.slow
def test_two_replicas_of_two_ranks_with_accumulation_train_like_one_process(alone, tmp_path):
    """Four processes: data-parallel size 2 × sequence groups of 2, each replica's rows in two
    micro-batches."""
    out = tmp_path / "run"
    args = sp_args(
        out, HYBRID, "--distributed", "ddp", "--sequence-parallel", "2", "--grad-accum", "2"
    )
    run_torchrun(4, args, tmp_path / "results.db")
    assert_same_run(out, alone(HYBRID), atol=ATOL)


def test_torchrun_refuses_a_mixer_that_cannot_split_before_training(tmp_path):
    out = tmp_path / "run"
    args = sp_args(out, "gla,lstm", "--distributed", "ddp", "--sequence-parallel", "2")
    done = run_torchrun(2, args, tmp_path / "results.db", fails=True)
    said = " ".join(done.stdout.split())
    assert "these mixers cannot run on a slice of the sequence: lstm" in said, said
    assert not out.exists() or not list(out.glob("step-*"))


@pytest.mark.parametrize(
    ("pattern", "task", "match"),
    [
        ("gla,lstm", tiny_task, r"'gla,lstm': these mixers cannot run .*: lstm; .*covers attn"),
        ("gdn,s4d,mamba", tiny_task, r"cannot run on a slice of the sequence: mamba, s4d;"),
    ],
)
def test_a_model_or_task_that_cannot_split_is_refused_before_any_work(pattern, task, match):
    config = tiny_train(distributed="ddp", sequence_parallel=2)
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_model(pattern, n_layers=len(pattern.split(","))), task(), config)


def recall_args(out: Path, *extra: str) -> list[str]:
    """test_distributed's tiny run on MAD's in-context recall, whose sequences are 63 long."""
    args = sp_args(out, HYBRID, *extra)
    while "--task-option" in args:  # MQAR's options out
        i = args.index("--task-option")
        del args[i : i + 2]
    args[args.index("--task") + 1] = "in_context_recall"
    return [*args, "--task-option", "num_train=64", "--task-option", "num_test=16"]


def test_lengths_that_do_not_divide_among_the_group_are_padded(tmp_path):
    """T = 63 on two ranks: each batch is padded at its end to 64 with unscored targets, and the
    run equals one process."""
    assert build_task("in_context_recall", preset="cpu", num_train=8, num_test=8).seq_len == 63
    run_alone(recall_args(tmp_path / "alone"), tmp_path / "a.db")
    split = recall_args(tmp_path / "split", "--distributed", "ddp", "--sequence-parallel", "2")
    run_torchrun(2, split, tmp_path / "b.db")
    assert_same_run(tmp_path / "split", tmp_path / "alone", atol=ATOL)


def test_one_process_refuses_sequence_parallelism():
    config = tiny_train(distributed="ddp", sequence_parallel=2)
    with pytest.raises(ValueError, match=r"sequence_parallel is 2 but this process runs alone"):
        Trainer(tiny_model(HYBRID, n_layers=2), tiny_task(), config)


@pytest.mark.parametrize(
    ("kind", "batch", "accum", "size", "sequence", "match"),
    [
        ("ddp", 8, 1, 4, 3, r"sequence_parallel \(3\) must divide the world size \(4\)"),
        (
            "ddp",
            6,
            2,
            4,
            2,
            r"batch_size \(6\) must be a multiple of data-parallel size \(world size 4 / "
            r"sequence_parallel 2\) × grad_accum \(2 × 2 = 4\)",
        ),
        ("none", 8, 1, 2, 2, r"\"none\": pick --distributed ddp .*sequence parallelism needs"),
        ("fsdp", 8, 1, 1, 2, r"sequence_parallel is 2 but this process runs alone"),
    ],
)
def test_sequence_layouts_that_cannot_run_are_refused(kind, batch, accum, size, sequence, match):
    with pytest.raises(ValueError, match=match):
        check_world(kind, batch, accum, size, sequence)


def test_layouts_that_fit_are_accepted():
    check_world("ddp", 2, 1, 4, 2)  # two replicas of one row each
    check_world("fsdp", 3, 1, 4, 4)  # one sequence group: the whole batch on every rank
    check_world("ddp", 8, 1, 8, 1)


def test_the_flag_reaches_the_config():
    args = ["train", "--task", "mqar", "--arch", "gla", "--sequence-parallel", "4", "--dump-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sequence_parallel = 4" in result.output


def test_sequence_parallel_is_a_strict_positive_int():
    for bad in (0, -2, True, 2.0, "2"):
        with pytest.raises(ValueError, match="sequence_parallel"):
            TrainConfig.make(sequence_parallel=bad)
    assert TrainConfig().sequence_parallel == 1


@pytest.mark.slow
def test_a_killed_sequence_parallel_run_resumes_in_one_process(tmp_path):
    """The checkpoint of a run whose sequences were split over two ranks holds the whole
    weights and optimizer state: one process resumes it and ends like a run that was one
    process throughout."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    long = dict(steps=LONG, eval_every=EVERY)
    run_alone(sp_args(reference, HYBRID, **long), tmp_path / "a.db")
    args = sp_args(killed, HYBRID, "--distributed", "ddp", "--sequence-parallel", "2", **long)
    at_kill = kill_after_a_checkpoint(torchrun(2, args, tmp_path / "b.db"), killed)
    resumed = run_alone(sp_args(killed, HYBRID, **long), tmp_path / "b.db")
    assert f"resumed from the checkpoint at step {at_kill}" in resumed.output
    assert_same_run(killed, reference, steps=LONG, rtol=1e-4, atol=ATOL)


@pytest.mark.slow
def test_a_killed_one_process_run_resumes_with_its_sequences_split(tmp_path):
    """The other way: a one-process run killed after a checkpoint resumes under torchrun with
    N = 2 and ends like the run that was one process throughout."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    long = dict(steps=LONG, eval_every=EVERY)
    run_alone(sp_args(reference, HYBRID, **long), tmp_path / "a.db")
    one = [sys.executable, "-m", "seqlab.cli", *sp_args(killed, HYBRID, **long)]
    at_kill = kill_after_a_checkpoint(
        [*one, "--results", str(tmp_path / "b.db")], killed, ranks_at_least=0
    )
    split = sp_args(killed, HYBRID, "--distributed", "ddp", "--sequence-parallel", "2", **long)
    resumed = run_torchrun(2, split, tmp_path / "b.db")
    assert resumed.stdout.count(f"resumed from the checkpoint at step {at_kill}") == 1
    assert_same_run(killed, reference, steps=LONG, rtol=1e-4, atol=ATOL)
