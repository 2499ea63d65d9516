"""Search spaces: the architectures and training settings `seqlab search` may try, from TOML.

    space = SearchSpace.load("demo")           # shipped: "default", "demo"; or a path to a file
    candidate = space.sample(trial)            # only trial.suggest_*: TPE, NSGA-II, random all work
    cfg = candidate.experiment(base)           # the base's task and budget, the candidate's model
    for name, params in space.known().items():
        study.enqueue_trial(params)            # sample() maps them back to that architecture

A space file (every table optional but [model]):

    name = "demo"                   # else the file's stem
    description = "..."
    [model]                         # ModelSpec fields (not pattern or channel, built here)
    n_layers = [2, 4]               # required
    d_model = [32, 64]              # required
    [mixers]
    use = "all"                     # every registered token mixer (new ones join), or a list
    exclude = ["mamba2"]            # left out of "all"
    per_layer = false               # true: each non-attention layer draws its own mixer
    [hybrid]
    attention = "attn"              # the mixer the fraction counts (registered)
    fraction = [0.0, 0.25, 1.0]     # of the layers, rounded half up; at least one layer when
                                    # above 0, at most n_layers − 1 when below 1
    placement = ["striped", "last", "first"]   # where those layers go (striped: evenly, each
                                    # group of layers ending in one)
    options = {}                    # fixed options of the attention layers
    [widths]                        # drawn once per candidate, given to every layer whose
    num_heads = [2, 4]              # mixer's config has the option (found by introspection)
    [options.gdn]                   # one mixer's options (its config's fields), over [widths]
    allow_neg_eigval = [false, true]
    [channel]
    use = ["swiglu", "moe", "none"] # channel mixers by name, or "all"; "none": no channel mixer
    [channel.options.moe]
    num_experts = [4, 8]
    [train]                         # TrainConfig fields but out_dir, device and progress
    lr = [1e-3, 3e-3, 1e-2]
    [base.train]                    # defaults of the base experiment (under --config and --set)
    steps = 300
    [known.attention]               # a named architecture: values of the space's dimensions
    fraction = 1.0

A value is fixed (a number, bool or text), a choice (a list, one Optuna categorical), or a range
({low, high, step?, log?}: suggest_int when low and high are ints, else suggest_float). "none"
stands for None where the field allows it. A field whose value is itself a list (train.betas) is
fixed. The Optuna parameter of each dimension is named after its key: n_layers, d_model, fraction,
placement, mixer (per layer: mixer.<i>), each width (num_heads), <mixer>.<option> (per layer:
<mixer>.<option>.<i>), channel, <channel>.<option>, and each train field (lr); a known
architecture is written in those names, and a dimension it leaves out takes its first choice (a
range: its middle, geometric when log).

Loading checks everything it can: unknown keys and names (listing the valid ones), bad ranges, and
every combination of d_model, widths and options of each mixer and channel mixer by building it
(on the meta device; ranges at their ends; at most MAX_CHECKS combinations per mixer, a seeded
sample beyond), so a sampled candidate builds.

Candidates are canonical: the layers are expanded, each mixer's options sorted with those at
their default dropped, the smallest repeating period kept and runs written name*n, so
"gdn,gdn,gdn,attn" and "gdn(allow_neg_eigval=False)*3,attn" with 4 layers are both
"gdn*3,attn", and their `key` (architecture and training settings) is the same.
"""

from __future__ import annotations

import itertools
import math
import random
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from seqlab.channel import CHANNEL_MIXERS, build_channel_mixer
from seqlab.experiment import (
    NONE,
    ExperimentConfig,
    ExperimentError,
    ModelSpec,
    accepts_none,
    load_experiment,
)
from seqlab.mixers import MIXERS, build_mixer
from seqlab.model.pattern import LayerSpec, expand_pattern, layers_for
from seqlab.train.trainer import TrainConfig

SHIPPED = ("default", "demo", "parity")
PLACEMENTS = ("striped", "last", "first")
# Set per trial by the search, never by a space.
TRAIN_RESERVED = ("out_dir", "device", "progress")
MAX_CHECKS = 2000
TABLES = (
    "name",
    "description",
    "model",
    "mixers",
    "hybrid",
    "widths",
    "options",
    "channel",
    "train",
    "base",
    "known",
)


