"""Typed configs: a pydantic model per component; unknown keys fail, listing the valid ones.

Values are strict: an int field takes an int (not True, 5.0 or "5"), a bool field a bool (not 1
or "yes"), a float field a float or an int. Lists fill tuple fields (TOML, JSON and pattern
options give lists), and their items are strict too.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Self

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


def parse_device(name: str, auto: bool = False) -> torch.device:
    """A device that exists here: cpu, cuda or cuda:N (N below the CUDA device count), or, with
    `auto`, "auto" (cuda if available, else cpu); anything else is a ValueError naming it."""
    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        valid = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
        raise ValueError(f"bad device {name!r}; use {valid}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:1 as cpu
        raise ValueError(f"device {name!r}: there is one cpu device (cpu or cpu:0)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is visible to torch here")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
    return device


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Config(BaseModel):
    """Base of every component config: frozen, strict about keys, built with `make`."""

    # allow_inf_nan=False: no float option of any component takes NaN or ±inf (an inf
    # init_std built non-finite weights; an inf width factor overflowed deep in a mixer)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_fill_tuples(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: _as_tuples(v) if k in fields and _is_tuple(fields[k].annotation) else v
            for k, v in data.items()
        }

    @classmethod
    def make(cls, **options: Any) -> Self:
        """Build from keyword options; an unknown key or bad value raises a ValueError."""
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                f"valid options are: {', '.join(sorted(cls.model_fields))}"
            )
        try:
            return cls(**options)
        except ValidationError as e:
            problems = "; ".join(
                ": ".join(filter(None, (".".join(map(str, err["loc"])), err["msg"])))
                for err in e.errors()
            )
            raise ValueError(f"{cls.__name__}: {problems}") from None

    @classmethod
    def for_component(cls, owner: type, config: Config | None) -> Self:
        """`config`, or the defaults when None; a config of another class is a TypeError."""
        if config is None:
            return cls()
        if not isinstance(config, cls):
            raise TypeError(f"{owner.__name__} takes a {cls.__name__}, got {type(config).__name__}")
        return config


def _is_tuple(annotation: Any) -> bool:
    """A tuple type, or an optional one."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(annotation))
    return annotation is tuple or origin is tuple


def _as_tuples(value: Any) -> Any:
    """Lists, at any depth, as tuples: [[64, 4, 10]] → ((64, 4, 10),)."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value
