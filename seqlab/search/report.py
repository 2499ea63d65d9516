"""What a search found, read from its Optuna study: the Pareto front as rows, a table and a PNG,
the hypervolume over trials as a PNG, every trial as CSV, and one trial's ExperimentConfig as TOML.

The study's objectives are named by its user_attr "objectives" (else by its metric names): the
first is the quality (accuracy, maximised, or bits per byte, minimised), the others are costs
(state bytes, parameters, FLOPs per token, ...), minimised. Each trial's user_attrs say what it
was: arch, key, config, known, metrics, costs, constraints, run_id, fail_reason, duplicate_of.

Which trials the front is made of: COMPLETE trials that are feasible (every constraint ≤ 0, both
the user_attr "constraints" and those a sampler stored) and are not a duplicate of another such
trial (a duplicate carries the values of the trial it repeats, `duplicate_of`, and is shown once,
as that trial). Failed trials have no values and appear in the CSV only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import tomli_w

# optuna's own front and hypervolume: `study.best_trials` runs the same front function over all
# of a study's trials, and the hypervolume has no public entry point
from optuna._hypervolume import compute_hypervolume
from optuna.study import StudyDirection
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape
from rich.table import Table

from seqlab.files import write_atomic
from seqlab.train.probe import human_bytes

# The hypervolume's reference point lies this far (a fraction of the observed range) beyond the
# worst observed value of each objective, so the worst trials still add to the volume.
HV_MARGIN = 0.1


def objectives(study: optuna.Study) -> list[str]:
    """The objective names, quality first."""
    names = study.user_attrs.get("objectives") or study.metric_names
    if names is None:
        names = [f"objective {i}" for i in range(len(study.directions))]
    if len(names) != len(study.directions):
        raise ValueError(
            f"study {study.study_name!r} names {len(names)} objectives ({', '.join(names)}) "
            f"but has {len(study.directions)} directions"
        )
    if len(names) < 2:
        raise ValueError(
            f"study {study.study_name!r} has one objective ({names[0]}); a report needs the "
            "quality and at least one cost"
        )
    return list(names)


def feasible(trial: FrozenTrial) -> bool:
    """Every constraint ≤ 0: the user_attr "constraints" and those a sampler stored."""
    values = [*(trial.user_attrs.get("constraints") or ()), *trial.constraints.values()]
    return all(c <= 0 for c in values)


def front_candidates(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE, feasible trials, less those that duplicate another of them."""
    done = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)
    ]
    numbers = {t.number for t in done}
    return [t for t in done if t.user_attrs.get("duplicate_of") not in numbers]


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of `front_candidates`, in trial order."""
    return _get_pareto_front_trials_by_trials(front_candidates(study), study.directions)


def pareto_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial on the front: trial, the quality and each cost under their objective
    names, arch, known (name or None), run_id; sorted by the first cost, then best quality."""
    names = objectives(study)
    maximise = study.directions[0] == StudyDirection.MAXIMIZE
    rows = [
        {
            "trial": t.number,
            **dict(zip(names, t.values, strict=True)),
            "arch": t.user_attrs.get("arch"),
            "known": t.user_attrs.get("known"),
            "run_id": t.user_attrs.get("run_id"),
        }
        for t in front_trials(study)
    ]
    quality, first_cost = names[0], names[1]
    rows.sort(key=lambda r: (r[first_cost], -r[quality] if maximise else r[quality], r["trial"]))
    return rows


def _is_accuracy(name: str) -> bool:
    return "accuracy" in name


