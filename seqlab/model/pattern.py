"""Architectures as one short string.

    "gdn*3,attn"                          → gdn, gdn, gdn, attn
    "gla(expand_k=0.5)*2,attn(window=256)" → gla, gla, attn, each with its options

Items are separated by top-level commas; `name(key=value, ...)` gives options (Python literals);
`*n` repeats an item. The expanded pattern repeats to fill `n_layers`, which must be a multiple of
its length.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any

_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(?:\*\s*(\d+))?\s*$", re.S)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a pattern: a mixer name and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"pattern {text!r}: unbalanced ')' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"pattern {text!r}: unbalanced '('")
    parts.append(text[start:])
    return parts


def _parse_options(item: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ValueError(f"pattern item {item!r}: options must read key=value, ...") from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError(f"pattern item {item!r}: options must read key=value, ...")
    options = {}
    for kw in call.keywords:
        try:
            options[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(
                f"pattern item {item!r}: option {kw.arg} must be a Python literal "
                f"(number, string, bool, None, tuple or list), got {ast.unparse(kw.value)}"
            ) from None
    return options


# The most layers a model may have: far above any model trained (~10² layers), low enough that
# checking a config stays quick (building 200,000 layers on the meta device took over a minute,
# and "gdn*99999999999" ran out of memory listing its layers).
MAX_LAYERS = 10_000


def parse_pattern(pattern: str) -> list[LayerSpec]:
    """Expand a pattern string into one LayerSpec per layer (before filling n_layers)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pattern must be a non-empty string like 'gdn*3,attn', got {pattern!r}")
    layers: list[LayerSpec] = []
    for item in _split_top_level(pattern):
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(
                f"pattern item {item.strip()!r} is not of the form name, name(key=value, ...) "
                f"or name*n (in {pattern!r})"
            )
        name, opts, times = m.groups()
        n = 1 if times is None else int(times)
        if n < 1:
            raise ValueError(f"pattern item {item.strip()!r}: the repeat count must be ≥ 1")
        if len(layers) + n > MAX_LAYERS:
            raise ValueError(f"pattern {pattern!r} has over {MAX_LAYERS:,} layers (MAX_LAYERS)")
        layers += [LayerSpec(name, _parse_options(item.strip(), opts or ""))] * n
    return layers


def expand_pattern(pattern: str, n_layers: int | None = None) -> list[LayerSpec]:
    """The pattern repeated to `n_layers` layers (its own length when n_layers is None)."""
    layers = parse_pattern(pattern)
    if n_layers is None:
        return layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if n_layers > MAX_LAYERS:
        raise ValueError(f"n_layers = {n_layers:,} is over {MAX_LAYERS:,} (MAX_LAYERS)")
    if n_layers % len(layers):
        raise ValueError(
            f"n_layers = {n_layers} is not a multiple of the {len(layers)} layers of "
            f"pattern {pattern!r}"
        )
    return layers * (n_layers // len(layers))


def layers_for(pattern: str, n_layers: int | None, default: int = 2) -> int:
    """`n_layers` if given; else the smallest multiple of the pattern's length ≥ `default`."""
    if n_layers is not None:
        return n_layers
    period = len(parse_pattern(pattern))
    return period * math.ceil(default / period)
