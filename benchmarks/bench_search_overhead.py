"""The search's own cost (issue 15, item 9): what a trial costs beyond its training, and what a
second worker buys.

    .venv/bin/python benchmarks/bench_search_overhead.py --trials 8 \
        --out benchmarks/results/search-2026-12-05/overhead.md

Both parts run the same N candidates of the `demo` space at its budget (drawn once with a seeded
random sampler, then enqueued, so every run trains exactly these), each run in a fresh folder
with its own results store (nothing is reused between runs), through `run_study` as
`seqlab search` calls it.

1. Overhead: 1 worker, 1 thread, in this process. Per trial, the training (the trainer's wall
   time: steps and evaluations) against the rest: the trial's own bookkeeping (sampling,
   costing, the results store, the study's writes) and the time between trials (the sampler,
   the storage), from the run's wall time less the sum of training times.
2. Scaling: the same N trials with 1 worker of 1 thread, then 2 worker processes of 1 thread each
   (process start included): the ratio of wall times.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

import optuna
import torch

from seqlab.experiment import load_experiment
from seqlab.files import write_atomic
from seqlab.search.cli import SEARCH_DEFAULTS
from seqlab.search.objective import Objective
from seqlab.search.space import SearchSpace
from seqlab.search.study import run_study


def candidates(space: SearchSpace, n: int, seed: int) -> list[dict]:
    """n distinct candidates' params: the space's known architectures, then random draws."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    chosen, keys = [], set()
    for params in [*space.known().values()]:
        study.enqueue_trial(params)
    while len(chosen) < n:
        trial = study.ask()
        candidate = space.sample(trial)
        study.tell(trial, 0.0)
        if candidate.key not in keys:
            keys.add(candidate.key)
            chosen.append(dict(trial.params))
    return chosen


def makespan(durations: list[float], workers: int) -> float:
    """When the last of `durations`, taken in order by the first free of `workers`, ends."""
    free = [0.0] * workers
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def one_run(space, base, params, workers: int, folder: Path) -> tuple[float, optuna.Study, dict]:
    """(wall seconds, the study, {"start": s to the first trial's start, "end": s from the last
    trial's end to the run's})."""
    objective = Objective(space, base, folder, store_path=folder / "results.db")
    began = datetime.now()
    start = time.perf_counter()
    study = run_study(
        objective,
        out=folder,
        study_name="overhead",
        directions=objective.directions,
        n_trials=len(params),
        workers=workers,
        sampler="random",
        seed=0,
        enqueue=params,
        study_user_attrs=objective.study_user_attrs(),
        threads=1,
    )
    wall = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False)
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    edges = {"start": (first - began).total_seconds(), "end": wall - (last - began).total_seconds()}
    return wall, study, edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="markdown report (else stdout)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    space = SearchSpace.load("demo")
    base = load_experiment(defaults={**SEARCH_DEFAULTS, **space.base})
    params = candidates(space, args.trials, args.seed)
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="seqlab-search-overhead-"))
    try:
        one, study, edges_one = one_run(space, base, params, 1, root / "one")
        two, study_two, edges_two = one_run(space, base, params, 2, root / "two")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    train = [t.user_attrs["wall_time_s"] for t in trials]
    in_trial = [t.duration.total_seconds() - w for t, w in zip(trials, train, strict=True)]
    trials_two = sorted(study_two.get_trials(deepcopy=False), key=lambda t: t.number)
    train_two = [t.user_attrs["wall_time_s"] for t in trials_two]
    ideal = makespan(train, 2)
    total_overhead = one - sum(train)
    mean_train = statistics.mean(train)
    per_trial = total_overhead / len(trials)
    lines = [
        f"# seqlab search overhead, demo space, {len(trials)} trials",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"optuna {optuna.__version__}, {date.today()}, load average {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end. Command: `.venv/bin/python "
        f"benchmarks/bench_search_overhead.py --trials {args.trials} --seed {args.seed}`.",
        "",
        "## 1. Overhead per trial (1 worker, 1 thread, in process)",
        "",
        "| trial | arch | training s | rest of the trial s |",
        "|---|---|---|---|",
        *(
            f"| {t.number} | {t.user_attrs['arch']} | {w:.2f} | {o:.3f} |"
            for t, w, o in zip(trials, train, in_trial, strict=True)
        ),
        "",
        f"Run: {one:.1f} s, of which training {sum(train):.1f} s; everything else "
        f"{total_overhead:.2f} s = {per_trial:.3f} s per trial (inside trials: "
        f"{statistics.mean(in_trial):.3f} s on average), **{100 * per_trial / mean_train:.2f} %** "
        f"of a mean demo trial's training ({mean_train:.1f} s).",
        "",
        "## 2. Two workers against one (1 thread each, the same trials)",
        "",
        f"1 worker: {one:.1f} s; 2 worker processes: {two:.1f} s; ratio **{two / one:.2f}×**.",
        "",
        f"Where the time goes: the trials in the order the workers take them, at their 1-worker "
        f"times, would end after {ideal:.1f} s on 2 workers ({ideal / one:.2f}× of 1 worker: the "
        f"trials differ in length, so the last one runs alone); side by side the same trainings "
        f"took {sum(train_two):.1f} s in all against {sum(train):.1f} s alone "
        f"({sum(train_two) / sum(train):.2f}×: two single-thread trainings on the 2 cores slow "
        "each other). From the run's start to its first trial's start: "
        f"{edges_one['start']:.1f} s with 1 worker in process, {edges_two['start']:.1f} s with 2 "
        "worker processes (spawning, importing torch and seqlab, opening the study); from the "
        f"last trial's end to the run's end: {edges_one['end']:.1f} s and "
        f"{edges_two['end']:.1f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        write_atomic(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
