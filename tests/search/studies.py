"""Studies built by hand, shaped as a search writes them: objectives and directions as study
user_attrs, and per trial the user_attrs arch, key, config, known, metrics, costs, constraints,
run_id, fail_reason, duplicate_of."""

from __future__ import annotations

import random
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

MQAR_OBJECTIVES = ["accuracy", "state_bytes", "params"]
MQAR_DIRECTIONS = ["maximize", "minimize", "minimize"]
PATTERNS = ["attn", "gdn", "gdn*3,attn", "gla", "gdn(allow_neg_eigval=true)", "retnet,attn"]
DISTRIBUTIONS = {
    "pattern": CategoricalDistribution(PATTERNS),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
}


def config_for(pattern: str, lr: float) -> dict[str, Any]:
    return {
        "task": {"name": "mqar", "preset": "cpu", "options": {"power_a": 0.02}},
        "model": {"pattern": pattern, "d_model": 64, "n_layers": 4},
        "train": {"lr": lr, "steps": 300, "betas": [0.9, 0.95]},
    }


def new_study(
    objectives=MQAR_OBJECTIVES, directions=MQAR_DIRECTIONS, storage=None, name="mqar-demo"
) -> optuna.Study:
    study = optuna.create_study(directions=directions, storage=storage, study_name=name)
    study.set_user_attr("objectives", list(objectives))
    study.set_user_attr("directions", list(directions))
    study.set_user_attr("task", "mqar")
    return study


def add(
    study: optuna.Study,
    pattern: str,
    values: list[float] | None,
    *,
    lr: float = 3e-3,
    state: TrialState = TrialState.COMPLETE,
    known: str | None = None,
    constraints: list[float] | None = None,
    sampler_constraints: dict[str, float] | None = None,
    fail_reason: str | None = None,
    duplicate_of: int | None = None,
    config: bool = True,
) -> int:
    """Add one trial; returns its number. `values` are (quality, *costs) in objective order."""
    names = study.user_attrs["objectives"]
    number = len(study.get_trials(deepcopy=False))
    attrs: dict[str, Any] = {"arch": pattern, "key": f"{pattern}|lr={lr:.3g}"}
    if config:
        attrs["config"] = config_for(pattern, lr)
    if known:
        attrs["known"] = known
    if values is not None:
        attrs["metrics"] = {"all": values[0], "kv=8": values[0] * 0.9}
        attrs["costs"] = dict(zip(names[1:], values[1:], strict=True)) | {"flops_per_token": 1e5}
        attrs["run_id"] = f"run-{number:04d}"
    if constraints is not None:
        attrs["constraints"] = constraints
    if fail_reason:
        attrs["fail_reason"] = fail_reason
    if duplicate_of is not None:
        attrs["duplicate_of"] = duplicate_of
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            values=values if state == TrialState.COMPLETE else None,
            params={"pattern": pattern, "lr": lr},
            distributions=DISTRIBUTIONS,
            user_attrs=attrs,
            constraints=sampler_constraints,
        )
    )
    return number


def demo_study(storage=None) -> optuna.Study:
    """An MQAR search: three known architectures, sampled ones, a failure, an infeasible trial
    (over a parameter limit) and a duplicate."""
    study = new_study(storage=storage)
    kib = 1024
    add(study, "attn", [0.97, 512 * kib, 210e3], known="attention")
    add(study, "gdn", [0.41, 16 * kib, 190e3], known="gdn")
    add(study, "gdn*3,attn", [0.93, 140 * kib, 197e3], known="hybrid 3:1")
    add(study, "gla", [0.33, 16 * kib, 180e3], lr=1e-3)
    add(study, "gdn(allow_neg_eigval=true)", [0.47, 16 * kib, 190e3], lr=5e-3)
    add(study, "retnet,attn", [0.86, 264 * kib, 200e3])
    add(study, "gla", None, state=TrialState.FAIL, lr=9e-3, fail_reason="loss diverged at step 40")
    add(study, "attn", [0.99, 512 * kib, 900e3], lr=8e-3, constraints=[900e3 - 500e3])
    add(study, "gdn*3,attn", [0.93, 140 * kib, 197e3], duplicate_of=2)
    add(study, "gdn", [0.52, 32 * kib, 240e3], lr=2e-3)
    add(study, "gla", [0.30, 8 * kib, 120e3], lr=4e-4)
    return study


def random_study(n_objectives: int, seed: int, n_trials: int = 60) -> optuna.Study:
    """Random values from a few levels (so ties happen), some trials infeasible by user_attrs or
    by sampler constraints, some failed, some duplicates."""
    rng = random.Random(seed)
    names = ["accuracy", "state_bytes", "params", "flops_per_token"][:n_objectives]
    directions = ["maximize"] + ["minimize"] * (n_objectives - 1)
    study = new_study(names, directions, name=f"random-{n_objectives}-{seed}")
    for _ in range(n_trials):
        pattern = rng.choice(PATTERNS)
        # costs from 12 levels; accuracy rises with the first cost, plus noise, in steps of 0.05
        powers = [rng.randint(10, 21) for _ in range(n_objectives - 1)]
        quality = min(1.0, (powers[0] - 10) / 14 + rng.uniform(0, 0.4))
        values = [round(20 * quality) / 20, *(float(2**p) for p in powers)]
        roll = rng.random()
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if roll < 0.1:
            add(study, pattern, None, state=TrialState.FAIL, fail_reason="out of memory")
        elif roll < 0.2:
            add(study, pattern, values, constraints=[rng.choice([1.0, 0.5])])
        elif roll < 0.3:
            add(study, pattern, values, sampler_constraints={"params": 3.0})
        elif roll < 0.4 and complete:
            original = rng.choice(complete)
            add(study, pattern, list(original.values), duplicate_of=original.number)
        else:
            add(study, pattern, values, constraints=[-rng.random()])
    return study
