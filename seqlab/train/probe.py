"""Probe: train several architectures on one task with the same budget, record each run, and
compare accuracy with state size.

    rows = probe("mqar", ["attn", "gdn(num_heads=2,head_dim=32)", "gla"], steps=300)
    rows = probe_experiments(load_experiment("base.toml"), ["attn", "gdn"])
    plot_probe(rows, "probe-mqar.png", title="mqar")

From the command line: `seqlab probe --task mqar --arch attn --arch gla --out probe/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqlab.experiment import ExperimentConfig, experiment_from_dict, run_experiment
from seqlab.files import write_atomic
from seqlab.model.pattern import layers_for  # noqa: F401 (re-exported: it lived here)
from seqlab.train.results import ResultsStore
from seqlab.train.trainer import TrainConfig, TrainResult, check_model_fits, resolve_device


@dataclass
class ProbeRow:
    arch: str
    n_layers: int
    run_id: str | None
    result: TrainResult
    params: int
    state_bytes: int  # at the task's seq_len, batch 1

    @property
    def accuracy(self) -> float:
        return self.result.final.get("all", math.nan)


def human_bytes(n: float) -> str:
    """4096 → "4 KiB"."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.3g} {units[i]}"


def probe(
    task_name: str,
    archs: Sequence[str],
    preset: str | None = "cpu",
    task_options: dict[str, Any] | None = None,
    d_model: int = 64,
    n_layers: int | None = None,
    channel: str | None = "swiglu",
    train_config: TrainConfig | None = None,
    store: ResultsStore | None = None,
    on_result: Callable[[ProbeRow], None] | None = None,
) -> list[ProbeRow]:
    """Train each architecture (a pattern) on the task with the same TrainConfig and model width;
    `n_layers=None` gives each pattern its own smallest multiple ≥ 2. With `store`, each run is
    recorded, tagged "probe". Runs keep no checkpoints (the TrainConfig's out_dir is ignored)."""
    base = experiment_from_dict(
        {
            "task": {"name": task_name, "preset": preset, "options": task_options or {}},
            "model": {"d_model": d_model, "n_layers": n_layers, "channel": channel},
            "train": (train_config or TrainConfig()).model_dump(),
        }
    )
    return probe_experiments(base, archs, store=store, on_result=on_result)


def probe_experiments(
    base: ExperimentConfig,
    archs: Sequence[str],
    store: ResultsStore | None = None,
    on_result: Callable[[ProbeRow], None] | None = None,
) -> list[ProbeRow]:
    """Run `base` once per architecture, its model.pattern replaced by each; every arch is
    checked before the first trains. Runs keep no checkpoints (train.out_dir is ignored)."""
    if not archs:
        raise ValueError("probe: give at least one architecture")
    configs = []
    for arch in archs:
        try:
            configs.append(base.updated({"model.pattern": arch, "train.out_dir": None}))
        except ValueError as e:
            raise ValueError(f"arch {arch!r}: {e}") from None
    task = base.task.build()
    device = resolve_device(base.train.device)
    for arch, config in zip(archs, configs, strict=True):  # every model fits, before any trains
        try:
            check_model_fits(config.model_config_for(task.vocab_size), device)
        except ValueError as e:
            raise ValueError(f"arch {arch!r}: {e}") from None
    extra = {"tags": {"probe": base.task.name, "archs": list(archs)}}
    rows = []
    for config in configs:
        result, record = run_experiment(config, store=store, extra=extra, task=task)
        row = ProbeRow(
            arch=config.model.pattern,
            n_layers=result.model.config.n_layers,
            run_id=None if record is None else record["id"],
            result=result,
            params=result.model.num_params(),
            state_bytes=result.model.state_bytes_for(1, task.seq_len),
        )
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def plot_probe(rows: Sequence[ProbeRow], path: str | Path, title: str = "") -> Path:
    """A PNG of final accuracy ("all") against state bytes (log x), one labelled point per arch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, row in enumerate(rows):
        color = f"C{i % 10}"
        ax.scatter(row.state_bytes, 100 * row.accuracy, s=60, color=color, zorder=3)
        ax.annotate(
            row.arch,
            (row.state_bytes, 100 * row.accuracy),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=9,
            color=color,
        )
    xs = [r.state_bytes for r in rows]
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(xs) / 2.5, max(xs) * 4)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-5, 109)
    ax.set_xlabel("state bytes per sequence at the task's seq_len (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
