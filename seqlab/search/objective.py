"""The objective of an architecture search: one Optuna trial is one candidate of a SearchSpace,
costed, held to the limits, and trained unless it already was.

    objective = Objective(SearchSpace.load("demo"), base, out="search",
                          objectives=("accuracy", "state_bytes"), limits={"params": 2e5},
                          store_path="search/results.db")
    sampler = optuna.samplers.TPESampler(seed=0)   # reads the trials' constraints itself
    study = optuna.create_study(directions=objective.directions, sampler=sampler)
    for key, value in objective.study_user_attrs().items():
        study.set_user_attr(key, value)
    study.optimize(objective, n_trials=10, catch=(Exception,))

Objectives: the quality first, "accuracy" (held-out accuracy over all slices, maximised) or
"bits_per_byte" (text tasks, minimised), taken from the run's final evaluation (`quality_at=
"best"`: the best evaluation's); then any costs, minimised, from seqlab.profile on the meta
device, for one sequence at `context_len` tokens (default: the task's longest sequence), float32:
"state_bytes", "params", "flops_per_token" (forward FLOPs per token of a prefill of context_len
tokens), "decode_flops_per_token" (one token decoded after context_len), "decode_latency"
(seconds per decoded token after a prefill of context_len, measured: median of 9 steps of the
untrained model on the train device). Every trial's user_attrs "costs" holds them all.

A trial, in order (each step sets user_attrs that seqlab.search.report reads):
1. sample the candidate: arch, key, known, config (the ExperimentConfig as its TOML would read,
   train.out_dir unset: `seqlab train --config` of it runs the trial again);
2. cost it: costs, and constraints = [value − limit for each limit], feasible when all ≤ 0,
   also set as the trial's Optuna constraints (named after the limits), which Optuna 5's samplers
   (TPE, NSGA-II, GP) read without a constraints_func. A candidate over a limit is
   not trained: it completes with the worst quality (accuracy 0, bits per byte 8, chance for
   bytes) and its costs, and user_attr infeasible = True;
3. reuse, without training: the values of a COMPLETE trial of this study with the same key
   (duplicate_of = its number, or its original's), else the metrics of a completed run in the
   results store with the same task, canonical model and train settings (device, out_dir and
   progress aside) (reused_run and run_id = that run's id);
4. train with run_experiment into <out>/trials/<key as text>-<hash>/, progress off, recorded in
   the store with {"search": {key, identity, study, trial, space}}: metrics (final, per slice),
   best_metrics, run_id, stop_reason, steps, resumed_from, wall_time_s. A trial retried after a
   crash has the same params, so the same folder, and resumes from its last checkpoint.

A run that diverges (stop_reason "non_finite") or any error fails the trial: TrialFailed (or the
error itself) is raised with user_attr fail_reason set, so the study marks it FAIL and no
non-finite number reaches the study; the store records a diverged run with status "diverged".
If another trial is training the same candidate (its folder is locked), the trial waits for it,
checking every LOCK_POLL_S seconds, and reuses its result once that trial completes or its run is
in the store; if the lock is released without either (the other trial failed or was killed), it
trains itself, resuming from the folder's checkpoint; after `lock_wait_s` it fails, saying so.

An Objective holds only plain data (the space, the base as a dict, paths, names), so it pickles
to worker processes and Ray tasks; the task and the store are made in each process when first
needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from seqlab.config import check_positive_int
from seqlab.experiment import (
    ExperimentConfig,
    ExperimentError,
    experiment_from_dict,
    experiment_to_toml,
    run_experiment,
)
from seqlab.files import FolderInUse
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.profile.cost import model_cost
from seqlab.profile.measure import time_call
from seqlab.search.space import SearchSpace, canonical_model
from seqlab.tasks import TASKS, SyntheticTask, Task, task_config
from seqlab.train.results import ResultsStore, finite_json
from seqlab.train.trainer import RESUMABLE_CHANGES, resolve_device

QUALITY = {"accuracy": "maximize", "bits_per_byte": "minimize"}
COSTS = ("state_bytes", "params", "flops_per_token", "decode_flops_per_token", "decode_latency")
# What an infeasible (untrained) candidate scores: nothing right, chance over bytes.
WORST = {"accuracy": 0.0, "bits_per_byte": 8.0}
QUALITY_AT = ("final", "best")


class TrialFailed(RuntimeError):
    """A trial that gives no values: its run diverged, or waiting for its folder timed out."""


def constraints(trial: FrozenTrial) -> list[float]:
    """A trial's constraints (value − limit per limit; ≤ 0 is feasible), as a sampler's
    constraints_func reads them. Optuna 5 deprecates constraints_func: its samplers read the
    constraints the objective sets with trial.set_constraint, so none need be passed."""
    return list(trial.user_attrs.get("constraints") or [])


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment as its TOML file reads (unset values as "none"): JSON-able, and
    experiment_from_dict of it gives `cfg` back."""
    return tomllib.loads(experiment_to_toml(cfg))


