"""Tables of runs for the terminal (rich) and CSV, and key=value options from the command line."""

from __future__ import annotations

import ast
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from seqlab.files import write_atomic
from seqlab.train.probe import ProbeRow, human_bytes
from seqlab.train.results import COLUMNS, RECORD_KEY, lookup
from seqlab.train.trainer import TrainResult

_JSON_WORDS = {"true": True, "false": False, "null": None}


def parse_options(items: Sequence[str], what: str = "option") -> dict[str, Any]:
    """["num_kv_pairs=4", "model.pattern=gdn(head_dim=16)"] → {"num_kv_pairs": 4,
    "model.pattern": "gdn(head_dim=16)"}: split at the first "=", or at the last where what is
    left of it is a dotted key (a slice metric: "metrics.final.num_kv_pairs=2,seq_len=16=0.5");
    values are Python literals where they read as one (true, false and null too, as in JSON:
    configs take no text for a bool), else text."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        last_key, _, last_text = item.rpartition("=")
        if last_key != key and RECORD_KEY.match(last_key):
            key, text = last_key, last_text
        if not sep or not key:
            raise ValueError(f"{what} {item!r} must read key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = _JSON_WORDS.get(text, text)
        if key in options and options[key] != value:  # which one was meant is not ours to guess
            raise ValueError(f"{what} {key} given twice: {options[key]!r} and {value!r}")
        options[key] = value
    return options


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def results_table(records: Sequence[dict[str, Any]], title: str = "runs") -> Table:
    table = Table(title=title)
    for name, _ in COLUMNS:
        table.add_column(name, overflow="fold", min_width=min(len(name), 5))
    for record in records:
        row = []
        for name, path in COLUMNS:
            value = lookup(record, path)
            if name == "created":
                value = value[:16].replace("T", " ")
            elif name in ("acc %", "best %"):
                value = percent(value)
            row.append(fmt(value))
        table.add_row(*row)
    return table


def slice_names(results: Sequence[TrainResult]) -> list[str]:
    """Metric names in order of first appearance, "all" first."""
    names = dict.fromkeys(["all"])
    for result in results:
        names.update(dict.fromkeys(result.final))
    return list(names)


def train_table(result: TrainResult, title: str) -> Table:
    table = Table(title=title)
    for col in ("metric", "final", "best"):
        table.add_column(col)
    for name in slice_names([result]):
        final, best = result.final.get(name), result.best.get(name)
        show = fmt if name == "bits_per_byte" else percent
        table.add_row(name if name == "bits_per_byte" else f"{name} acc %", show(final), show(best))
    return table


def probe_columns(rows: Sequence[ProbeRow]) -> list[str]:
    return (
        ["arch", "layers"]
        + slice_names([r.result for r in rows])
        + ["params", "state bytes", "wall s", "stop"]
    )


def probe_cells(row: ProbeRow, names: Sequence[str]) -> list[str]:
    return [
        row.arch,
        str(row.n_layers),
        *(percent(row.result.final.get(name)) for name in names),
        f"{row.params:,}",
        f"{row.state_bytes:,} ({human_bytes(row.state_bytes)})",
        f"{row.result.wall_time_s:.1f}",
        row.result.stop_reason,
    ]


def probe_table(rows: Sequence[ProbeRow], title: str) -> Table:
    table = Table(title=title)
    for col in probe_columns(rows):
        table.add_column(col, overflow="fold")
    names = slice_names([r.result for r in rows])
    for row in rows:
        table.add_row(*probe_cells(row, names))
    return table


def write_probe_csv(rows: Sequence[ProbeRow], path: str | Path) -> Path:
    """The probe table as CSV, with raw numbers: accuracy as a fraction, state in bytes, and why
    each run stopped ("steps", "target_accuracy", or "non_finite": diverged, accuracy blank)."""
    names = slice_names([r.result for r in rows])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            header = ["arch", "n_layers", *names, "params", "state_bytes", "wall_time_s"]
            out.writerow([*header, "stop_reason"])
            for r in rows:
                accuracy = [r.result.final.get(name, "") for name in names]
                row = [r.arch, r.n_layers, *accuracy, r.params, r.state_bytes]
                out.writerow([*row, r.result.wall_time_s, r.result.stop_reason])

    write_atomic(path, write)
    return path
