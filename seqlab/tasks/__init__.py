"""Data for the lab by name: `build_task("mqar", preset="cpu", seed=1)`; `TASKS` maps names to
(config class, task class). Synthetic tasks give fixed sets with `dataset(split)`; every task
streams minibatches with `batches(split, batch_size, seed)`."""

from __future__ import annotations

from typing import Any

from seqlab.config import Config
from seqlab.tasks.base import (
    IGNORE,
    Batch,
    Examples,
    SyntheticTask,
    Task,
    evaluate_slices,
    example_accuracy,
)
from seqlab.tasks.mad import MAD_TASKS
from seqlab.tasks.mqar import MQAR
from seqlab.tasks.state_tracking import ModularAddition, Parity
from seqlab.tasks.text import Text, bits_per_byte

_CLASSES: dict[str, type[Task]] = {
    "mqar": MQAR,
    **MAD_TASKS,
    "parity": Parity,
    "modular_addition": ModularAddition,
    "text": Text,
}
TASKS: dict[str, tuple[type[Config], type[Task]]] = {
    name: (cls.Config, cls) for name, cls in _CLASSES.items()
}


def build_task(name: str, preset: str | None = None, **options: Any) -> Task:
    """The task `name`, its config from the preset's options updated by `options`. Config
    defaults are the source papers' settings; `preset="cpu"` scales a task down for a laptop."""
    config = task_config(name, preset, **options)
    return TASKS[name][1](config)


def task_config(name: str, preset: str | None = None, **options: Any) -> Config:
    """The config `build_task` would give the task, checked without building the task (no data
    is made): an unknown name, preset or option is a ValueError listing the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    config_cls, task_cls = TASKS[name]
    if preset is not None and preset not in task_cls.presets:
        raise ValueError(
            f"task {name!r} has no preset {preset!r}; valid presets: "
            f"{', '.join(task_cls.presets) or 'none'}"
        )
    base = task_cls.presets[preset] if preset is not None else {}
    return config_cls.make(**{**base, **options})


__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "Examples",
    "SyntheticTask",
    "Task",
    "bits_per_byte",
    "build_task",
    "evaluate_slices",
    "example_accuracy",
    "task_config",
]