def run_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What makes two runs the same: the task's resolved config, the canonical model, and every
    train setting but those that change nothing in the trajectory (device, out_dir, progress)."""
    task = task_config(cfg.task.name, cfg.task.preset, **cfg.task.options)
    train = cfg.train.model_dump(mode="json")
    return {
        "task": {"name": cfg.task.name, "config": task.model_dump(mode="json")},
        "model": canonical_model(cfg.model),
        "train": {k: v for k, v in train.items() if k not in RESUMABLE_CHANGES},
    }


def identity_hash(cfg: ExperimentConfig) -> str:
    text = json.dumps(run_identity(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trial_folder_name(key: str, identity: str) -> str:
    """A folder name for a candidate: its key as safe text (cut short, at a whole part), then
    its identity."""
    text = re.sub(r"[^A-Za-z0-9.=]+", "-", key).strip("-")
    if len(text) > 64:
        text = text[:65].rsplit("-", 1)[0]
    return f"{text}-{identity}"


def decode_latency(model_config: ModelConfig, context_len: int, device: str = "cpu") -> float:
    """Seconds per decoded token after a prefill of `context_len` tokens: median of 9 steps,
    after 2 warm-up steps, of the untrained model (its weights do not change the time)."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(model_config.vocab_size, (1, context_len + 1), generator=gen).to(dev)
    model = CausalLM(model_config).to(dev).eval()
    with torch.no_grad():
        state = [model(ids[:, :-1]).state]
    token = ids[:, -1:]

    def step() -> None:
        with torch.no_grad():
            state[0] = model(token, state[0], check_ids=False).state

    return time_call(step, dev, warmup=2, repeats=9).median_s


