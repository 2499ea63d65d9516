"""Experiments as data: one ExperimentConfig (task, model, train) that `seqlab train`, `probe` and
`search` run, read from TOML with dotted overrides.

    cfg = load_experiment("run.toml", ["train.lr=3e-3", "model.pattern=gdn*3,attn"])
    result, record = run_experiment(cfg, store=ResultsStore())
    Path("again.toml").write_text(experiment_to_toml(cfg))  # seqlab train --config again.toml

A file holds up to three tables: [task] (name, preset and [task.options], the task config's keys),
[model] (ModelConfig's fields but vocab_size, which comes from the task) and [train] (TrainConfig's
fields). A key left out keeps its default. TOML has no null, so the text "none" unsets a field that
may be unset: model.channel = "none" (no channel mixer), train.grad_clip = "none" (no clipping).
An override reads KEY=VALUE with the value in TOML syntax (3e-3, true, [0.9, 0.99], "text"); a
value that is not TOML is taken as text, so model.pattern=gdn*3,attn needs no quotes.
"""

from __future__ import annotations

import copy
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ConfigDict, Field, ValidationError, model_validator

from seqlab.config import Config
from seqlab.model.lm import ModelConfig
from seqlab.model.pattern import MAX_LAYERS, layers_for
from seqlab.profile.cost import meta_model
from seqlab.tasks import TASKS, Task, build_task, task_config
from seqlab.train.results import ResultsStore, run_record
from seqlab.train.trainer import TrainConfig, Trainer, TrainResult

NONE = "none"  # TOML's spelling of an unset value
HEADER = (
    "# A seqlab experiment: seqlab train --config FILE [--set KEY=VALUE ...]\n"
    '# "none" leaves a field unset (TOML has no null).\n\n'
)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ExperimentError(ValueError):
    """A config that cannot be run: an unknown key, a bad value, an unreadable file."""


class TaskSpec(Config):
    name: str = "mqar"
    preset: str | None = "cpu"  # None: the source paper's settings
    options: dict[str, Any] = {}  # keys of the task's config, over the preset's

    @model_validator(mode="before")
    @classmethod
    def _options_as_lists(cls, data: Any) -> Any:
        # One form whatever the source (TOML lists, Python tuples), so equal specs compare equal.
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            return {**data, "options": _as_lists(data["options"])}
        return data

    @model_validator(mode="after")
    def _task_config_is_valid(self) -> TaskSpec:
        task_config(self.name, self.preset, **self.options)
        return self

    def build(self) -> Task:
        return build_task(self.name, self.preset, **self.options)


class ModelSpec(Config):
    """ModelConfig's fields but vocab_size, with the command line's defaults."""

    model_config = ConfigDict(allow_inf_nan=False)

    d_model: int = Field(64, gt=0)
    # None: 2, or the pattern's length rounded up to it
    n_layers: int | None = Field(None, gt=0, le=MAX_LAYERS)
    pattern: str = "attn"
    channel: str | None = "swiglu"
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _builds(self) -> ModelSpec:
        # On the meta device: every pattern and mixer option is checked, no memory is used.
        meta_model(self.config(vocab_size=1))
        return self

    def config(self, vocab_size: int) -> ModelConfig:
        fields = self.model_dump(exclude={"n_layers"})
        n_layers = layers_for(self.pattern, self.n_layers)
        return ModelConfig(vocab_size=vocab_size, n_layers=n_layers, **fields)


SECTIONS: dict[str, type[Config]] = {"task": TaskSpec, "model": ModelSpec, "train": TrainConfig}


class ExperimentConfig(Config):
    task: TaskSpec = TaskSpec()
    model: ModelSpec = ModelSpec()
    train: TrainConfig = TrainConfig()

    def model_config_for(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig for the task's vocabulary (pydantic reserves the name model_config)."""
        return self.model.config(vocab_size)

    def updated(self, values: Mapping[str, Any]) -> ExperimentConfig:
        """A checked copy with dotted keys set: cfg.updated({"model.pattern": "gdn"})."""
        data = self.model_dump()
        for key, value in values.items():
            set_key(data, key, value)
        return experiment_from_dict(data)


def valid_keys(section: str | None = None) -> list[str]:
    sections = [section] if section else list(SECTIONS)
    keys = [f"{s}.{f}" for s in sections for f in SECTIONS[s].model_fields]
    return [k + ".<option>" if k == "task.options" else k for k in keys]


def _check_path(parts: Sequence[str]) -> None:
    """A key names a field of a section, or an option under task.options."""
    key = ".".join(parts)
    if parts[0] not in SECTIONS:
        raise ExperimentError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
    fields = SECTIONS[parts[0]].model_fields
    if len(parts) == 1:
        raise ExperimentError(f"{key!r} is a table; set its keys: {', '.join(valid_keys(key))}")
    if parts[1] not in fields:
        raise ExperimentError(
            f"unknown key {key!r}; valid keys of [{parts[0]}]: {', '.join(valid_keys(parts[0]))}"
        )
    if len(parts) > (3 if parts[:2] == ["task", "options"] else 2):
        raise ExperimentError(f"unknown key {key!r}: {'.'.join(parts[:2])} has no sub-keys")


def _check_tables(data: Any, source: str = "") -> None:
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}an experiment is a table of [task], [model], [train]")
    try:
        for section, table in data.items():
            if section not in SECTIONS or not isinstance(table, dict):
                _check_path([section])  # raises: an unknown key, or a value where a table goes
            for key in table:
                _check_path([section, key])
        options = data.get("task", {}).get("options", {})
        if not isinstance(options, dict):
            raise ExperimentError(f"task.options must be a table, got {options!r}")
    except ExperimentError as e:
        raise ExperimentError(f"{where}{e}") from None


