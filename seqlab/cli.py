"""The `seqlab` command. Thin: it parses arguments and calls the library.

seqlab ops                 # the ops, their forms and state sizes
seqlab check --seq-len 300 # run every form on random inputs and show its gap to `recurrent`
seqlab train --task mqar --arch gdn --out runs/mqar-gdn  # train (resumes from --out), record
seqlab train --config run.toml --set train.lr=3e-3     # an experiment file, dotted overrides
seqlab results --task mqar --since 2d --csv runs.csv     # recorded runs: table, filters, CSV
seqlab probe --task mqar --arch attn --arch gdn          # same budget per arch; table + PNG
seqlab search --task mqar --space demo --trials 12       # architecture search; Pareto front
seqlab search export --out seqlab-search --trial 3       # a trial's experiment as TOML
seqlab bench --arch attn --arch gdn --seq-lens 512,2k    # cost: time, memory, FLOPs; table + PNG
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seqlab.ops.attention import attention, naive_attention
from seqlab.profile.bench import PRESETS, BenchConfig, command_line, parse_seq_lens, run_bench
from seqlab.search.cli import search_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
app.add_typer(search_app, name="search")
console = Console()


# name, recurrence, forms, state per head per sequence (fp32 elements → bytes).
@app.command()
def ops() -> None:
    """List the registered op families: variants, forms (reference first) and state size."""
    from seqlab.ops.registry import families

    table = Table(title="seqlab.ops (seqlab.ops.registry)")
    for col in ("family", "variants", "forms", "state bytes per head, T = 4096", "what"):
        table.add_column(col)
    for name, fam in families().items():
        forms = [fam.reference] + [f for f in fam.forms if f != fam.reference]
        dims = ", ".join(f"{k}={d}" for k, d in fam.dims.items())
        state = fam.state_bytes(fam.variants[0], 4096, 1, **fam.dims) if fam.stateful else 0
        table.add_row(
            name,
            ", ".join(fam.variants),
            ", ".join(f"{f} (reference)" if f == fam.reference else f for f in forms),
            f"{state:,} ({dims})",
            fam.doc,
        )
    console.print(table)


def _check_bytes(B: int, T: int, H: int, K: int, V: int, C: int) -> dict[str, int]:
    """Predicted peak bytes (float64) of `check`'s inputs and of each form it runs, the widest
    case of each (per-channel gates): the parallel form and naive attention hold T × T blocks
    ([T, T, K] for per-channel gates), the chunk form [C, C] ones, the recurrent form O(T)."""
    e, rows = 8, B * H
    inputs = B * T * H * (5 * K + 2 * V + 3) * e + rows * K * V * e
    copies = 3 * B * T * H * (2 * K + V) * e  # casts, chunked copies, outputs
    return {
        "inputs": inputs,
        "recurrent": inputs + copies,
        "chunk": inputs + copies + rows * T * (6 * min(C, T) + 2 * 16 * K) * e,
        "parallel": inputs + copies + rows * T * T * (8 + 3 * K) * e,  # measured: T = 1024
        "attention": inputs + copies + 3 * rows * T * T * e,
    }


def _tensors(S) -> tuple[torch.Tensor, ...]:
    """The tensors of an op's state: one tensor, or a tuple of them (an LSTM's (h, c))."""
    return (S,) if torch.is_tensor(S) else tuple(S)


@app.command()
def check(
    seq_len: int = typer.Option(300, help="sequence length T"),
    chunk_size: int = typer.Option(64, help="chunk size C of the chunk form"),
    seed: int = typer.Option(0, help="random seed"),
    max_memory_gb: float | None = typer.Option(
        None, help="skip a form predicted to need more (default: 60 % of the free memory)"
    ),
) -> None:
    """Run every form of every registered op family in float64 on random inputs, from a random
    initial state, and print its largest gap to the family's reference form."""
    from seqlab.ops.registry import families
    from seqlab.profile.bench import memory_limit, over_memory, readable_amount

    if seq_len < 1 or chunk_size < 1:
        raise typer.BadParameter("seq-len and chunk-size must be positive")
    if max_memory_gb is not None and not 0 < max_memory_gb < float("inf"):
        raise typer.BadParameter("must be a positive finite number", param_hint="--max-memory-gb")
    B, T, H, K, V = 2, seq_len, 2, 16, 24
    limit = memory_limit(max_memory_gb, torch.device("cpu"))
    need = _check_bytes(B, T, H, K, V, chunk_size)

    def too_big(what: str) -> str | None:
        if limit is None or need[what] <= limit:
            return None
        return f"skipped: {over_memory(need[what], limit)}"

    if too_big("recurrent"):
        raise typer.BadParameter(
            f"{seq_len} is too long: the inputs and the reference form alone are predicted to "
            f"need {readable_amount(need['recurrent'] / 2**30, 1)} GiB, more than the "
            f"{readable_amount(limit / 2**30, 1)} GiB allowed (--max-memory-gb)",
            param_hint="--seq-len",
        )
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    table = Table(title=f"max |form − reference|, float64, B={B} T={T} H={H}, dims ≤ {K}")
    for col in ("op", "form", "output", "final state"):
        table.add_column(col)
    for name, fam in families().items():
        if len(fam.forms) == 1:  # nothing to compare (attention: the SDPA row below)
            continue
        dims = {d: min(n, K) for d, n in fam.dims.items()}
        for variant in fam.variants:
            x = fam.make_inputs(variant, B, T, H, dtype=torch.float64, generator=gen, **dims)
            label = f"{name}({variant})"
            ref = fam.forms[fam.reference]
            S0 = None
            if fam.stateful:  # a random initial state shaped as the reference's final one
                S_ref = ref(**x, output_final_state=True)[1]
                S0 = tuple(
                    torch.randn(s.shape, generator=gen, dtype=torch.float64)
                    for s in _tensors(S_ref)
                )
                S0 = S0[0] if torch.is_tensor(S_ref) else S0
            ref_o, ref_s = (
                ref(**x, initial_state=S0, output_final_state=True) if S0 is not None else ref(**x)
            )
            for form, fn in fam.forms.items():
                if form == fam.reference:
                    continue
                if reason := too_big(form if form in ("chunk", "parallel") else "chunk"):
                    table.add_row(label, form, reason, "–")
                    continue
                extra = {"chunk_size": chunk_size} if form == "chunk" else {}
                if fam.stateful:
                    o, S = fn(**x, initial_state=S0, output_final_state=True, **extra)
                    pairs = zip(_tensors(S), _tensors(ref_s), strict=True)
                    gap_s = f"{max((a - b).abs().max().item() for a, b in pairs):.2e}"
                else:
                    o, gap_s = fn(**x, **extra)[0], "–"
                table.add_row(label, form, f"{(o - ref_o).abs().max().item():.2e}", gap_s)
    if reason := too_big("attention"):
        table.add_row("attention", "sdpa vs naive", reason, "–")
    else:
        gap = (attention(q, k, v)[0] - naive_attention(q, k, v)).abs().max().item()
        table.add_row("attention", "sdpa vs naive", f"{gap:.2e}", "–")
    console.print(table)


