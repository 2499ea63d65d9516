"""Typed configs: a pydantic model per component; unknown keys fail, listing the valid ones."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError


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
