"""`seqlab search`: a multi-objective architecture search, resumable, on one Optuna study.

seqlab search --task mqar --space demo --trials 12 --out runs/search-demo
seqlab search --storage postgresql://user@host/db --study big --workers 4 --space default
seqlab search export --out runs/search-demo --trial 7 > trial-7.toml  # seqlab train --config

The command parses and checks its arguments (space, base experiment, objectives, limits,
storage), then hands the study to `seqlab.search.study.run_study` and prints what it found with
`seqlab.search.report`. Everything it writes lies under --out: the SQLite study (without
--storage), each trial's checkpoints (trials/<key>/), pareto.png, hypervolume.png, trials.csv.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

search_app = typer.Typer(
    add_completion=False,
    help="Search architectures for the best quality at a given cost (an Optuna study).",
)
console = Console()

# The base experiment of a search, under --config and --set: a short training per candidate,
# evaluated once at the end. The space's own train values (the lr, say) override these.
SEARCH_DEFAULTS = {
    "train.steps": 300,
    "train.batch_size": 32,
    "train.lr": 3e-3,
    "train.warmup_steps": 30,
    "train.eval_every": 300,
    "train.progress": False,
}
StorageOption = Annotated[
    str | None,
    typer.Option(
        help="SQLAlchemy URL of the study's database, e.g. postgresql://user:pw@host/db "
        "(default: SQLite at OUT/study.db)"
    ),
]
StudyOption = Annotated[str | None, typer.Option(help="study name (default: TASK-SPACE)")]
OutOption = Annotated[
    Path,
    typer.Option(help="folder of the study, the trials' checkpoints, the plots and the CSV"),
]


def _study_name(name: str | None, task: str, space: str) -> str:
    if name is not None:
        return name
    return f"{task}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(space).stem)}"


@search_app.callback(invoke_without_command=True)
def search(
    ctx: typer.Context,
    task: Annotated[
        str | None, typer.Option(help="task name (default: the space's or config's, else mqar)")
    ] = None,
    space: Annotated[
        str, typer.Option(help="search space: default, demo, or a TOML file")
    ] = "demo",
    trials: Annotated[
        int, typer.Option(min=1, help="finished trials the study should hold; a rerun resumes")
    ] = 12,
    storage: StorageOption = None,
    study: StudyOption = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes on the one study")] = 1,
    executor: Annotated[
        str, typer.Option(help="local (processes here) or ray (tasks on a Ray cluster)")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: start a local one)")
    ] = None,
    out: OutOption = Path("seqlab-search"),
    config: Annotated[
        Path | None, typer.Option(help="base experiment TOML (task, budget); --set overrides it")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE on the base experiment, repeatable"),
    ] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            help="objectives, quality first then costs, repeatable or comma-separated "
            "(default: accuracy,state_bytes; bits_per_byte on text)"
        ),
    ] = None,
    max_params: Annotated[int | None, typer.Option(help="hard limit on parameters")] = None,
    max_state_bytes: Annotated[
        int | None, typer.Option(help="hard limit on state bytes per sequence")
    ] = None,
    context_len: Annotated[
        int | None, typer.Option(help="length at which state bytes count (default: the task's)")
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe, nsga2 or random")] = "tpe",
    seed: Annotated[int, typer.Option(help="the sampler's seed")] = 0,
    known: Annotated[
        bool, typer.Option(help="enqueue the space's known architectures first")
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per worker (default: cores / workers)")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="results database (default: $SEQLAB_RESULTS, else ./seqlab-results/results.db)"
        ),
    ] = None,
) -> None:
    """Run (or resume) a search: each trial trains one candidate of the space on the task and
    scores its quality and costs; print the Pareto front, write pareto.png, hypervolume.png and
    trials.csv under --out."""
    if ctx.invoked_subcommand is not None:
        return
    import optuna

    from seqlab.cli import _device, _fail, _out_dir, _store
    from seqlab.search.objective import Objective
    from seqlab.search.space import SearchSpace
    from seqlab.search.study import SearchError, StorageError, run_study

    try:
        the_space = SearchSpace.load(space)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e), param_hint="--space") from None
    try:
        base = _base_experiment(the_space, config, set_ or [], task)
    except ValueError as e:
        raise _fail(e) from None
    searched = _searched_keys(the_space, set_ or [])
    if searched:
        console.print(
            f"[yellow]warning:[/yellow] the space sets {', '.join(searched)} per candidate; "
            "the --set value of each is overridden"
        )
    names = _objectives(objective, base.task.name)
    limits = {k: v for k, v in (("params", max_params), ("state_bytes", max_state_bytes)) if v}
    _device(base.train.device)
    _out_dir(out)
    store = _store(results, "--results")
    name = _study_name(study, base.task.name, the_space.name)
    try:
        the_objective = Objective(
            the_space,
            base,
            out,
            objectives=names,
            limits=limits,
            context_len=context_len,
            store_path=store.path,
        )
    except (ValueError, TypeError) as e:
        raise _fail(e) from None
    enqueue = list(the_space.known().values()) if known else []
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    _log_to_stderr("seqlab.search.study")
    console.print(
        f"search {escape(name)}: space {escape(the_space.name)}, task {escape(base.task.name)}, "
        f"objectives {', '.join(names)}"
        + (f", limits {', '.join(f'{k} ≤ {v:g}' for k, v in limits.items())}" if limits else "")
        + f"; {trials} trials, {workers} worker(s) ({executor})"
    )
    try:
        found = run_study(
            the_objective,
            out=out,
            study_name=name,
            directions=the_objective.directions,
            n_trials=trials,
            storage_url=storage,
            workers=workers,
            executor=executor,
            ray_address=ray_address,
            sampler=sampler,
            seed=seed,
            enqueue=enqueue,
            study_user_attrs=the_objective.study_user_attrs(),
            threads=threads,
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command to resume")
        raise typer.Exit(130) from None
    except StorageError as e:
        raise typer.BadParameter(str(e), param_hint="--storage") from None
    except (SearchError, ValueError) as e:
        raise _fail(e) from None
    report(found, out)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at each line (a test's capture, a new one)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr(name: str) -> None:
    """The study's log lines (where it stands, one line per finished trial) on stderr, plain
    text, so a search under nohup or CI shows its progress too."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.INFO)