class SpaceError(ValueError):
    """A search space that cannot be used: the message names the file, the key and what is valid."""


@dataclass(frozen=True)
class Dim:
    """One dimension: fixed (`value`), a categorical `choices`, or an int/float range."""

    name: str  # the Optuna parameter
    path: str  # where the space declares it
    kind: str  # "fixed", "choice", "int" or "float"
    value: Any = None
    choices: tuple = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Any, name: str | None = None) -> Any:
        name = name or self.name
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> tuple:
        """The values a load check tries: all choices, a range's two ends."""
        if self.kind == "fixed":
            return (self.value,)
        return self.choices if self.kind == "choice" else (self.low, self.high)


@dataclass(frozen=True)
class Candidate:
    """One point of a space: the ModelSpec and TrainConfig fields it sets (`model` holds the
    canonical pattern and channel), the params that drew it, its key and a short text."""

    params: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    key: str
    arch: str

    @property
    def pattern(self) -> str:
        return self.model["pattern"]

    def experiment(self, base: ExperimentConfig) -> ExperimentConfig:
        """`base` (task, budget, the fields the space leaves alone) with this candidate's model
        and train fields; checked, the model built on the meta device."""
        values = {f"model.{k}": v for k, v in self.model.items()}
        values |= {f"train.{k}": v for k, v in self.train.items()}
        return base.updated(values)


def _is_list_field(annotation: Any) -> bool:
    if accepts_none(annotation):
        return any(_is_list_field(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation in (tuple, list) or typing.get_origin(annotation) in (tuple, list)


def _field_check(cls: type[BaseModel], name: str) -> Callable[[Any], Any]:
    """Validation of one field's value, as strict as the config's own."""
    info = cls.model_fields[name]
    annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    strict = ConfigDict(strict=True, allow_inf_nan=False)
    return TypeAdapter(annotation, config=strict).validate_python


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def canonical_layer(spec: LayerSpec, registry: Mapping[str, type]) -> LayerSpec:
    """`spec` with its options validated, sorted, and those equal to the default dropped."""
    if spec.name not in registry:
        raise ValueError(f"unknown mixer {spec.name!r}; valid names: {', '.join(registry)}")
    config_cls = registry[spec.name].Config
    config, default = config_cls.make(**spec.options), config_cls()
    options = {
        k: getattr(config, k)
        for k in sorted(spec.options)
        if getattr(config, k) != getattr(default, k)
    }
    return LayerSpec(spec.name, options)


def compress(layers: list[str]) -> str:
    """One pattern for layer texts: the smallest period that repeats to all of them, its runs
    as name*n: [gdn, gdn, gdn, attn] * 2 → "gdn*3,attn"."""
    n = len(layers)
    period = next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))
    runs = [(name, len(list(group))) for name, group in itertools.groupby(layers[:period])]
    return ",".join(name if count == 1 else f"{name}*{count}" for name, count in runs)


def canonical_pattern(
    pattern: str, n_layers: int | None = None, registry: Mapping[str, type] | None = None
) -> tuple[str, int]:
    """(canonical pattern, number of layers) of `pattern` filled to `n_layers` (None: as
    ModelSpec resolves it). `registry`: the token mixers (MIXERS) by default."""
    n_layers = layers_for(pattern, n_layers)
    registry = MIXERS if registry is None else registry
    layers = [str(canonical_layer(s, registry)) for s in expand_pattern(pattern, n_layers)]
    return compress(layers), n_layers


def canonical_model(model: ModelSpec) -> dict[str, Any]:
    """The ModelSpec's fields with pattern and channel canonical and n_layers resolved: equal
    dicts for specs that build the same architecture however they are written."""
    data = model.model_dump(mode="json")
    data["pattern"], data["n_layers"] = canonical_pattern(model.pattern, model.n_layers)
    if model.channel is not None:
        data["channel"], _ = canonical_pattern(model.channel, data["n_layers"], CHANNEL_MIXERS)
    return data


