"""A run killed with SIGKILL resumes from its last checkpoint and ends with the same weights as
one that was never interrupted. The runs are real `seqlab train` processes."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.train.conftest import TINY_MQAR_ARGS

STEPS, EVAL_EVERY = 300, 10
# One thread: tiny models gain nothing from more, and lose much when other processes share the CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(out) -> list[str]:
    task_options = [arg for option in TINY_MQAR_ARGS for arg in ("--task-option", option)]
    return [
        sys.executable,
        "-m",
        "seqlab.cli",
        "train",
        "--task",
        "mqar",
        *task_options,
        "--arch",
        "gla",
        "--d-model",
        "16",
        "--n-layers",
        "1",
        "--steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--eval-every",
        str(EVAL_EVERY),
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-record",
        "--no-progress",
    ]


def checkpointed_step(out) -> int:
    try:
        return json.loads((out / "latest.json").read_text())["step"]
    except FileNotFoundError:
        return 0


def final_weights(out) -> dict[str, torch.Tensor]:
    assert checkpointed_step(out) == STEPS
    return load_file(out / f"step-{STEPS:08d}" / "model.safetensors")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = subprocess.Popen(command(reference), env=ENV, stdout=subprocess.DEVNULL)
    run = subprocess.Popen(
        command(killed), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while checkpointed_step(killed) < 2 * EVAL_EVERY and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stdout.read().decode()
    at_kill = checkpointed_step(killed)
    assert 2 * EVAL_EVERY <= at_kill < STEPS, "the run finished before it was killed"

    resumed = subprocess.run(command(killed), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from the checkpoint at step {at_kill}" in resumed.stdout
    assert uninterrupted.wait(timeout=300) == 0
    a, b = final_weights(reference), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