@app.command()
def bench(
    arch: Annotated[
        list[str] | None,
        typer.Option(help="architecture pattern, repeatable (default: attn, gdn, 'gdn*3,attn')"),
    ] = None,
    seq_lens: Annotated[str, typer.Option(help="lengths T, comma-separated; k = 1024")] = (
        "512,2k,8k,32k"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 (fp32), bfloat16 (bf16), float16")] = (
        "float32"
    ),
    preset: Annotated[str, typer.Option(help="small: d_model 256, 4 layers; large: 1024, 12")] = (
        "small"
    ),
    d_model: Annotated[int | None, typer.Option(help="model width (overrides the preset)")] = None,
    n_layers: Annotated[int | None, typer.Option(help="layers (overrides the preset)")] = None,
    channel: Annotated[str, typer.Option(help="channel mixer pattern ('' for none)")] = "swiglu",
    batch_size: Annotated[int, typer.Option(help="sequences per batch")] = 1,
    vocab_size: Annotated[int, typer.Option(help="vocabulary (small: the head is not timed)")] = (
        256
    ),
    level: Annotated[str, typer.Option(help="model, op (core ops against peers) or all")] = "all",
    repeats: Annotated[int, typer.Option(help="timed calls per measurement")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed calls after the first")] = 1,
    decode_repeats: Annotated[int, typer.Option(help="timed single-token decode steps")] = 10,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: all)")] = None,
    max_seconds: Annotated[
        float, typer.Option(help="skip a measurement predicted to take longer (s)")
    ] = 60.0,
    max_memory_gb: Annotated[
        float | None, typer.Option(help="skip one predicted to need more (default: 60 % free)")
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(
            help="start no measurement after this many seconds (or predicted to end after)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the weights and inputs")] = 0,
    out: Annotated[Path, typer.Option(help="directory for JSON, markdown, PNGs")] = Path(
        "bench-results"
    ),
) -> None:
    """Measure time, memory and analytic cost of architectures and their core ops against
    peers; print tables, write bench.json, results.md and PNG plots to --out. The JSON and
    markdown are rewritten after every measured length, so a killed run keeps its results."""
    try:
        lens = parse_seq_lens(seq_lens)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--seq-lens") from None
    _device(device, auto=False)
    if preset not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}", param_hint="--preset"
        )
    size = dict(PRESETS[preset])
    # `is not None`: a 0 (or negative) given is an error from BenchConfig, not the preset's size
    size.update({k: v for k, v in (("d_model", d_model), ("n_layers", n_layers)) if v is not None})
    options = dict(
        seq_lens=lens,
        channel=channel or None,
        seed=seed,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        vocab_size=vocab_size,
        level=level,
        repeats=repeats,
        warmup=warmup,
        decode_repeats=decode_repeats,
        threads=threads,
        max_seconds=max_seconds,
        max_memory_gb=max_memory_gb,
        time_limit=time_limit,
        **size,
    )
    if arch:
        options["archs"] = tuple(arch)
    try:
        config = BenchConfig.make(**options)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    from seqlab.profile.report import (  # loads matplotlib
        OUTPUT_FILES,
        rich_tables,
        write_results,
    )

    _out_dir(out)
    for name in OUTPUT_FILES:  # a folder in a file's place would fail only after measuring
        _file_to_write(out / name, "--out")
    command = command_line(config, out)
    result = run_bench(
        config,
        log=lambda line: console.print(escape(line), style="dim"),
        progress=lambda partial: write_results(partial, out, command, plots=False),
    )
    for table in rich_tables(result):
        console.print(table, width=None if console.is_terminal else 200)  # a file: keep whole
    if "stopped" in result:
        console.print(f"stopped early: {escape(result['stopped'])}", style="yellow")
    for path in write_results(result, out, command):
        console.print(f"wrote {path}")