class Objective:
    """Call it with an Optuna trial (see the module docstring); `names` and `directions` give
    the study's objectives, `study_user_attrs()` what seqlab.search.report reads.

    train_fn: what trains (run_experiment's signature); threads: torch threads during a trial;
    lock_wait_s: how long to wait for another trial training the same candidate."""

    LOCK_POLL_S = 2.0

    def __init__(
        self,
        space: SearchSpace,
        base: ExperimentConfig,
        out: str | Path,
        objectives: Sequence[str] = ("accuracy", "state_bytes"),
        limits: Mapping[str, float] | None = None,
        context_len: int | None = None,
        store_path: str | Path | None = None,
        *,
        quality_at: str = "final",
        threads: int | None = None,
        lock_wait_s: float = 6 * 3600.0,
        train_fn: Callable[..., tuple[Any, dict | None]] = run_experiment,
    ):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if not isinstance(base, ExperimentConfig):
            raise TypeError(f"base must be an ExperimentConfig, got {type(base).__name__}")
        self.space = space
        self.base_data = base.model_dump(mode="json")
        self.out = str(out)
        self.objectives = tuple(objectives)
        self.limits = {k: float(v) for k, v in (limits or {}).items()}
        self.context_len = context_len
        self.store_path = None if store_path is None else str(store_path)
        self.quality_at = quality_at
        self.threads = threads
        self.lock_wait_s = float(lock_wait_s)
        self.train_fn = train_fn
        self._check(base)
        self._cache: dict[str, Any] = {}
        _ = self.store  # opened (made if missing) now: a bad path fails before any trial

    def _check(self, base: ExperimentConfig) -> None:
        names = self.objectives
        if not names or names[0] not in QUALITY:
            raise ValueError(
                f"objectives: the first is the quality, one of {', '.join(QUALITY)}; "
                f"got {list(names)}"
            )
        for name in names[1:]:
            if name not in COSTS:
                raise ValueError(
                    f"objectives: unknown cost {name!r}; valid costs: {', '.join(COSTS)}"
                )
        if len(set(names)) < len(names):
            raise ValueError(f"objectives: a name repeats in {list(names)}")
        task_cls = TASKS[base.task.name][1]
        if task_cls.objective != "next_token":
            raise ValueError(
                f"task {base.task.name!r} is not a next-token task (objective "
                f"{task_cls.objective!r}): the trainer cannot fit it, so it cannot be searched"
            )
        if names[0] == "bits_per_byte" and issubclass(task_cls, SyntheticTask):
            raise ValueError(
                f"objective bits_per_byte: task {base.task.name!r} reports accuracy only; "
                "bits per byte is measured on streamed text (task text)"
            )
        for name, limit in self.limits.items():
            if name not in COSTS:
                raise ValueError(f"limits: unknown cost {name!r}; valid costs: {', '.join(COSTS)}")
            if not math.isfinite(limit) or limit < 0:
                raise ValueError(f"limits: {name} must be a finite number ≥ 0, got {limit}")
        if self.context_len is not None:
            check_positive_int("context_len", self.context_len)
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.quality_at not in QUALITY_AT:
            raise ValueError(f"quality_at must be one of {QUALITY_AT}, got {self.quality_at!r}")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}  # the task and store are made again where used

    @property
    def names(self) -> list[str]:
        return list(self.objectives)

    @property
    def directions(self) -> list[str]:
        return [QUALITY[self.objectives[0]]] + ["minimize"] * (len(self.objectives) - 1)

    @property
    def base(self) -> ExperimentConfig:
        if "base" not in self._cache:
            self._cache["base"] = experiment_from_dict(self.base_data)
        return self._cache["base"]

    @property
    def task(self) -> Task:
        if "task" not in self._cache:
            self._cache["task"] = self.base.task.build()
        return self._cache["task"]

    @property
    def store(self) -> ResultsStore | None:
        if self.store_path is None:
            return None
        if "store" not in self._cache:
            self._cache["store"] = ResultsStore(self.store_path)
        return self._cache["store"]

    @property
    def seq_len(self) -> int:
        """The context length the costs are taken at."""
        return self.context_len or self.task.seq_len

    def study_user_attrs(self) -> dict[str, Any]:
        """What the study should carry: its objectives and directions (report.py reads them),
        the task, space, base experiment, limits, context length and quality_at."""
        return {
            "objectives": self.names,
            "directions": self.directions,
            "task": self.base.task.name,
            "space": self.space.name,
            "space_source": self.space.source,
            "base": config_dict(self.base),
            "limits": dict(self.limits),
            "context_len": self.seq_len,
            "quality_at": self.quality_at,
        }

    def costs(self, model_config: ModelConfig, device: str = "cpu") -> dict[str, float]:
        """Every cost of a model at the context length (see the module docstring)."""
        cost = model_cost(model_config, self.seq_len)
        out = {
            "params": float(cost.params),
            "state_bytes": float(cost.state_bytes),
            "flops_per_token": float(cost.prefill_per_token),
            "decode_flops_per_token": float(cost.decode.total),
        }
        if "decode_latency" in self.objectives or "decode_latency" in self.limits:
            out["decode_latency"] = decode_latency(model_config, self.seq_len, device)
        return out

    def __call__(self, trial: optuna.Trial) -> list[float]:
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._evaluate(trial)
        except Exception as e:
            reason = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason)
            raise
        finally:
            torch.set_num_threads(threads)

    def _evaluate(self, trial: optuna.Trial) -> list[float]:
        candidate = self.space.sample(trial)
        trial.set_user_attr("arch", candidate.arch)
        trial.set_user_attr("key", candidate.key)
        trial.set_user_attr("known", self.space.known_name(candidate))
        try:
            cfg = candidate.experiment(self.base)
        except ExperimentError as e:
            raise TrialFailed(f"candidate {candidate.key} does not build: {e}") from None
        cfg = cfg.updated({"train.out_dir": None})
        trial.set_user_attr("config", config_dict(cfg))

        costs = self.costs(cfg.model_config_for(self.task.vocab_size), cfg.train.device)
        trial.set_user_attr("costs", costs)
        cost_values = [costs[name] for name in self.objectives[1:]]
        over = [costs[name] - limit for name, limit in self.limits.items()]
        if self.limits:
            trial.set_user_attr("constraints", over)
            for name, value in zip(self.limits, over, strict=True):
                trial.set_constraint(name, value)  # Optuna 5's samplers read these
        if any(c > 0 for c in over):
            trial.set_user_attr("infeasible", True)
            return [WORST[self.objectives[0]], *cost_values]

        values = self._reuse(trial, candidate.key, cfg, cost_values)
        if values is None:
            values = self._train(trial, candidate.key, cfg, cost_values)
        return values

    def _reuse(
        self, trial: optuna.Trial, key: str, cfg: ExperimentConfig, costs: list[float]
    ) -> list[float] | None:
        """The values of this candidate if it was evaluated already (see the module docstring);
        sets the user_attrs that say where they come from."""
        study = getattr(trial, "study", None)
        if study is not None:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            same = [
                t
                for t in done
                if t.user_attrs.get("key") == key and not t.user_attrs.get("infeasible")
            ]
            if same:
                original = min(same, key=lambda t: t.number)
                for name in ("metrics", "best_metrics", "run_id"):
                    trial.set_user_attr(name, original.user_attrs.get(name))
                trial.set_user_attr(
                    "duplicate_of", original.user_attrs.get("duplicate_of", original.number)
                )
                return list(original.values)
        record = self._stored_run(cfg)
        if record is None:
            return None
        trial.set_user_attr("reused_run", record["id"])
        trial.set_user_attr("run_id", record["id"])
        metrics = record["metrics"]
        return self._values(trial, metrics["final"], metrics["best"], costs)

    def _stored_run(self, cfg: ExperimentConfig) -> dict[str, Any] | None:
        """The newest completed run in the store with this run's identity, or None."""
        store = self.store
        if store is None:
            return None
        where = {
            "status": "completed",
            "model.d_model": cfg.model.d_model,
            "train.steps": cfg.train.steps,
            "train.lr": cfg.train.lr,
            "train.seed": cfg.train.seed,
        }
        identity = run_identity(cfg)
        for record in reversed(store.runs(task=cfg.task.name, where=where)):
            if "experiment" not in record:
                continue  # recorded before runs carried their experiment
            try:
                theirs = run_identity(experiment_from_dict(record["experiment"]))
            except ValueError:
                continue  # a config this version no longer reads
            if theirs == identity:
                return record
        return None

    def _train(
        self, trial: optuna.Trial, key: str, cfg: ExperimentConfig, costs: list[float]
    ) -> list[float]:
        identity = identity_hash(cfg)
        folder = Path(self.out) / "trials" / trial_folder_name(key, identity)
        run_cfg = cfg.updated({"train.out_dir": str(folder), "train.progress": False})
        study = getattr(trial, "study", None)
        search = {
            "key": key,
            "identity": identity,
            "study": study.study_name if study is not None else None,
            "trial": trial.number,
            "space": self.space.name,
        }
        waited = 0.0
        while True:
            try:
                result, record = self.train_fn(
                    run_cfg, store=self.store, extra={"search": search}, task=self.task
                )
                break
            except FolderInUse as e:
                if waited >= self.lock_wait_s:
                    raise TrialFailed(
                        f"{e}: another trial has trained this candidate for over "
                        f"{waited:.0f} s (lock_wait_s); not waiting longer"
                    ) from None
                time.sleep(self.LOCK_POLL_S)
                waited += self.LOCK_POLL_S
                values = self._reuse(trial, key, cfg, costs)
                if values is not None:
                    return values
        trial.set_user_attr("run_id", record["id"] if record else None)
        trial.set_user_attr("stop_reason", result.stop_reason)
        trial.set_user_attr("steps", result.step)
        trial.set_user_attr("resumed_from", result.resumed_from)
        trial.set_user_attr("wall_time_s", result.wall_time_s)
        if result.stop_reason == "non_finite":
            trial.set_user_attr("metrics", finite_json(result.final))
            raise TrialFailed(f"diverged: {result.message}")
        return self._values(trial, result.final, result.best, costs)

    def _values(
        self,
        trial: optuna.Trial,
        final: Mapping[str, Any],
        best: Mapping[str, Any],
        costs: list[float],
    ) -> list[float]:
        """[quality, *costs] from a run's metrics; TrialFailed if the quality is missing or not
        finite."""
        trial.set_user_attr("metrics", finite_json(dict(final)))
        trial.set_user_attr("best_metrics", finite_json(dict(best)))
        name = self.objectives[0]
        metric = "all" if name == "accuracy" else name
        value = (best if self.quality_at == "best" else final).get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise TrialFailed(
                f"the run gave no finite {name} ({self.quality_at} {metric} = {value!r})"
            )
        return [float(value), *costs]
