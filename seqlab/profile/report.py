"""Tables of a `run_bench` result: rich tables for the terminal, markdown for results.md.

Times are medians; "±" is half the interquartile range relative to the median. Skipped cells
read "skipped", and the reasons are listed under each table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from seqlab.files import write_text_atomic
from seqlab.profile.bench import MODEL_PASSES, OP_PASSES, titles
from seqlab.profile.plot import PLOT_FILES, plot_results

Rows = tuple[list[str], list[list[str]], list[str]]  # headers, rows, notes
OUTPUT_FILES = ("bench.json", "results.md", *PLOT_FILES)  # what write_results writes


def _num(x: float) -> str:
    """Three significant digits, without an exponent: 0.363, 31.5, 2,140."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ms(m: dict[str, Any], notes: list[str]) -> str:
    if "skipped" in m:
        if m["skipped"] not in notes:
            notes.append(m["skipped"])
        return "skipped"
    spread = (m["q3_s"] - m["q1_s"]) / (2 * m["median_s"])
    return f"{_num(1e3 * m['median_s'])} ±{100 * spread:.0f}%"


def _mib(n: int | None) -> str:
    return "–" if n is None else _num(n / 2**20)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def model_rows(result: dict[str, Any]) -> Rows:
    headers = [
        "arch",
        "params",
        "T",
        "fwd ms",
        "fwd+bwd ms",
        "prefill tok/s",
        "decode ms/tok",
        "peak MiB fwd",
        "peak MiB fwd+bwd",
        "state MiB",
        "FLOP/tok",
        "1st call ms",
    ]
    rows, notes = [], []
    for model in result["models"]:
        for p in model["points"]:
            fwd, fb = p["forward"], p["forward_backward"]
            rows.append(
                [
                    model["arch"],
                    _si(model["params"]),
                    str(p["seq_len"]),
                    _ms(fwd, notes),
                    _ms(fb, notes),
                    _si(p["prefill_tokens_per_s"]) if "prefill_tokens_per_s" in p else "–",
                    _ms(p["decode"], notes),
                    _mib(fwd.get("peak_bytes")),
                    _mib(fb.get("peak_bytes")),
                    _mib(p["analytic"]["state_bytes"]),
                    _si(p["analytic"]["prefill_flops_per_token"]),
                    _num(1e3 * fwd["first_call_s"]) if "first_call_s" in fwd else "–",
                ]
            )
    return headers, rows, notes


def fit_rows(result: dict[str, Any]) -> Rows:
    headers = ["arch", *(f"{name} slope (last two)" for name in MODEL_PASSES)]
    rows = []
    for model in result["models"]:
        cells = [model["arch"]]
        for name in MODEL_PASSES:
            fit = model["fits"][name]
            cells.append("–" if fit is None else f"{fit['slope']:.2f} ({fit['last_slope']:.2f})")
        rows.append(cells)
    return headers, rows, []


def op_rows(result: dict[str, Any]) -> Rows:
    peers = list(dict.fromkeys(p for op in result["ops"] for p in op["impls"] if p != "seqlab"))
    headers = ["op", "T", "pass", "seqlab ms"]
    for peer in peers:
        headers += [f"{peer} ms", f"seqlab/{peer}"]
    rows, notes = [], []
    for op in result["ops"]:
        for p in op["points"]:
            for name in OP_PASSES:
                cells = [op["op"], str(p["seq_len"]), name, _ms(p["seqlab"][name], notes)]
                for peer in peers:
                    if peer not in p:
                        cells += ["–", "–"]
                        continue
                    ratio = p["ratios"][peer].get(name)
                    cells += [
                        _ms(p[peer][name], notes),
                        "–" if ratio is None else f"{ratio:.2f}×",
                    ]
                rows.append(cells)
    notes += [f"{peer}: {text}" for peer, text in result["peers"].items() if peer not in peers]
    backends = {op["op"]: op["seqlab_backend"] for op in result["ops"] if "seqlab_backend" in op}
    notes += [f"seqlab {op} runs on {backend}" for op, backend in backends.items()]
    return headers, rows, notes


def rich_tables(result: dict[str, Any]) -> list[Table]:
    tables = []
    kinds = (("models", model_rows), ("fits", fit_rows), ("ops", op_rows))
    for kind, rows_of in kinds:
        key = "ops" if kind == "ops" else "models"
        if not result[key]:
            continue
        headers, rows, notes = rows_of(result)
        caption = escape("\n".join(notes)) or None
        table = Table(title=escape(titles(result)[kind]), caption=caption)
        for h in headers:
            table.add_column(h, justify="left" if h in ("arch", "op", "pass") else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        tables.append(table)
    return tables


def markdown_table(rows: Rows) -> str:
    headers, body, notes = rows
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "?"
    machine = (
        f"{m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), {memory}, "
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}"
    )
    if "gpu" in m:
        machine = f"{m['gpu']} (CUDA {m['cuda']}); host: {machine}"
    load = "/".join(f"{x:.1f}" for x in m["load_average_start"])
    load_end = "/".join(f"{x:.1f}" for x in m.get("load_average_end", ()))
    parts = [
        "# seqlab bench",
        "",
        f"- date: {m['date']}",
        f"- machine: {machine}",
        f"- load average (1/5/15 min) at start {load}, at end {load_end}",
        f"- timing: first call apart, {s['warmup']} warm-up call(s), median of {s['repeats']} "
        f"({s['decode_repeats']} for decode); ± is half the interquartile range",
        f"- peak memory: {result['memory_method']}",
    ]
    if not result.get("complete", True):
        parts.append("- **partial results**: the run had not finished when this was written")
    if "stopped" in result:
        parts.append(f"- stopped early: {result['stopped']}; what was not measured is marked")
    if "command" in result:
        parts += ["", "```", result["command"], "```"]
    titles_ = titles(result)
    if result["models"]:
        for kind, rows_of in (("models", model_rows), ("fits", fit_rows)):
            parts += ["", f"## {titles_[kind]}", "", markdown_table(rows_of(result))]
    if result["ops"]:
        parts += ["", f"## {titles_['ops']}", "", markdown_table(op_rows(result))]
    return "\n".join(parts) + "\n"


def write_results(
    result: dict, out_dir: str | Path, command: str | None = None, plots: bool = True
) -> list[Path]:
    """bench.json, results.md (machine, command, tables) and, with `plots`, the PNG plots, each
    written atomically; returns the paths. Without `plots` (a partial result), plots an earlier
    run left in `out_dir` are removed, so none sits beside results it does not show."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if command is not None:
        result = {**result, "command": command}
    paths = [
        write_text_atomic(out / "bench.json", json.dumps(result, indent=1) + "\n"),
        write_text_atomic(out / "results.md", markdown_report(result)),
    ]
    if not plots:
        for name in PLOT_FILES:
            (out / name).unlink(missing_ok=True)
        return paths
    return paths + plot_results(result, out)
