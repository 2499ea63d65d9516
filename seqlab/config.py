"""Typed configs: a pydantic model per component; unknown keys fail, listing the valid ones."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Config(BaseModel):
    """Base of every component config: frozen, strict about keys, built with `make`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
