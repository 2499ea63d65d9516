"""PNG plots of a `run_bench` result (matplotlib, no display needed).

time.png    forward and forward+backward latency against T, log-log, with the fitted slope
decode.png  latency of one decoded token against the context length T
state.png   state / KV-cache bytes per sequence and analytic FLOPs per token against T
ops.png     core ops against their peers (seqlab solid, SDPA dashed, fla dotted)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen before pyplot loads
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullLocator,
)

from seqlab.files import write_atomic  # noqa: E402
from seqlab.profile.bench import OP_PASSES, titles  # noqa: E402

PASS_TITLES = {
    "forward": "forward",
    "forward_backward": "forward + backward",
    "decode": "decode, one token",
}
PEER_STYLES = {"seqlab": ("-", "o"), "sdpa": ("--", "x"), "fla": (":", "^")}


def length_label(T: int) -> str:
    if T >= 1024**2 and T % 1024**2 == 0:
        return f"{T // 1024**2}M"
    if T >= 1024 and T % 1024 == 0:
        return f"{T // 1024}k"
    return str(T)


def _length_axis(ax: Axes, seq_lens: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(seq_lens))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([length_label(T) for T in seq_lens])
    ax.set_xlabel("sequence length T (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def _si(y: float, _pos: int | None = None) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if y >= scale:
            return f"{y / scale:g}{unit}"
    return f"{y:g}"


def _log_y(ax: Axes) -> None:
    """Log y axis with plain tick labels (200, 2k, 10M), not 2×10²; minor ticks are labelled at
    2 and 5 times a power of ten, or all of them when the axis spans less than a decade."""

    def minor(y: float, _pos: int | None = None) -> str:
        lo, hi = ax.get_ylim()
        mantissa = y / 10 ** math.floor(math.log10(y))
        return _si(y) if hi < 10 * lo or round(mantissa, 6) in (2, 5) else ""

    ax.set_yscale("log")
    # 1.5 too: an axis from 6 to 17 would otherwise have no tick between 10 and 20
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.5, 2, 3, 4, 5, 6, 7, 8, 9)))
    ax.yaxis.set_major_formatter(FuncFormatter(_si))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _guides(ax: Axes, xs: list[int], ys: list[float]) -> None:
    """Light ∝T and ∝T² lines through the middle of the data, to read slopes against."""
    if len(xs) < 2 or not ys:
        return
    x0 = (min(xs) * max(xs)) ** 0.5
    y0 = (min(ys) * max(ys)) ** 0.5
    lo, hi = min(xs), max(xs)
    for power, label in ((1, "∝ T"), (2, "∝ T²")):
        ax.plot(
            [lo, hi],
            [y0 * (lo / x0) ** power, y0 * (hi / x0) ** power],
            color="0.6",
            lw=0.8,
            ls=(0, (4, 4)),
            zorder=0,
        )
        ax.annotate(label, (hi, y0 * (hi / x0) ** power), fontsize=8, color="0.45")


def _measured(points: list[dict], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for p in points:
        y = get(p)
        if y is not None:
            xs.append(p["seq_len"])
            ys.append(y)
    return xs, ys


def _median_ms(m: dict[str, Any]) -> float | None:
    return 1e3 * m["median_s"] if "median_s" in m else None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_time(result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, name in zip(axes, ("forward", "forward_backward"), strict=True):
        all_x, all_y = [], []
        for model in result["models"]:
            xs, ys = _measured(model["points"], lambda p, n=name: _median_ms(p[n]))
            if not xs:
                continue
            fit = model["fits"][name]
            label = model["arch"]
            if fit is not None:
                label += f"  slope {fit['slope']:.2f} (last {fit['last_slope']:.2f})"
            ax.plot(xs, ys, marker="o", label=label)
            all_x += xs
            all_y += ys
        _log_y(ax)
        _length_axis(ax, result["settings"]["seq_lens"])
        _guides(ax, all_x, all_y)
        ax.set_ylabel("time per batch (ms, median)")
        ax.set_title(PASS_TITLES[name])
        if ax.get_legend_handles_labels()[0]:  # every length skipped: nothing to label
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(titles(result)["models"], fontsize=10)
    return _save(fig, path)


def plot_decode(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for model in result["models"]:
        xs, ys = _measured(model["points"], lambda p: _median_ms(p["decode"]))
        if xs:
            fit = model["fits"]["decode"]
            label = model["arch"] + (f"  slope {fit['slope']:.2f}" if fit else "")
            ax.plot(xs, ys, marker="o", label=label)
    _log_y(ax)
    _length_axis(ax, result["settings"]["seq_lens"])
    ax.set_xlabel("context length T (tokens already in the state)")
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title("decode: one token after a prefill of T tokens", fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # every length skipped: nothing to label
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_state(result: dict[str, Any], path: Path) -> Path:
    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, model in enumerate(result["models"]):
        color = f"C{i}"
        pts = model["points"]
        xs = [p["seq_len"] for p in pts]
        ax_s.plot(
            xs,
            [p["analytic"]["state_bytes"] / 2**20 for p in pts],
            color=color,
            label=f"{model['arch']} (analytic)",
        )
        mx, my = _measured(pts, lambda p: p["decode"].get("state_bytes"))
        if mx:
            ax_s.plot(mx, [y / 2**20 for y in my], "o", color=color, mfc="none")
        ax_f.plot(
            xs,
            [p["analytic"]["prefill_flops_per_token"] for p in pts],
            color=color,
            marker=".",
            label=model["arch"],
        )
    ax_s.plot([], [], "o", color="0.3", mfc="none", label="held after prefill (measured)")
    for ax in (ax_s, ax_f):
        _log_y(ax)
        _length_axis(ax, result["settings"]["seq_lens"])
        ax.legend(fontsize=8)
    ax_s.set_ylabel("MiB per sequence")
    ax_s.set_title("state / KV cache after T tokens")
    ax_f.set_ylabel("FLOPs per token")
    ax_f.set_title("analytic forward FLOPs per token (prefill of T tokens)")
    fig.suptitle(titles(result)["models"], fontsize=10)
    return _save(fig, path)


def plot_ops(result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, name in zip(axes, OP_PASSES, strict=True):
        for i, op in enumerate(result["ops"]):
            for impl in op["impls"]:
                xs, ys = _measured(op["points"], lambda p, m=impl, n=name: _median_ms(p[m][n]))
                if not xs:
                    continue
                ls, marker = PEER_STYLES.get(impl, ("-.", "s"))
                fit = op["fits"][impl][name]
                slope = f"  slope {fit['slope']:.2f}" if fit else ""
                ax.plot(
                    xs,
                    ys,
                    ls=ls,
                    marker=marker,
                    color=f"C{i}",
                    label=f"{op['op']}: {impl}{slope}",
                )
        _log_y(ax)
        _length_axis(ax, result["settings"]["seq_lens"])
        ax.set_ylabel("time per batch (ms, median)")
        ax.set_title(PASS_TITLES[name])
        if ax.get_legend_handles_labels()[0]:  # every length skipped: nothing to label
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(titles(result)["ops"], fontsize=10)
    return _save(fig, path)


# file → what draws it, and from which part of the result
PLOTS = {
    "time.png": ("models", plot_time),
    "decode.png": ("models", plot_decode),
    "state.png": ("models", plot_state),
    "ops.png": ("ops", plot_ops),
}
PLOT_FILES = tuple(PLOTS)


def plot_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return [plot(result, out_dir / name) for name, (part, plot) in PLOTS.items() if result[part]]
