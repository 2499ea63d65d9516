"""Watching a run: TensorBoard event files and the learning-curve file `seqlab plot` reads.

A run with an out_dir writes, beside its checkpoints:

    <out>/tensorboard/   event files: train/loss, train/lr, train/grad_norm every update;
                         eval/<metric> (accuracy per slice, all, bits_per_byte) and
                         perf/tokens_per_s at each evaluation (`tensorboard --logdir <out>`)
    <out>/curves.json    {"label", "task", "evaluations": [{step, wall_time_s, train_time_s,
                         tokens, train_loss, lr, grad_norm, metrics}, ...]}, rewritten atomically at
                         each evaluation

A resumed run drops the events past the step it resumes from (SummaryWriter's purge_step), so
the curves of a run killed and resumed read as one run.

The trainer logs through one RunLog, which names every value once and hands it to each logger:
EventLog here, MLflow and W&B (seqlab.train.tracking) when asked for. A logger is any object with
`log(step, values)`, `flush()` (at each evaluation: what a reader of the run sees) and
`close(failed)`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Protocol

from seqlab.files import write_atomic

CURVES = "curves.json"
EVENTS = "tensorboard"


class Logger(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, failed: bool) -> None: ...


class RunLog:
    """A run's loggers as one: each value under one name and step, whichever logger takes it."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def update(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm})

    def evaluation(self, step: int, metrics: dict[str, float], tokens_per_s: float) -> None:
        values = {f"eval/{name}": value for name, value in metrics.items()}
        self.log(step, {**values, "perf/tokens_per_s": tokens_per_s})
        for logger in self.loggers:
            logger.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, values)

    def close(self, failed: bool = False) -> None:
        """Close every logger, even when one of them fails to (its error is raised after)."""
        with contextlib.ExitStack() as stack:
            for logger in self.loggers:
                stack.callback(logger.close, failed)


class EventLog:
    """Scalars into TensorBoard event files under `folder`; a run resumed at step n (its
    checkpoint's updates and evaluations logged up to n) hides the events a killed process
    logged past n, which this one logs again."""

    def __init__(self, folder: Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # Purged from resumed_at + 1 on, also for a run that starts at step 0: events that a
        # process killed before its first checkpoint logged are not this run's (steps from 1).
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


def json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_curves(out: Path, label: str, task: str, evaluations: list[dict[str, Any]]) -> None:
    """<out>/curves.json, atomically (non-finite numbers as null)."""
    clean = [
        {
            **{k: json_number(v) if isinstance(v, float) else v for k, v in e.items()},
            "metrics": {k: json_number(v) for k, v in e["metrics"].items()},
        }
        for e in evaluations
    ]
    text = json.dumps({"label": label, "task": task, "evaluations": clean}, allow_nan=False)
    write_atomic(out / CURVES, lambda tmp: Path(tmp).write_text(text))


def read_curves(run: str | Path) -> dict[str, Any]:
    """The curves of a run folder (or of a curves.json file); a ValueError names what is
    missing or damaged."""
    path = Path(run)
    if path.is_dir():
        path = path / CURVES
    if not path.is_file():
        raise ValueError(
            f"{path}: no such file; `seqlab plot` takes run folders of `seqlab train --out` "
            f"(each holds {CURVES} once it has evaluated)"
        )
    try:
        data = json.loads(path.read_text())
        check_curves(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged curves file ({type(e).__name__}: {e})") from None
    return data


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, int | float) and not isinstance(x, bool))


def check_curves(data: Any) -> None:
    """A ValueError naming the first thing a plot cannot use: curves as `write_curves` writes
    them (a label, at least one evaluation, integer steps, numbers or null as values)."""
    if not isinstance(data, dict) or not isinstance(data.get("label"), str):
        raise ValueError("expected an object with a text label and a list of evaluations")
    evaluations = data.get("evaluations")
    if not isinstance(evaluations, list) or not evaluations:
        raise ValueError(f"evaluations is {evaluations!r}, expected a non-empty list")
    for i, e in enumerate(evaluations):
        if not isinstance(e, dict):
            raise ValueError(f"evaluation {i} is {e!r}, not an object")
        if isinstance(e.get("step"), bool) or not isinstance(e.get("step"), int):
            raise ValueError(f"evaluation {i}: step is {e.get('step')!r}, not an integer")
        if not isinstance(e.get("metrics"), dict):
            raise ValueError(f"evaluation {i}: metrics is {e.get('metrics')!r}, not an object")
        values = {**{k: e.get(k) for k in ("wall_time_s", "train_loss")}, **e["metrics"]}
        for k, v in values.items():
            if not _number(v):
                raise ValueError(f"evaluation {i}: {k} is {v!r}, not a number")


def held_out_metric(runs: list[dict[str, Any]]) -> str:
    """The held-out metric the runs share that a person follows: bits per byte where every run
    has it (text), else accuracy over all slices."""
    has = [
        {k for e in r["evaluations"] for k, v in e["metrics"].items() if v is not None}
        for r in runs
    ]
    return "bits_per_byte" if all("bits_per_byte" in h for h in has) else "all"


def plot_curves(runs: list[dict[str, Any]], path: str | Path, labels: list[str]) -> Path:
    """A PNG of the runs' learning curves: training loss and the held-out metric against steps
    (top) and against wall time (bottom), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = held_out_metric(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    for run, label in zip(runs, labels, strict=True):
        ev = run["evaluations"]
        steps = [e["step"] for e in ev]
        walls = [e.get("wall_time_s") for e in ev]
        loss = [e.get("train_loss") for e in ev]
        held = [e["metrics"].get(metric) for e in ev]
        if metric == "all":
            held = [None if v is None else 100 * v for v in held]
        for row, xs in ((0, steps), (1, walls)):
            if row == 1 and any(w is None for w in walls):
                continue  # an older run folder without times
            for col, ys in ((0, loss), (1, held)):
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
                if pts:
                    axes[row][col].plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    held_name = "held-out bits per byte" if metric == "bits_per_byte" else "held-out accuracy %"
    for row, xlabel in ((0, "step"), (1, "wall time (s)")):
        for col, ylabel in ((0, "training loss (mean since last evaluation)"), (1, held_name)):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
