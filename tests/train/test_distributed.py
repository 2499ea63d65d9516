"""Data parallel training: `seqlab train` under torchrun with DDP and FSDP2 on CPU (gloo, two real
processes) gives the loss curve and the weights of the one-process run of the same config; rank 0
alone writes; a killed run resumes, in the same or another number of processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.files import FolderInUse, exclusive_folder
from seqlab.tasks import IGNORE
from seqlab.train.distributed import (
    Place,
    World,
    check_world,
    optimizer_by_index,
    optimizer_by_name,
)
from seqlab.train.results import ResultsStore
from seqlab.train.trainer import TrainConfig, Trainer, lm_loss
from tests.train.conftest import TINY_MQAR_ARGS, tiny_model, tiny_task, tiny_train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# One thread per process: two ranks share the two cores of a small machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_args(out: Path, *extra: str, steps: int = STEPS, eval_every: int = 1) -> list[str]:
    """`seqlab train` arguments of a tiny two-layer run (a GLA block and an attention block)
    that evaluates, and so logs its training loss, after every update."""
    task = [arg for option in TINY_MQAR_ARGS for arg in ("--task-option", option)]
    return [
        "train",
        "--task",
        "mqar",
        *task,
        "--arch",
        "gla,attn",
        "--d-model",
        "16",
        "--n-layers",
        "2",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--eval-every",
        str(eval_every),
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def torchrun(nproc: int, args: list[str], results: Path) -> list[str]:
    """The command line of `seqlab train` in `nproc` processes on this machine."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [
        *launcher,
        "--standalone",  # its own rendezvous on a free port: tests may run side by side
        "-m",
        "seqlab.cli",
        *args,
        "--results",
        str(results),
    ]


def run_torchrun(
    nproc: int, args: list[str], results: Path, env: dict[str, str] = ENV, fails: bool = False
) -> subprocess.CompletedProcess:
    """Run `torchrun(...)` to its end; it must succeed, or with `fails` exit non-zero."""
    done = subprocess.run(
        torchrun(nproc, args, results), env=env, capture_output=True, text=True, timeout=300
    )
    assert (done.returncode != 0) == fails, done.stdout + done.stderr
    return done