def _device(name: str, auto: bool = True) -> None:
    from seqlab.config import parse_device

    try:
        parse_device(name, auto=auto)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--device") from None


def _threads(threads: int | None) -> None:
    """Use `threads` torch CPU threads (None: torch's default); fewer than 1 is an error."""
    if threads is None:
        return
    if threads < 1:
        raise typer.BadParameter(f"must be ≥ 1, got {threads}", param_hint="--threads")
    torch.set_num_threads(threads)


def _out_dir(path: Path) -> None:
    from seqlab.files import writable_dir

    try:
        writable_dir(path)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _file_to_write(path: Path, flag: str) -> None:
    """`path` can be written as a file: not a folder, in a folder that is or can be made."""
    from seqlab.files import writable_dir

    try:
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not a file")
        writable_dir(path.parent)
    except ValueError as e:
        raise typer.BadParameter(f"{str(path)!r} cannot be written: {e}", param_hint=flag) from None


def _store(path: Path | None, flag: str, read_only: bool = False):
    """The results store, opened and checked now, before any work."""
    from seqlab.train.results import ResultsError, ResultsStore

    try:
        return ResultsStore(path, read_only=read_only)
    except ResultsError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def _print_table(table) -> None:
    # Off a terminal (a pipe, a file) nothing limits the width, so no column is folded.
    (console if console.is_terminal else Console(width=250)).print(table)


def _options(items: list[str] | None, flag: str) -> dict:
    from seqlab.train.report import parse_options

    try:
        return parse_options(items or [], flag)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="experiment TOML: task, model and train tables; flags and --set override it",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="KEY=VALUE, a dotted key and a TOML value, after the flags; repeatable "
        "(train.lr=3e-3, model.pattern=gdn*3,attn, train.betas=[0.9,0.99])",
    ),
]
DumpOption = Annotated[
    bool, typer.Option(help="print the resolved experiment as TOML and exit, training nothing")
]