def _base_experiment(space, config: Path | None, overrides: list[str], task: str | None):
    """SEARCH_DEFAULTS, under the space's [base], under --config, --task, then --set. The space's
    task table counts only where the task stays the space's (its options fit no other task)."""
    from seqlab.experiment import experiment_data, experiment_from_dict

    flags = {} if task is None else {"task.name": task}
    defaults = {**SEARCH_DEFAULTS, **space.base}
    data = experiment_data(config, overrides, defaults=defaults, values=flags)
    if data.get("task", {}).get("name", "mqar") != defaults.get("task.name", "mqar"):
        defaults = {k: v for k, v in defaults.items() if not k.startswith("task.")}
        data = experiment_data(config, overrides, defaults=defaults, values=flags)
    return experiment_from_dict(data)


def _objectives(given: list[str] | None, task: str) -> list[str]:
    from seqlab.tasks import TASKS, SyntheticTask

    if not given:
        text = not issubclass(TASKS[task][1], SyntheticTask)
        return ["bits_per_byte" if text else "accuracy", "state_bytes"]
    return [n.strip() for item in given for n in item.split(",") if n.strip()]


def _searched_keys(space, overrides: list[str]) -> list[str]:
    """The --set keys that the space sets per candidate (the candidate's value wins): its model
    and train dimensions, and the pattern and channel mixer it builds."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    searched = {d.path for d in (*space.model_dims, *space.train_dims)}
    return [k for k in keys if k in searched | {"model.pattern", "model.channel"}]


def report(study, out: Path) -> None:
    """The Pareto table, then pareto.png, hypervolume.png and trials.csv under `out`."""
    from seqlab.cli import _print_table
    from seqlab.search.report import pareto_table, plot_hypervolume, plot_pareto, trials_csv

    _print_table(pareto_table(study))
    written = [trials_csv(study, out / "trials.csv")]
    for plot, file in ((plot_pareto, "pareto.png"), (plot_hypervolume, "hypervolume.png")):
        try:
            written.append(plot(study, out / file))
        except ValueError as e:  # too few feasible trials to draw
            console.print(f"[yellow]no {file}[/yellow]: {escape(str(e))}")
    console.print("wrote " + ", ".join(str(p) for p in written))


@search_app.command()
def export(
    trial: Annotated[int, typer.Option(help="the trial's number")],
    out: OutOption = Path("seqlab-search"),
    storage: StorageOption = None,
    study: Annotated[
        str | None, typer.Option(help="study name (default: the storage's only study)")
    ] = None,
    to: Annotated[
        Path | None, typer.Option(help="write the TOML to this file (default: print it)")
    ] = None,
) -> None:
    """Print (or write) a trial's experiment as TOML: `seqlab train --config` of it trains the
    trial again."""
    from seqlab.experiment import HEADER
    from seqlab.files import write_atomic
    from seqlab.search.report import export_trial

    found = _load_study(out, storage, study)
    try:
        text = HEADER + export_trial(found, trial)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--trial") from None
    if to is None:
        typer.echo(text, nl=False)
        return
    write_atomic(to, lambda tmp: Path(tmp).write_text(text))
    console.print(f"wrote {to}")


def _load_study(out: Path, storage: str | None, name: str | None):
    """An existing study, read without creating anything."""
    import optuna

    from seqlab.search.study import STUDY_DB, mask_url, study_url

    if storage is None:
        if not (out / STUDY_DB).is_file():
            raise typer.BadParameter(f"no study database at {out / STUDY_DB}", param_hint="--out")
        storage = study_url(out)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as e:
        raise typer.BadParameter(
            f"cannot read studies from {mask_url(storage)}: {e}", param_hint="--storage"
        ) from None
    if name is None:
        if len(names) != 1:
            have = ", ".join(names) or "none"
            raise typer.BadParameter(
                f"name one with --study; studies: {have}", param_hint="--study"
            )
        name = names[0]
    if name not in names:
        raise typer.BadParameter(
            f"no study {name!r} in {mask_url(storage)}; studies: {', '.join(names) or 'none'}",
            param_hint="--study",
        )
    return optuna.load_study(study_name=name, storage=storage)