def experiment_key(model: Mapping[str, Any], train: Mapping[str, Any]) -> str:
    """ "gdn*3,attn | channel=swiglu | d_model=64 | n_layers=4 | train.lr=0.003": the canonical
    pattern, then the other model fields and the train fields, sorted."""
    parts = [model["pattern"]]
    parts += [f"{k}={_key_value(model[k])}" for k in sorted(model) if k != "pattern"]
    parts += [f"train.{k}={_key_value(train[k])}" for k in sorted(train)]
    return " | ".join(parts)


def _key_value(value: Any) -> str:
    return NONE if value is None else value if isinstance(value, str) else repr(value)


def attention_count(fraction: float, n_layers: int) -> int:
    """fraction · n_layers rounded half up, at least 1 above 0, at most n_layers − 1 below 1."""
    k = math.floor(fraction * n_layers + 0.5)
    if fraction > 0:
        k = max(k, 1)
    if fraction < 1:
        k = min(k, n_layers - 1)
    return k


def attention_positions(placement: str, k: int, n_layers: int) -> set[int]:
    """The k layers (0-based) that are attention: striped (each of k even groups ends in one),
    last or first."""
    if placement == "striped":
        return {(j + 1) * n_layers // k - 1 for j in range(k)}
    return set(range(n_layers - k, n_layers)) if placement == "last" else set(range(k))


class _Draws:
    """A trial seen by `sample`: suggests through it and keeps the params drawn, in order."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.params: dict[str, Any] = {}

    def __call__(self, dim: Dim, name: str | None = None) -> Any:
        value = dim.suggest(self.trial, name)
        if dim.kind != "fixed":
            self.params[name or dim.name] = value
        return value


class _Defaults:
    """A trial that answers with given values, else each dimension's default (first choice,
    middle of a range); `sample` run on it turns a known entry into full params."""

    def __init__(self, given: Mapping[str, Any], where: str):
        self.given, self.where, self.used = dict(given), where, set()

    def _take(self, name: str, ok: Callable[[Any], bool], valid: str, default: Any) -> Any:
        if name not in self.given:
            return default
        self.used.add(name)
        value = self.given[name]
        if not ok(value):
            raise SpaceError(f"{self.where}: {name} = {value!r} is not {valid}")
        return value

    def suggest_categorical(self, name: str, choices: tuple) -> Any:
        value = self._take(
            name, lambda v: _index(choices, v) is not None, f"one of {list(choices)}", choices[0]
        )
        return choices[_index(choices, value)]

    def suggest_int(self, name, low, high, step=1, log=False) -> int:
        mid = math.sqrt(low * high) if log else (low + high) / 2
        mid = min(high, low + step * round((mid - low) / step))

        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

        return self._take(name, ok, f"an int in [{low}, {high}]", int(mid))

    def suggest_float(self, name, low, high, step=None, log=False) -> float:
        mid = math.sqrt(low * high) if log else (low + high) / 2
        if step is not None:
            mid = low + step * round((mid - low) / step)
        ok = lambda v: _number(v) and low <= v <= high  # noqa: E731
        return float(self._take(name, ok, f"a number in [{low}, {high}]", mid))


def _index(choices: tuple, value: Any) -> int | None:
    """Where `value` is among `choices`, bools and numbers kept apart (True is not 1)."""
    for i, c in enumerate(choices):
        if type(c) is type(value) or (_number(c) and _number(value)):
            if c == value:
                return i
    return None


class SearchSpace:
    """A space read from TOML (see the module docstring); `load` finds shipped ones by name."""

    def __init__(self, data: Mapping[str, Any], source: str = "<space>"):
        self.source = source
        self.data = dict(data)
        self._parse()

    @classmethod
    def load(cls, name_or_path: str | Path) -> SearchSpace:
        """A shipped space by name ("default", "demo") or a TOML file by path."""
        text = str(name_or_path)
        if text in SHIPPED:
            file = resources.files("seqlab.search") / "spaces" / f"{text}.toml"
            source = f"seqlab/search/spaces/{text}.toml"
            raw = file.read_text()
        else:
            path = Path(text)
            if not path.is_file():
                raise SpaceError(
                    f"no search space {text!r}: shipped spaces are {', '.join(SHIPPED)}; "
                    "otherwise give the path of a TOML file"
                )
            source = str(path)
            try:
                raw = path.read_text()
            except OSError as e:
                raise SpaceError(f"{source}: cannot be read ({e.strerror or e})") from None
        try:
            data = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as e:
            raise SpaceError(f"{source}: not valid TOML ({e})") from None
        data.setdefault("name", Path(source).stem)
        return cls(data, source)

    def _error(self, path: str, problem: str) -> SpaceError:
        return SpaceError(f"{self.source}: {path + ': ' if path else ''}{problem}")

    def _table(self, path: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
        table: Any = self.data
        for part in path.split(".") if path else ():
            table = table.get(part, {}) if isinstance(table, dict) else table
        if not isinstance(table, dict):
            raise self._error(path, f"must be a table, got {table!r}")
        if keys is not None:
            unknown = sorted(set(table) - set(keys))
            if unknown:
                raise self._error(
                    path,
                    f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}",
                )
        return table

    def _names(self, path: str, value: Any, registry: Mapping[str, Any], extra=()) -> list[str]:
        """ "all" (with `exclude`) or a list of registered names (or `extra`)."""
        valid = [*registry, *extra]
        if value == "all":
            return list(registry)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._error(path, f'must be "all" or a non-empty list of names from {valid}')
        for name in value:
            if name not in valid:
                raise self._error(path, f"unknown name {name!r}; registered: {', '.join(valid)}")
        if len(set(value)) < len(value):
            raise self._error(path, f"lists a name twice: {value}")
        return list(value)

    def _dim(
        self, name: str, path: str, spec: Any, none_ok: bool = False, list_value: bool = False
    ) -> Dim:
        def plain(v: Any, where: str) -> Any:
            if v == NONE and none_ok:
                return None
            if list_value and isinstance(v, list):
                return tuple(v)  # a tuple field's one value, e.g. train.betas
            if not isinstance(v, bool | int | float | str):
                raise self._error(where, f"values are numbers, bools or text, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise self._error(where, f"{v!r} is not finite")
            return v

        if isinstance(spec, dict):
            return self._range(name, path, spec)
        if isinstance(spec, list) and not list_value:
            if not spec:
                raise self._error(path, "an empty list of choices")
            choices = tuple(plain(v, path) for v in spec)
            for i, c in enumerate(choices):
                if _index(choices[:i], c) is not None:
                    raise self._error(path, f"lists {c!r} twice")
            if len(choices) == 1:
                return Dim(name, path, "fixed", value=choices[0])
            return Dim(name, path, "choice", choices=choices)
        return Dim(name, path, "fixed", value=plain(spec, path))

    def _range(self, name: str, path: str, spec: dict) -> Dim:
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise self._error(
                path,
                "a range is a table {low, high} with optional step and log"
                + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""),
            )
        low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
        if not (_number(low) and _number(high)) or not (step is None or _number(step)):
            raise self._error(path, f"low, high and step must be numbers, got {spec}")
        if not all(math.isfinite(v) for v in (low, high, step or 1)):
            raise self._error(path, f"low, high and step must be finite, got {spec}")
        if not isinstance(log, bool):
            raise self._error(path, f"log must be true or false, got {log!r}")
        if not low < high:
            raise self._error(path, f"low = {low} must be below high = {high}")
        if log and low <= 0:
            raise self._error(path, f"a log range needs low > 0, got {low}")
        if step is not None and (step <= 0 or log):
            raise self._error(path, f"step must be > 0 and cannot go with log, got {spec}")
        is_int = all(isinstance(v, int) for v in (low, high, step or 1))
        return Dim(name, path, "int" if is_int else "float", low=low, high=high, step=step, log=log)

    def _parse(self) -> None:
        self._table("", TABLES)
        self.name = self.data.get("name", "space")
        self.description = self.data.get("description", "")
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise self._error("name", "name and description must be text")
        self._parse_model()
        self._parse_mixers()
        self._parse_channel()
        self._parse_train()
        self.base = self._parse_base()
        self._check_names()
        self._check_builds()
        self._known: dict[str, dict[str, Any]] = {}
        self._known_keys: dict[str, str] = {}
        for name, given in self._table("known").items():
            self._add_known(name, given)

    def _parse_model(self) -> None:
        fields = ModelSpec.model_fields
        table = self._table("model", [f for f in fields if f not in ("pattern", "channel")])
        for required in ("n_layers", "d_model"):
            if required not in table:
                raise self._error(f"model.{required}", "required (a number, or choices)")
        order = ["n_layers", "d_model", *(k for k in table if k not in ("n_layers", "d_model"))]
        self.model_dims = [
            self._dim(k, f"model.{k}", table[k], accepts_none(fields[k].annotation)) for k in order
        ]
        for dim in self.model_dims:
            for value in dim.values():
                self._check_value(dim.path, _field_check(ModelSpec, dim.name), value)
        self.n_layers_dim, self.d_model_dim = self.model_dims[:2]

    def _check_value(self, path: str, check: Callable[[Any], Any], value: Any) -> None:
        try:
            check(value)
        except ValidationError as e:
            why = "; ".join(err["msg"] for err in e.errors())
            raise self._error(path, f"{value!r} is not valid: {why}") from None

    def _parse_mixers(self) -> None:
        table = self._table("mixers", ["use", "exclude", "per_layer"])
        self.mixers = self._names("mixers.use", table.get("use", "all"), MIXERS)
        exclude = table.get("exclude", [])
        if exclude:
            exclude = self._names("mixers.exclude", exclude, MIXERS)
            self.mixers = [m for m in self.mixers if m not in exclude]
        if not self.mixers:
            raise self._error("mixers", "no mixer is left to draw from")
        self.per_layer = table.get("per_layer", False)
        if not isinstance(self.per_layer, bool):
            raise self._error("mixers.per_layer", f"must be true or false, got {self.per_layer!r}")
        self.mixer_dim = Dim("mixer", "mixers.use", "choice", choices=tuple(self.mixers))
        if len(self.mixers) == 1:
            self.mixer_dim = Dim("mixer", "mixers.use", "fixed", value=self.mixers[0])

        hybrid = self._table("hybrid", ["attention", "fraction", "placement", "options"])
        self.attention = hybrid.get("attention", "attn")
        if self.attention not in MIXERS:
            raise self._error(
                "hybrid.attention",
                f"unknown mixer {self.attention!r}; registered: {', '.join(MIXERS)}",
            )
        self.fraction = self._dim("fraction", "hybrid.fraction", hybrid.get("fraction", 0.0))
        for value in self.fraction.values():
            if not _number(value) or not 0 <= value <= 1:
                raise self._error("hybrid.fraction", f"fractions lie in [0, 1], got {value!r}")
        self.placement = self._dim(
            "placement", "hybrid.placement", hybrid.get("placement", "striped")
        )
        if self.placement.kind not in ("fixed", "choice") or any(
            p not in PLACEMENTS for p in self.placement.values()
        ):
            raise self._error("hybrid.placement", f"must be one or a list of {list(PLACEMENTS)}")
        self.attention_options = self._table("hybrid.options", self._fields(self.attention))

        accepting = {*self.mixers, self.attention} if self._has_attention() else set(self.mixers)
        valid = sorted({f for m in accepting for f in self._fields(m)})
        self.widths = {
            k: self._dim(k, f"widths.{k}", v, any(self._none_ok(m, k) for m in accepting))
            for k, v in self._table("widths").items()
        }
        for k in self.widths:
            if k not in valid:
                raise self._error(
                    f"widths.{k}",
                    f"no mixer drawn here ({', '.join(sorted(accepting))}) has option {k!r}; "
                    f"their options: {', '.join(valid)}",
                )
        self.options = self._options("options", self.mixers, MIXERS)

    def _options(
        self, path: str, names: list[str], registry: Mapping[str, type]
    ) -> dict[str, dict[str, Dim]]:
        """{name: {option: its dimension}} from the tables under `path`, one per name."""
        out = {}
        for name, table in self._table(path, names).items():
            valid = list(registry[name].Config.model_fields)
            self._table(f"{path}.{name}", valid)
            out[name] = {
                k: self._dim(
                    f"{name}.{k}", f"{path}.{name}.{k}", v, self._none_ok(name, k, registry)
                )
                for k, v in table.items()
            }
        return out

    def _fields(self, mixer: str, registry: Mapping[str, type] = MIXERS) -> list[str]:
        return list(registry[mixer].Config.model_fields)

    def _none_ok(self, name: str, option: str, registry: Mapping[str, type] = MIXERS) -> bool:
        info = registry[name].Config.model_fields.get(option)
        return info is not None and accepts_none(info.annotation)

    def _has_attention(self) -> bool:
        return any(v > 0 for v in self.fraction.values())

    def _parse_channel(self) -> None:
        table = self._table("channel", ["use", "options"])
        names = self._names("channel.use", table.get("use", ["swiglu"]), CHANNEL_MIXERS, [NONE])
        choices = tuple(None if n == NONE else n for n in names)
        self.channel_dim = Dim("channel", "channel.use", "choice", choices=choices)
        if len(choices) == 1:
            self.channel_dim = Dim("channel", "channel.use", "fixed", value=choices[0])
        self.channel_options = self._options(
            "channel.options", [n for n in names if n != NONE], CHANNEL_MIXERS
        )

    def _parse_train(self) -> None:
        fields = TrainConfig.model_fields
        valid = [f for f in fields if f not in TRAIN_RESERVED]
        table = self._table("train", valid)
        self.train_dims = []
        for k, v in table.items():
            annotation = fields[k].annotation
            dim = self._dim(
                k, f"train.{k}", v, accepts_none(annotation), _is_list_field(annotation)
            )
            for value in dim.values():
                self._check_value(dim.path, _field_check(TrainConfig, k), value)
            self.train_dims.append(dim)

    def _parse_base(self) -> dict[str, Any]:
        base = self._table("base", ["task", "model", "train"])
        values = {f"{section}.{k}": v for section, table in base.items() for k, v in table.items()}
        try:
            load_experiment(defaults=values)
        except ExperimentError as e:
            raise self._error("base", str(e)) from None
        return values

    def _check_names(self) -> None:
        """Every parameter name is one dimension's."""
        dims = [*self.model_dims, self.fraction, self.placement, self.mixer_dim]
        dims += [*self.widths.values(), self.channel_dim, *self.train_dims]
        dims += [d for table in self.options.values() for d in table.values()]
        dims += [d for table in self.channel_options.values() for d in table.values()]
        seen: dict[str, str] = {}
        for dim in dims:
            if dim.name in seen and seen[dim.name] != dim.path:
                raise self._error(dim.path, f"its parameter {dim.name!r} is also {seen[dim.name]}")
            seen[dim.name] = dim.path

    def layer_dims(self, mixer: str, as_attention: bool) -> tuple[list[str], dict[str, Dim]]:
        """(the widths a layer of `mixer` takes, its own option dimensions): a hybrid attention
        layer takes the widths its config has but [hybrid.options] sets; a drawn layer those its
        own options do not set, and its own."""
        own = {} if as_attention else self.options.get(mixer, {})
        fixed = self.attention_options if as_attention else own
        fields = self._fields(mixer)
        return [k for k in self.widths if k in fields and k not in fixed], own

    def _check_builds(self) -> None:
        """Build every combination of d_model and the options of each mixer and channel mixer
        (on the meta device), so that no candidate of the space fails to build."""
        groups = []
        for mixer, as_attention in [(m, False) for m in self.mixers] + (
            [(self.attention, True)] if self._has_attention() else []
        ):
            widths, own = self.layer_dims(mixer, as_attention)
            fixed = self.attention_options if as_attention else {}
            dims = {k: self.widths[k] for k in widths} | own
            groups.append((mixer, dims, fixed, build_mixer))
        for c in self.channel_dim.values():
            if c is not None:
                groups.append((c, self.channel_options.get(c, {}), {}, build_channel_mixer))
        for name, dims, fixed, build in groups:
            axes = [self.d_model_dim.values(), *(d.values() for d in dims.values())]
            combos = list(itertools.product(*axes))
            if len(combos) > MAX_CHECKS:
                combos = random.Random(0).sample(combos, MAX_CHECKS)
            for d_model, *values in combos:
                options = fixed | dict(zip(dims, values, strict=True))
                try:
                    with torch.device("meta"):
                        build(name, d_model, **options)
                except (ValueError, TypeError) as e:
                    where = ", ".join(dims[k].path for k in dims) or "its options"
                    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
                    raise self._error(
                        where,
                        f"{name} does not build with d_model={d_model}"
                        + (f", {shown}" if shown else "")
                        + f": {e}",
                    ) from None

    def sample(self, trial: Any) -> Candidate:
        """The candidate a trial's params give, drawn with trial.suggest_* only (an enqueued or
        retried trial with the same params gives the same candidate)."""
        draw = _Draws(trial)
        model = {d.name: draw(d) for d in self.model_dims}
        n = model["n_layers"]
        k = attention_count(draw(self.fraction), n)
        at = attention_positions(draw(self.placement), k, n) if 0 < k < n else set(range(k))
        drawn = [i for i in range(n) if i not in at]
        names: dict[int, str] = {i: self.attention for i in at}
        if self.per_layer:
            names |= {i: draw(self.mixer_dim, f"mixer.{i}") for i in drawn}
        elif drawn:
            mixer = draw(self.mixer_dim)
            names |= dict.fromkeys(drawn, mixer)
        dims = {i: self.layer_dims(names[i], i in at) for i in range(n)}
        used = {k for widths, _ in dims.values() for k in widths}
        widths = {k: draw(d) for k, d in self.widths.items() if k in used}
        own: dict[tuple[str, str], Any] = {}  # (mixer, option): one draw, unless per layer
        layers = []
        for i in range(n):
            keys, own_dims = dims[i]
            options = {k: widths[k] for k in keys}
            for k, d in own_dims.items():
                if self.per_layer:
                    options[k] = draw(d, f"{d.name}.{i}")
                else:
                    if (names[i], k) not in own:
                        own[names[i], k] = draw(d)
                    options[k] = own[names[i], k]
            if i in at:
                options |= self.attention_options
            layers.append(LayerSpec(names[i], options))
        model["pattern"] = compress([str(canonical_layer(s, MIXERS)) for s in layers])
        channel = draw(self.channel_dim)
        if channel is not None:
            options = {k: draw(d) for k, d in self.channel_options.get(channel, {}).items()}
            channel = str(canonical_layer(LayerSpec(channel, options), CHANNEL_MIXERS))
        model["channel"] = channel
        train = {d.name: draw(d) for d in self.train_dims}
        return Candidate(
            params=draw.params,
            model=model,
            train=train,
            key=experiment_key(model, train),
            arch=self._arch(model),
        )

    @staticmethod
    def _arch(model: Mapping[str, Any]) -> str:
        """ "gdn*3,attn · 4L · d64 · swiglu"."""
        channel = model["channel"] or "no channel"
        return f"{model['pattern']} · {model['n_layers']}L · d{model['d_model']} · {channel}"

    def _add_known(self, name: str, given: Any) -> None:
        where = f"{self.source}: known.{name}"
        if not isinstance(given, dict):
            raise SpaceError(f"{where}: must be a table of dimension values, got {given!r}")
        trial = _Defaults({k: None if v == NONE else v for k, v in given.items()}, where)
        candidate = self.sample(trial)
        unused = sorted(set(given) - trial.used)
        if unused:
            raise SpaceError(
                f"{where}: sets {', '.join(unused)}, which this architecture does not draw; "
                f"it draws: {', '.join(candidate.params) or 'nothing'}"
            )
        if candidate.key in self._known_keys:
            raise SpaceError(
                f"{where}: the same candidate as known.{self._known_keys[candidate.key]} "
                f"({candidate.key})"
            )
        self._known[name] = candidate.params
        self._known_keys[candidate.key] = name

    def known(self) -> dict[str, dict[str, Any]]:
        """The named known architectures as Optuna params, for `study.enqueue_trial`."""
        return {name: dict(params) for name, params in self._known.items()}

    def known_name(self, candidate: Candidate) -> str | None:
        """The name of the known architecture `candidate` is (same key), or None."""
        return self._known_keys.get(candidate.key)

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r} from {self.source})"