def run_alone(args: list[str], results: Path):
    """The same command in this process, without torchrun."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = CliRunner().invoke(app, [*args, "--results", str(results)])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output
    return done


def curve(out: Path) -> list[dict]:
    return json.loads((out / "curves.json").read_text())["evaluations"]


def final_weights(out: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    assert json.loads((out / "latest.json").read_text())["step"] == steps
    return load_file(out / f"step-{steps:08d}" / "model.safetensors")


def final_optimizer(out: Path, steps: int = STEPS) -> dict:
    return torch.load(out / f"step-{steps:08d}" / "trainer.pt", weights_only=True)["optimizer"]


def assert_same_run(
    run: Path, reference: Path, steps: int = STEPS, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    """The loss curve (one loss per update), the gradient norms, the held-out metrics, the
    final weights (to rtol, atol) and the optimizer state of two runs agree to float
    round-off."""
    got, want = curve(run), curve(reference)
    assert [e["step"] for e in got] == [e["step"] for e in want]
    losses = torch.tensor([e["train_loss"] for e in got], dtype=torch.float64)
    torch.testing.assert_close(
        losses,
        torch.tensor([e["train_loss"] for e in want], dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )
    norms = torch.tensor([e["grad_norm"] for e in got], dtype=torch.float64)
    torch.testing.assert_close(
        norms, torch.tensor([e["grad_norm"] for e in want], dtype=torch.float64), rtol=rtol, atol=0
    )
    assert [e["lr"] for e in got] == pytest.approx([e["lr"] for e in want], rel=1e-12)
    for a, b in zip(got, want, strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-9), a["step"]
    assert got[-1]["tokens"] == want[-1]["tokens"]
    a, b = final_weights(run, steps), final_weights(reference, steps)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)
    oa, ob = final_optimizer(run, steps), final_optimizer(reference, steps)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["step"], ob["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            # moments that cancel to near zero differ by round-off relative to the tensor's scale
            x, y = oa["state"][i][key], ob["state"][i][key]
            scale = y.abs().max().item()
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale, msg=f"{key} of {i}")


def files(out: Path) -> list[str]:
    """The run folder's files, TensorBoard event files by folder (their names hold pid and
    time)."""
    names = []
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out)
            names.append(f"{rel.parent}/<events>" if "tfevents" in p.name else str(rel))
    return names


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    """The one-process run: the same command and config (`--distributed ddp`), no torchrun."""
    out = tmp_path_factory.mktemp("alone")
    run_alone(train_args(out / "run", "--distributed", "ddp"), out / "results.db")
    return out / "run"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_train_like_one(kind, alone, tmp_path):
    out = tmp_path / "run"
    done = run_torchrun(2, train_args(out, "--distributed", kind), tmp_path / "results.db")
    assert_same_run(out, alone)
    # rank 0 alone prints, records and writes: one table, one record, the same files
    assert done.stdout.count("trained 8 steps") == 1, done.stdout
    assert done.stdout.count("recorded run") == 1, done.stdout
    (record,) = ResultsStore(tmp_path / "results.db").runs()
    assert record["env"]["world_size"] == 2 and record["train"]["distributed"] == kind
    assert files(out) == files(alone)
    assert files(out).count("tensorboard/<events>") == 1


def test_accumulation_under_ddp_trains_like_one_process(alone, tmp_path):
    out = tmp_path / "run"
    args = train_args(out, "--distributed", "ddp", "--grad-accum", "2")
    run_torchrun(2, args, tmp_path / "results.db")
    assert_same_run(out, alone)


def test_rank_0_alone_logs_to_mlflow_and_wandb(tmp_path):
    """Under torchrun, one MLflow run and one W&B run, each update once, from rank 0."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    from tests.train.test_tracking import wandb_run

    out = tmp_path / "run"
    args = train_args(out, "--distributed", "ddp", "--mlflow", "out", "--wandb", "p")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {n: str(tmp_path / n.lower()) for n in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")}
    run_torchrun(2, args, tmp_path / "results.db", env=env)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "seqlab"]
    (run,) = client.search_runs([experiment.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    (folder,) = (out / "wandb").glob("offline-run-*")
    assert sorted(wandb_run(folder)["history"]) == list(range(1, STEPS + 1))
    losses = [e["train_loss"] for e in curve(out)]  # one update per evaluation here
    got = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")
    )
    assert [v for _, v in got] == pytest.approx(losses, rel=1e-12)


def test_each_rank_loss_weighs_the_global_batch_tokens():
    """Shards with different numbers of scored targets: the ranks' gradients, averaged as DDP
    and FSDP average them, are the gradient of the whole batch's token mean."""
    trainer = Trainer(tiny_model("gla,attn", n_layers=2), tiny_task(), tiny_train(grad_accum=2))
    inputs, targets = next(trainer.batches())
    targets = targets.clone()
    targets[:3, :-2] = IGNORE  # the first rank's first micro-batch keeps few scored targets
    one = Trainer(tiny_model("gla,attn", n_layers=2), tiny_task(), tiny_train())
    one.model.load_state_dict(trainer.model.state_dict())
    whole = lm_loss(one.model(inputs).logits, targets)
    whole.backward()
    grads, losses = [], []
    for rank in range(2):
        trainer.world = World("fsdp", torch.device("cpu"), Place(rank, 2, rank), owned=False)
        trainer.optimizer.zero_grad(set_to_none=True)
        losses.append(trainer.shard_backward(inputs, targets).item())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert sum(losses) / 2 == pytest.approx(whole.item(), rel=1e-6)
    for n, p in one.model.named_parameters():
        torch.testing.assert_close((grads[0][n] + grads[1][n]) / 2, p.grad, rtol=1e-5, atol=1e-7)


def test_optimizer_state_keys_round_trip():
    trainer = Trainer(tiny_model(), tiny_task(), tiny_train())
    trainer.train_step(*next(trainer.batches()))
    plain = trainer.optimizer.state_dict()
    names = [[trainer.param_names[i] for i in g["params"]] for g in plain["param_groups"]]
    by_name = optimizer_by_name(plain, names)
    assert set(by_name["state"]) <= {n for group in names for n in group}
    back = optimizer_by_index(by_name)
    assert back["param_groups"] == plain["param_groups"]
    assert back["state"].keys() == plain["state"].keys()
    with pytest.raises(ValueError, match=r"param groups of \[.*\] parameters"):
        optimizer_by_name(plain, [names[0]])


@pytest.mark.parametrize(
    ("kind", "batch", "accum", "size", "match"),
    [
        (
            "ddp",
            6,
            2,
            2,
            r"batch_size \(6\) must be a multiple of world size × grad_accum "
            r"\(2 × 2 = 4\)",
        ),
        ("fsdp", 9, 1, 2, r"batch_size \(9\) must be a multiple of world size × grad_accum"),
        ("none", 8, 1, 2, r"one of 2 .*train\.distributed is \"none\": pick --distributed ddp"),
    ],
)
def test_settings_that_cannot_run_in_the_job_are_refused(kind, batch, accum, size, match):
    with pytest.raises(ValueError, match=match):
        check_world(kind, batch, accum, size)


def test_one_process_accepts_any_batch_and_every_kind():
    for kind in ("none", "ddp", "fsdp"):
        check_world(kind, 7, 7, 1)


def test_torchrun_refuses_an_indivisible_batch_before_training(tmp_path):
    out = tmp_path / "run"
    args = train_args(out, "--distributed", "ddp", "--batch-size", "6", "--grad-accum", "2")
    done = run_torchrun(2, args, tmp_path / "results.db", fails=True)
    assert "batch_size (6) must be a multiple of world size × grad_accum (2 × 2 = 4)" in " ".join(
        done.stdout.split()
    )
    assert not out.exists() or not list(out.glob("step-*"))


def test_the_distributed_flag_reaches_the_config():
    args = ["train", "--task", "mqar", "--arch", "gla", "--distributed", "fsdp", "--dump-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert 'distributed = "fsdp"' in result.output
    with pytest.raises(ValueError, match="distributed"):
        TrainConfig.make(distributed="deepspeed")


# Killed and resumed: a run long enough to be killed after a checkpoint and before its end.
LONG, EVERY = 40, 5


def checkpointed_step(out: Path) -> int:
    try:
        return json.loads((out / "latest.json").read_text())["step"]
    except (FileNotFoundError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc): torchrun starts each rank in a session of its
    own, so killing the launcher's process group would leave the ranks running."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie holds no lock and no port


def kill_after_a_checkpoint(command: list[str], out: Path, ranks_at_least: int = 2) -> int:
    """Start `command`, SIGKILL the job (the launcher and every rank at once, as a scheduler
    ends a job) once it has written its second checkpoint, and return the step of its last
    checkpoint. `ranks_at_least`: the processes below the launcher (0 for one process)."""
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while checkpointed_step(out) < 2 * EVERY and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)
    ranks = descendants(run.pid)
    for pid in [run.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stdout.read().decode()
    assert len(ranks) >= ranks_at_least, ranks  # the launcher's ranks were there to be killed
    for pid in ranks:  # gone before anything resumes in their folder
        while running(pid):
            assert time.monotonic() < deadline, f"rank {pid} survived SIGKILL"
            time.sleep(0.005)
    # The lock goes with the last process holding the folder's lock file; a process a rank forked
    # between the snapshot of its descendants and the kill (a subprocess before its exec) can
    # hold it a moment longer, as a scheduler's job may: wait for that, not for ever.
    while not lock_free(out):
        assert time.monotonic() < deadline, f"{out} stays locked after its job was killed"
        time.sleep(0.01)
    at_kill = checkpointed_step(out)
    assert 2 * EVERY <= at_kill < LONG, "the run finished before it was killed"
    return at_kill


def lock_free(out: Path) -> bool:
    """Whether `out`'s lock (seqlab.files.exclusive_folder) can be taken now."""
    try:
        with exclusive_folder(out):
            return True
    except FolderInUse:
        return False


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    long = dict(steps=LONG, eval_every=EVERY)
    uninterrupted = subprocess.Popen(
        torchrun(2, train_args(reference, "--distributed", "ddp", **long), tmp_path / "a.db"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    args = train_args(killed, "--distributed", "ddp", **long)
    at_kill = kill_after_a_checkpoint(torchrun(2, args, tmp_path / "b.db"), killed)
    resumed = run_torchrun(2, args, tmp_path / "b.db")
    assert resumed.stdout.count(f"resumed from the checkpoint at step {at_kill}") == 1
    assert uninterrupted.wait(timeout=300) == 0
    a, b = final_weights(reference, LONG), final_weights(killed, LONG)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    clocks = ("wall_time_s", "train_time_s")
    timeless = [{k: v for k, v in e.items() if k not in clocks} for e in curve(killed)]
    assert timeless == [{k: v for k, v in e.items() if k not in clocks} for e in curve(reference)]


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_in_one_process(tmp_path):
    """The checkpoint of a two-process FSDP run holds whole weights and optimizer state: one
    process resumes it and ends like a run that was one process throughout."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    long = dict(steps=LONG, eval_every=EVERY)
    run_alone(train_args(reference, **long), tmp_path / "a.db")
    args = train_args(killed, "--distributed", "fsdp", **long)
    at_kill = kill_after_a_checkpoint(torchrun(2, args, tmp_path / "b.db"), killed)
    resumed = run_alone(train_args(killed, **long), tmp_path / "b.db")
    assert f"resumed from the checkpoint at step {at_kill}" in resumed.output
    assert_same_run(killed, reference, steps=LONG, rtol=1e-4)