def _si(x: float) -> str:
    """1_234_000 → "1.23M"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def quality_text(name: str, value: float) -> str:
    return f"{100 * value:.1f}" if _is_accuracy(name) else f"{value:.4g}"


def quality_label(name: str, direction: StudyDirection) -> str:
    if _is_accuracy(name):
        return f"held-out {name.replace('_', ' ')} (%)"
    better = "higher" if direction == StudyDirection.MAXIMIZE else "lower"
    return f"{name.replace('_', ' ')} ({better} is better)"


def cost_text(name: str, value: float) -> str:
    """State bytes as B/KiB/MiB, counts (params, FLOPs) as k/M/G."""
    return human_bytes(value) if "bytes" in name else _si(value)


COST_LABELS = {
    "state_bytes": "state bytes per sequence",
    "params": "parameters",
    "flops_per_token": "FLOPs per token",
}


def cost_label(name: str) -> str:
    return COST_LABELS.get(name, name.replace("_", " "))


def pareto_table(study: optuna.Study) -> Table:
    """The front as a terminal table, in human units; the quality as a percentage for accuracy."""
    names = objectives(study)
    rows = pareto_rows(study)
    n_feasible = len(front_candidates(study))
    table = Table(
        title=f"Pareto front of study {escape(study.study_name)!r}: {len(rows)} of {n_feasible} "
        "completed feasible trials"
    )
    quality = names[0]
    table.add_column("trial", justify="right")
    table.add_column(f"{quality} %" if _is_accuracy(quality) else quality, justify="right")
    for cost in names[1:]:
        table.add_column(cost_label(cost), justify="right")
    for col in ("arch", "known", "run"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            str(row["trial"]),
            quality_text(quality, row[quality]),
            *(cost_text(c, row[c]) for c in names[1:]),
            escape(row["arch"] or "–"),
            escape(row["known"] or ""),
            escape(str(row["run_id"] or "–")),
        )
    return table


def _counts(study: optuna.Study) -> str:
    """ "12 trials: 9 complete (1 infeasible, 1 duplicate), 2 failed, 1 running"."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    infeasible = sum(not feasible(t) for t in complete)
    candidates = {t.number for t in front_candidates(study)}
    duplicates = sum(t.number not in candidates and feasible(t) for t in complete)
    notes = [f"{infeasible} infeasible"] if infeasible else []
    notes += [f"{duplicates} duplicate{'s' * (duplicates != 1)}"] if duplicates else []
    parts = [f"{len(complete)} complete" + (f" ({', '.join(notes)})" if notes else "")]
    for state in (TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        n = sum(t.state == state for t in trials)
        if n:
            parts.append(f"{n} {state.name.lower().replace('fail', 'failed')}")
    return f"{len(trials)} trials: {', '.join(parts)}"


def _require_candidates(study: optuna.Study, what: str) -> list[FrozenTrial]:
    candidates = front_candidates(study)
    if not candidates:
        raise ValueError(
            f"study {study.study_name!r} has no completed feasible trial to {what} "
            f"({_counts(study)})"
        )
    return candidates


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        _pyplot().close(fig)
    return path


def _cost_axis(ax, name: str, values: Sequence[float]) -> None:
    """Log x for positive costs, labelled in the cost's units (bytes by powers of 2)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xlabel(cost_label(name))
    if min(values) <= 0:
        return
    ax.set_xlabel(f"{cost_label(name)} (log scale)")
    in_bytes = "bytes" in name
    base = 2 if in_bytes else 10
    ax.set_xscale("log", base=base)
    lo, hi = min(values), max(values)
    pad = (hi / lo) ** 0.08 if hi > lo else 2.0
    ax.set_xlim(lo / pad, hi * pad)
    text = FuncFormatter(lambda x, _: cost_text(name, x))
    ax.xaxis.set_major_locator(LogLocator(base=base, numticks=8))
    ax.xaxis.set_major_formatter(text)
    decades = math.log10(hi / lo)
    # few major ticks: label some minor ones too (2 and 5, or 2, 3 and 5, times a power of ten)
    marks = (2, 3, 5) if decades < 1 else (2, 5) if decades < 2 else ()
    if in_bytes or not marks:
        ax.xaxis.set_minor_formatter(NullFormatter())
        return

    def minor(x: float, _pos: int | None = None) -> str:
        mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
        return cost_text(name, x) if mantissa in marks else ""

    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="x", which="minor", labelsize=8)


def _front_2d(points: list[tuple[float, float, FrozenTrial]], maximise: bool) -> list:
    """The (cost, quality) points no other point beats on both: best quality at ≤ that cost."""
    best: list = []
    for x, y, t in sorted(points, key=lambda p: (p[0], -p[1] if maximise else p[1])):
        if not best or (y > best[-1][1] if maximise else y < best[-1][1]):
            best.append((x, y, t))
    return best


def plot_pareto(study: optuna.Study, path: str | os.PathLike) -> Path:
    """A PNG with one panel per cost: the quality against that cost for every completed trial.
    Trials on the front (all objectives at once) are large and coloured, dominated ones small and
    faded, infeasible ones grey crosses; failed trials and duplicates are counted in the title.
    The step line is the best quality reached at that cost or less; known architectures are
    ringed and labelled by name, the trials on the step line by their arch."""
    plt = _pyplot()
    names = objectives(study)
    quality, costs = names[0], names[1:]
    maximise = study.directions[0] == StudyDirection.MAXIMIZE
    candidates = _require_candidates(study, "plot")
    front = {t.number for t in front_trials(study)}
    infeasible = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not feasible(t)
    ]
    scale = 100.0 if _is_accuracy(quality) else 1.0

    fig, axes = plt.subplots(1, len(costs), figsize=(5.6 * len(costs), 4.6), squeeze=False)
    for j, (ax, cost) in enumerate(zip(axes[0], costs, strict=True)):
        col = j + 1
        pts = [(t.values[col], scale * t.values[0], t) for t in candidates]
        dominated = [p for p in pts if p[2].number not in front]
        on_front = [p for p in pts if p[2].number in front]
        if dominated:
            ax.scatter(
                *zip(*[p[:2] for p in dominated], strict=True),
                s=18,
                color="0.55",
                alpha=0.35,
                zorder=2,
                label="dominated",
            )
        if infeasible:
            ax.scatter(
                [t.values[col] for t in infeasible],
                [scale * t.values[0] for t in infeasible],
                s=22,
                marker="x",
                color="0.6",
                alpha=0.6,
                zorder=2,
                label="infeasible (a constraint > 0)",
            )
        ax.scatter(
            *zip(*[p[:2] for p in on_front], strict=True),
            s=46,
            color="C0",
            edgecolor="white",
            linewidth=0.6,
            zorder=4,
            label="Pareto front",
        )
        known = [p for p in pts if p[2].user_attrs.get("known")]
        if known:
            ax.scatter(
                *zip(*[p[:2] for p in known], strict=True),
                s=90,
                facecolor="none",
                edgecolor="C3",
                linewidth=1.2,
                zorder=5,
                label="known architecture",
            )
        step = _front_2d(pts, maximise)
        all_x = [p[0] for p in pts] + [t.values[col] for t in infeasible]
        xs = [p[0] for p in step] + [max(all_x)]
        ys = [p[1] for p in step] + [step[-1][1]]
        ax.step(
            xs,
            ys,
            where="post",
            color="C0",
            lw=1.4,
            alpha=0.8,
            zorder=3,
            label=f"best {quality.replace('_', ' ')} at ≤ this cost",
        )
        # labelled: known architectures by name, and the trials on this panel's step by arch
        for x, y, t in {p[2].number: p for p in step + known}.values():
            name = t.user_attrs.get("known")
            text = name or t.user_attrs.get("arch") or f"trial {t.number}"
            if len(text) > 28:
                text = text[:27] + "…"
            ax.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8 if name else 7,
                fontweight="bold" if name else "normal",
                color="C3" if name else "C0",
                zorder=5,
            )
        _cost_axis(ax, cost, all_x)
        ax.set_ylabel(quality_label(quality, study.directions[0]))
        ax.set_title(f"{quality.replace('_', ' ')} against {cost_label(cost)}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"study {study.study_name}: {len(front)} trials on the front; {_counts(study)}",
        fontsize=9,
    )
    return _save(fig, path)


def _logged(study: optuna.Study) -> list[bool]:
    """Which objectives the hypervolume takes as log10: the costs whose values are all positive
    over the completed feasible trials."""
    values = np.array([t.values for t in front_candidates(study)])
    return [False] + [bool((values[:, i] > 0).all()) for i in range(1, values.shape[1])]


def hypervolume_history(study: optuna.Study) -> tuple[list[int], list[float]]:
    """(trial numbers, hypervolume after each) over the COMPLETE trials in number order.

    The hypervolume is that of the front of the feasible trials so far, in a normalised space:
    every objective is turned into a loss (the quality negated when maximised), each cost whose
    values are all positive is taken as log10 (costs span orders of magnitude, and halving the
    state should count the same at 1 KiB as at 1 MiB), then each objective is scaled so that its
    best observed value (over all completed feasible trials) is 0 and its worst is 1. The
    reference point is 1 + HV_MARGIN in every objective, and the volume is given as a fraction of
    the box from the ideal point (0, ..., 0) to the reference: 1.0 would be one trial best at
    everything. The scaling depends on the trials observed, so values compare within one study
    only."""
    objectives(study)
    candidates = {t.number for t in _require_candidates(study, "measure")}
    complete = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
    )
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
    loss = {t.number: signs * np.asarray(t.values, dtype=float) for t in complete}
    kept = np.array([loss[n] for n in sorted(candidates)])
    logged = np.array(_logged(study))
    kept = np.where(logged, np.log10(np.where(logged, kept, 1.0)), kept)
    lo, hi = kept.min(axis=0), kept.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    reference = np.full(len(signs), 1.0 + HV_MARGIN)
    box = float(np.prod(reference))

    def normalised(v: np.ndarray) -> np.ndarray:
        return (np.where(logged, np.log10(np.where(logged, v, 1.0)), v) - lo) / span

    numbers, values, points = [], [], []
    hv = 0.0
    for t in complete:
        if t.number in candidates:
            points.append(normalised(loss[t.number]))
            hv = float(compute_hypervolume(np.array(points), reference)) / box
        numbers.append(t.number)
        values.append(hv)
    return numbers, values


def plot_hypervolume(study: optuna.Study, path: str | os.PathLike) -> Path:
    """A PNG of `hypervolume_history` against the trial number; a dot where a trial raised it,
    crosses under the axis for failed and infeasible trials."""
    plt = _pyplot()
    names = objectives(study)
    numbers, values = hypervolume_history(study)
    trials = study.get_trials(deepcopy=False)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.step(numbers, values, where="post", color="C0", lw=1.4, label="hypervolume of the front")
    raised = [
        (n, v)
        for i, (n, v) in enumerate(zip(numbers, values, strict=True))
        if v > (values[i - 1] if i else 0.0)
    ]
    ax.scatter(
        *zip(*raised, strict=True),
        s=22,
        color="C0",
        zorder=3,
        label="a trial that improved the front",
    )
    bottom = ax.get_xaxis_transform()
    for marks, color, label in (
        ([t.number for t in trials if t.state == TrialState.FAIL], "C3", "failed"),
        (
            [t.number for t in trials if t.state == TrialState.COMPLETE and not feasible(t)],
            "0.5",
            "infeasible",
        ),
    ):
        if marks:
            ax.scatter(
                marks,
                [0.03] * len(marks),
                transform=bottom,
                marker="x",
                s=20,
                color=color,
                zorder=3,
                label=label,
            )
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume (fraction of the reference box)")
    ax.set_ylim(-0.05 * max(values), 1.15 * max(values))
    ax.set_xlim(-0.5, max(t.number for t in trials) + 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    costs = ", ".join(
        f"log {c}" if log else c for c, log in zip(names[1:], _logged(study)[1:], strict=True)
    )
    ax.set_title(
        f"study {study.study_name}: hypervolume over trials\n"
        f"objectives {names[0]}, {costs}, each scaled best 0 to worst 1; "
        f"reference {1 + HV_MARGIN:g}",
        fontsize=9,
    )
    return _save(fig, path)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True)
    return value


def _keys(dicts: Iterable[dict]) -> list[str]:
    """Every key, in order of first appearance."""
    seen: dict[str, None] = {}
    for d in dicts:
        seen.update(dict.fromkeys(d))
    return list(seen)


def trials_csv(study: optuna.Study, path: str | os.PathLike) -> Path:
    """Every trial as one CSV row, raw numbers (accuracy as a fraction, bytes as bytes): its
    state, values under the objective names, whether it is feasible and on the front, what it
    was (arch, key, known, duplicate_of, run_id, fail_reason), the sampler's params ("param."),
    costs ("cost."), metrics ("metric."), constraints (JSON), start, end and duration."""
    names = objectives(study)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    front = {t.number for t in front_trials(study)}
    params = _keys(t.params for t in trials)
    costs = _keys(t.user_attrs.get("costs") or {} for t in trials)
    metrics = _keys(t.user_attrs.get("metrics") or {} for t in trials)
    info = ["arch", "key", "known", "duplicate_of", "run_id", "fail_reason"]
    header = [
        "number",
        "state",
        *names,
        "feasible",
        "pareto",
        *info,
        *(f"param.{p}" for p in params),
        *(f"cost.{c}" for c in costs),
        *(f"metric.{m}" for m in metrics),
        "constraints",
        "datetime_start",
        "datetime_complete",
        "duration_s",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            for t in trials:
                attrs = t.user_attrs
                done = t.state == TrialState.COMPLETE
                values = t.values if t.values is not None else [None] * len(names)
                out.writerow(
                    _cell(v)
                    for v in (
                        t.number,
                        t.state.name,
                        *values,
                        feasible(t) if done else None,
                        t.number in front,
                        *(attrs.get(k) for k in info),
                        *(t.params.get(p) for p in params),
                        *((attrs.get("costs") or {}).get(c) for c in costs),
                        *((attrs.get("metrics") or {}).get(m) for m in metrics),
                        attrs.get("constraints"),
                        t.datetime_start and t.datetime_start.isoformat(),
                        t.datetime_complete and t.datetime_complete.isoformat(),
                        None if t.duration is None else t.duration.total_seconds(),
                    )
                )

    write_atomic(path, write)
    return path


def _numbers_text(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _nulls(data: Any, where: str = "") -> list[str]:
    """The dotted keys whose value is None."""
    if data is None:
        return [where]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _nulls(v, f"{where}.{k}" if where else k)]
    if isinstance(data, list | tuple):
        return [p for i, v in enumerate(data) for p in _nulls(v, f"{where}[{i}]")]
    return []


def export_trial(study: optuna.Study, number: int) -> str:
    """The ExperimentConfig of trial `number` (its user_attr "config") as TOML text."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    with_config = [n for n, t in trials.items() if t.user_attrs.get("config") is not None]
    valid = f"trials with a config: {_numbers_text(with_config)}"
    if number not in trials:
        raise ValueError(f"study {study.study_name!r} has no trial {number}; {valid}")
    trial = trials[number]
    config = trial.user_attrs.get("config")
    if config is None:
        why = trial.user_attrs.get("fail_reason")
        raise ValueError(
            f"trial {number} of study {study.study_name!r} ({trial.state.name}"
            f"{': ' + why if why else ''}) has no config; {valid}"
        )
    nulls = _nulls(config)
    if nulls:
        # TOML has no null, and leaving the key out would mean its default, which may differ
        raise ValueError(
            f"trial {number}'s config has null at {', '.join(nulls)}, which TOML cannot write"
        )
    return tomli_w.dumps(config)


def dashboard_app(storage: str | optuna.storages.BaseStorage):
    """optuna-dashboard's WSGI app over `storage` (a URL or a storage), to serve or to query."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ImportError(
            "the dashboard needs optuna-dashboard: pip install optuna-dashboard"
        ) from None
    return optuna_dashboard.wsgi(storage)