def _flags(
    task: str | None,
    preset: str | None,
    task_option: list[str] | None,
    channel: str | None,
    **values,
) -> dict:
    """The command-line flags given, as dotted experiment keys; '' unsets preset and channel."""
    flags = {key: value for key, value in values.items() if value is not None}
    if task is not None:
        flags["task.name"] = task
    if preset is not None:
        flags["task.preset"] = preset or None
    if channel is not None:
        flags["model.channel"] = channel or None
    for key, value in _options(task_option, "--task-option").items():
        flags[f"task.options.{key}"] = value
    return flags


def _fail(e: ValueError):
    console.print(f"[red]error:[/red] {escape(str(e))}")
    return typer.Exit(2)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="run folders (seqlab train --out ...)")],
    out: Annotated[Path, typer.Option(help="the PNG to write")] = Path("curves.png"),
    label: Annotated[
        list[str] | None, typer.Option(help="a name per run, in order (default: its pattern)")
    ] = None,
) -> None:
    """Draw the learning curves of training runs (loss and held-out metric against steps and
    wall time) into one PNG, from the curves.json each run folder keeps."""
    from seqlab.train.watch import plot_curves, read_curves

    try:
        data = [read_curves(r) for r in runs]
    except ValueError as e:
        raise _fail(e) from None
    if label and len(label) != len(runs):
        raise _fail(ValueError(f"--label given {len(label)} times for {len(runs)} runs"))
    if not out.parent.exists():
        raise _fail(ValueError(f"--out {out}: folder {out.parent} does not exist"))
    if out.is_dir():
        raise _fail(ValueError(f"--out {out} is a folder; give the PNG file to write"))
    names = label or [f"{d['label']} ({Path(r).name})" for d, r in zip(data, runs, strict=True)]
    path = plot_curves(data, out, names)
    console.print(f"wrote {path}")


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    dump_config: DumpOption = False,
    task: Annotated[
        str | None, typer.Option(help="task name, e.g. mqar, parity, text (default mqar)")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="architecture pattern, e.g. 'gdn*3,attn' (default attn)")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="task preset, '' for the paper's settings (default cpu)")
    ] = None,
    task_option: Annotated[
        list[str] | None, typer.Option(help="task config key=value, repeatable")
    ] = None,
    d_model: Annotated[int | None, typer.Option(help="model width (default 64)")] = None,
    n_layers: Annotated[
        int | None,
        typer.Option(help="layers, a multiple of the pattern's length (default: 2 or the length)"),
    ] = None,
    channel: Annotated[
        str | None, typer.Option(help="channel mixer pattern, '' for none (default swiglu)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default 1000)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per step (default 64)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default 1e-3)")] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="linear warm-up steps (default 100)")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay on matrices (default 0.1)")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="evaluate and checkpoint every N steps (default 100)")
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="stop once held-out accuracy reaches it")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="seed of the weights and the data order (default 0)")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default auto)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="checkpoint folder (train.out_dir); a run resumes from it")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="results database (default: $SEQLAB_RESULTS, else ./seqlab-results/results.db)"
        ),
    ] = None,
    record: Annotated[bool, typer.Option(help="record the run in the results store")] = True,
    progress: Annotated[
        bool | None, typer.Option(help="show a progress bar on a terminal (default on)")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: torch's)")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 or bf16 (autocast; float32 weights) (default fp32)")
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="micro-batches per update (default 1)")
    ] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model")
    ] = None,
    distributed: Annotated[
        str | None,
        typer.Option(
            help="under torchrun: ddp (each rank holds the model) or fsdp (sharded); "
            "--batch-size is the global batch (default none)"
        ),
    ] = None,
    sequence_parallel: Annotated[
        int | None,
        typer.Option(
            help="under torchrun with ddp/fsdp: split every sequence along T across groups of "
            "N consecutive ranks (LASP-2); N divides the world size (default 1)"
        ),
    ] = None,
    mlflow: Annotated[
        str | None,
        typer.Option(
            metavar="URI",
            help="also log to MLflow: a tracking URI (sqlite:///mlflow.db, http://host:5000) or "
            "'out' for <out>/mlflow.db; needs the tracking extra",
        ),
    ] = None,
    wandb: Annotated[
        str | None,
        typer.Option(
            metavar="PROJECT",
            help="also log to this W&B project (WANDB_MODE=offline etc. from the environment); "
            "needs the tracking extra",
        ),
    ] = None,
) -> None:
    """Train one architecture on a task; resume from the out folder if it holds a checkpoint.
    The experiment is --config's file (or the defaults), then the flags given, then --set.
    Under torchrun (`torchrun --nproc-per-node N -m seqlab.cli train --distributed ddp ...`)
    the ranks share the global batch, and rank 0 alone writes, prints and records; with
    `--sequence-parallel N` groups of N ranks also share each sequence."""
    from seqlab.experiment import experiment_to_toml, load_experiment, run_experiment
    from seqlab.train.distributed import is_main_process
    from seqlab.train.report import train_table
    from seqlab.train.tracking import check_tracking

    flags = _flags(
        task,
        preset,
        task_option,
        channel,
        **{
            "model.pattern": arch,
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "train.steps": steps,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "train.warmup_steps": warmup_steps,
            "train.weight_decay": weight_decay,
            "train.eval_every": eval_every,
            "train.target_accuracy": target_accuracy,
            "train.seed": seed,
            "train.device": device,
            "train.out_dir": None if out is None else str(out),
            "train.progress": progress,
            "train.precision": precision,
            "train.grad_accum": grad_accum,
            "train.compile": compile_model,
            "train.distributed": distributed,
            "train.sequence_parallel": sequence_parallel,
            "train.mlflow": mlflow,
            "train.wandb": wandb,
        },
    )
    try:
        cfg = load_experiment(config, set_ or [], values=flags)
        main = is_main_process()  # under torchrun: rank 0 alone writes, prints and records
    except ValueError as e:
        raise _fail(e) from None
    if dump_config:
        typer.echo(experiment_to_toml(cfg), nl=False)
        return
    # everything the run will need, checked before it starts
    _threads(threads)
    _device(cfg.train.device)
    try:
        check_tracking(cfg.train)
    except ValueError as e:
        raise _fail(e) from None
    if cfg.train.out_dir is not None and main:
        _out_dir(Path(cfg.train.out_dir))
    store = _store(results, "--results") if record and main else None

    def show(result) -> None:
        if not main:
            return
        if result.resumed_from is not None:
            console.print(f"resumed from the checkpoint at step {result.resumed_from}")
        title = f"{cfg.task.name} · {cfg.model.pattern} · step {result.step}"
        _print_table(train_table(result, title))
        style = "red" if result.stop_reason == "non_finite" else "green"
        console.print(f"[{style}]{escape(result.message)}[/{style}]")

    try:
        result, run = run_experiment(cfg, store=store, on_result=show)
    except ValueError as e:
        raise _fail(e) from None
    if run is not None and run["new"]:
        console.print(f"recorded run {run['id']} in {store.path}")
    elif run is not None:
        console.print(f"not recorded again: {store.path} holds this run as {run['id']}")
    if result.stop_reason == "non_finite":
        raise typer.Exit(1)