def set_key(data: dict, key: str, value: Any) -> None:
    """data["train"]["lr"] = value for key "train.lr", creating tables on the way."""
    if not _KEY.fullmatch(key):
        raise ExperimentError(f"{key!r} is not a dotted key like train.lr")
    parts = key.split(".")
    _check_path(parts)
    table = data
    for i, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            where = ".".join(parts[: i + 1])
            raise ExperimentError(f"cannot set {key!r}: {where} is {table!r}, not a table")
    table[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A TOML value ("3e-3" → 0.003, "[0.9, 0.99]" → a list, "'a b'" → "a b"), else the text."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if len(parsed) == 1 else text


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each "dotted.key=VALUE" set (see parse_value), in order."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ExperimentError(f"override {item!r} must read KEY=VALUE, e.g. train.lr=3e-3")
        set_key(data, key.strip(), parse_value(text.strip()))
    return data


def merge(base: dict, top: Mapping) -> dict:
    """`base` updated by `top`, table by table (a key of `top` wins)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ExperimentError(f"{path}: cannot be read ({e.strerror or e})") from None
    _check_tables(data, str(path))
    return data


def experiment_data(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> dict:
    """The experiment as a dict, keys checked, values not yet: `defaults` (dotted keys), under
    the file at `path`, under `values` (dotted keys, e.g. command-line flags), under
    `overrides` (KEY=VALUE texts)."""
    data: dict = {}
    for key, value in (defaults or {}).items():
        set_key(data, key, value)
    if path is not None:
        data = merge(data, read_toml(path))
    for key, value in (values or {}).items():
        set_key(data, key, value)
    return apply_overrides(data, overrides)


def experiment_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig of a dict shaped like the TOML file (as read, or with None for
    unset values, as in a results record's "experiment"); errors name the dotted key."""
    _check_tables(data)
    data = {section: _unset(SECTIONS[section], table) for section, table in data.items()}
    task = data.get("task", {})
    name = task.get("name", TaskSpec.model_fields["name"].default)
    if isinstance(task.get("options"), dict) and isinstance(name, str) and name in TASKS:
        data["task"] = {**task, "options": _unset(TASKS[name][0], task["options"])}
    try:
        return ExperimentConfig(**data)
    except ValidationError as e:
        raise ExperimentError(_problems(e)) from None


def load_experiment(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """The experiment of a TOML file (None: all defaults) with overrides; see experiment_data."""
    return experiment_from_dict(experiment_data(path, overrides, defaults=defaults, values=values))


def experiment_to_toml(cfg: ExperimentConfig) -> str:
    """Every field as TOML, unset ones as "none"; load_experiment reads back an equal config."""
    return HEADER + tomli_w.dumps(_none_as_text(cfg.model_dump(mode="json")))


def run_experiment(
    cfg: ExperimentConfig,
    *,
    store: ResultsStore | None = None,
    extra: Mapping[str, Any] | None = None,
    on_result: Callable[[TrainResult], None] | None = None,
    task: Task | None = None,
) -> tuple[TrainResult, dict | None]:
    """Train `cfg` (resuming from cfg.train.out_dir when it holds a checkpoint), call
    `on_result(result)`, then record the run in `store` with the config under "experiment" and
    `extra` merged in (e.g. {"tags": {...}}). Returns the result and the record with its id (None
    without a store), and "new": False where nothing was recorded because the run had already
    finished in its out_dir (nothing trained now) and `store` holds its record (a repeated
    command would count the run twice). `task`: cfg.task already built, to share one among
    runs."""
    task = task if task is not None else cfg.task.build()
    model_config = cfg.model_config_for(task.vocab_size)
    result = Trainer(model_config, task, cfg.train).run()
    if on_result is not None:
        on_result(result)
    if store is None:
        return result, None
    if cfg.train.out_dir is not None and result.resumed_from == result.step:
        where = {"train.out_dir": cfg.train.out_dir, "metrics.steps": result.step}
        where |= {"model.pattern": model_config.pattern, "task.name": cfg.task.name}
        if earlier := store.runs(where=where):
            return result, {**earlier[-1], "new": False}
    record = run_record(cfg.task.name, task, model_config, cfg.train, result, cfg.task.preset)
    record = merge(merge(record, {"experiment": cfg.model_dump(mode="json")}), extra or {})
    return result, {"id": store.add(record), **record, "new": True}


def accepts_none(annotation: Any) -> bool:
    """Whether a field of this annotation may be None (`X | None`, `Optional[X]`)."""
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _unset(cls: type[Config], table: Any) -> Any:
    """ "none" as None in the fields of `cls` that may be unset."""
    if not isinstance(table, dict):
        return table
    fields = cls.model_fields
    return {
        k: None if v == NONE and k in fields and accepts_none(fields[k].annotation) else v
        for k, v in table.items()
    }


def _none_as_text(value: Any) -> Any:
    if value is None:
        return NONE
    if isinstance(value, dict):
        return {k: _none_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_none_as_text(v) for v in value]
    return value


def _as_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_lists(v) for v in value]
    return value


def _problems(e: ValidationError) -> str:
    problems = []
    for err in e.errors():
        where = ".".join(map(str, err["loc"]))
        what = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and not isinstance(err["input"], dict):
            what += f" (got {err['input']!r})"
        problems.append(f"{where}: {what}" if where else what)
    return "; ".join(problems)