@app.command()
def results(
    db: Annotated[
        Path | None,
        typer.Option(
            help="results database (default: $SEQLAB_RESULTS, else ./seqlab-results/results.db)"
        ),
    ] = None,
    task: Annotated[str | None, typer.Option(help="only runs of this task")] = None,
    arch: Annotated[str | None, typer.Option(help="only runs of this exact pattern")] = None,
    since: Annotated[
        str | None, typer.Option(help="only runs since an age (30m, 12h, 2d) or ISO date")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="dotted.key=value on the record, repeatable")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="only the newest N runs")] = None,
    csv: Annotated[
        Path | None, typer.Option(help="also write the runs, one column per key, to this CSV")
    ] = None,
) -> None:
    """List recorded runs as a table, filtered; optionally export them as CSV."""
    from seqlab.train.report import results_table

    store = _store(db, "--db", read_only=True)
    if csv is not None:
        _file_to_write(csv, "--csv")
    try:
        runs = store.runs(task, arch, since, _options(where, "--where"), limit)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _print_table(results_table(runs, f"{len(runs)} runs in {store.path}"))
    if csv is not None:
        console.print(f"wrote {store.to_csv(runs, csv)}")


@app.command()
def probe(
    config: ConfigOption = None,
    set_: SetOption = None,
    dump_config: DumpOption = False,
    task: Annotated[str | None, typer.Option(help="task name (default mqar)")] = None,
    arch: Annotated[
        list[str] | None,
        typer.Option(
            help="pattern, repeatable; replaces the config's model.pattern (default: the "
            "config's pattern if it sets one, else attn, gdn, 'gdn*3,attn')"
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="task preset, '' for the paper's settings (default cpu)")
    ] = None,
    task_option: Annotated[
        list[str] | None, typer.Option(help="task config key=value, repeatable")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="optimizer steps for every architecture (default 200)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per step (default 32)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default 3e-3)")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay on matrices (default 0.1)")
    ] = None,
    d_model: Annotated[int | None, typer.Option(help="model width (default 64)")] = None,
    n_layers: Annotated[
        int | None, typer.Option(help="layers (default: 2, or the pattern's length)")
    ] = None,
    channel: Annotated[
        str | None, typer.Option(help="channel mixer pattern, '' for none (default swiglu)")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="seed of the weights and the data order (default 0)")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default auto)")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for the PNG and the CSV")] = Path(
        "probe-results"
    ),
    results: Annotated[
        Path | None,
        typer.Option(
            help="results database (default: $SEQLAB_RESULTS, else ./seqlab-results/results.db)"
        ),
    ] = None,
    record: Annotated[bool, typer.Option(help="record every run in the results store")] = True,
    progress: Annotated[
        bool | None, typer.Option(help="show a progress bar on a terminal (default on)")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: torch's)")
    ] = None,
) -> None:
    """Train each architecture on a task with the same budget; print accuracy per slice, params,
    state bytes and time; plot accuracy against state bytes. The experiment (--config, the
    flags, --set) is the base whose model.pattern each --arch replaces; by default warm-up is
    a tenth of the steps (at most 100) and evaluation comes once, at the end."""
    from seqlab.experiment import experiment_data, experiment_from_dict, experiment_to_toml
    from seqlab.train.probe import plot_probe, probe_experiments
    from seqlab.train.report import probe_table, write_probe_csv

    flags = _flags(
        task,
        preset,
        task_option,
        channel,
        **{
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "train.steps": steps,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "train.weight_decay": weight_decay,
            "train.seed": seed,
            "train.device": device,
            "train.progress": progress,
        },
    )
    defaults = {"train.steps": 200, "train.batch_size": 32, "train.lr": 3e-3}
    try:
        data = experiment_data(config, set_ or [], defaults=defaults, values=flags)
        budget = data["train"]
        if isinstance(budget["steps"], int) and not isinstance(budget["steps"], bool):
            budget.setdefault("warmup_steps", min(100, budget["steps"] // 10))
            budget.setdefault("eval_every", budget["steps"])
        base = experiment_from_dict(data)
    except ValueError as e:
        raise _fail(e) from None
    if dump_config:
        typer.echo(experiment_to_toml(base), nl=False)
        return
    archs = arch or (
        [base.model.pattern]
        if "pattern" in data.get("model", {})
        else ["attn", "gdn", "gdn*3,attn"]
    )
    _threads(threads)
    _device(base.train.device)
    _out_dir(out)
    for suffix in ("png", "csv"):  # written after every arch has trained
        _file_to_write(out / f"probe-{base.task.name}.{suffix}", "--out")
    store = _store(results, "--results") if record else None
    try:
        rows = probe_experiments(
            base,
            archs,
            store=store,
            on_result=lambda row: console.print(
                f"{escape(row.arch)}: accuracy {100 * row.accuracy:.1f}% "
                f"after {row.result.step} steps, {row.result.wall_time_s:.1f} s"
            ),
        )
    except ValueError as e:
        raise _fail(e) from None
    name, steps_ = base.task.name, base.train.steps
    title = f"probe · {name} ({base.task.preset or 'paper'}) · d_model {base.model.d_model}"
    title += f" · {steps_} steps"
    _print_table(probe_table(rows, f"{title} · held-out accuracy % by slice"))
    png = plot_probe(rows, out / f"probe-{name}.png", title=title)
    table_csv = write_probe_csv(rows, out / f"probe-{name}.csv")
    console.print(f"wrote {png} and {table_csv}")
    diverged = [r for r in rows if r.result.stop_reason == "non_finite"]
    for r in diverged:
        console.print(f"[red]{escape(r.arch)}: {escape(r.result.message)}[/red]")
    if diverged:  # as `train` does: a script sees that the comparison is not complete
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
