"""A toy objective for the study tests, shaped like a search's: two int params name a candidate,
whose training takes `steps` steps of `step_seconds`, writes a checkpoint atomically after each
into <out>/trials/<key>/ and resumes from it. Its user_attrs say which process ran it ("pid"),
with how many torch threads ("threads", when torch is loaded), from which step it started
("resumed_from") and which folder it trains in ("key"). Candidates listed in `fail` fail at step 2:
"raise" raises, "own" sets its own fail_reason and raises, "nan" returns nan, "exit" ends the
process at once (exit code 3), as a crash would, "quit" raises SystemExit (no Exception).

    python -m tests.search.toy '{"toy": {...}, "run": {...}}'   # run_study on it, as a search does

exits 0 when the study is full, 130 on Ctrl-C, 1 on a SearchError.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from seqlab.files import write_text_atomic
from seqlab.search.study import SearchError, run_study

DIRECTIONS = ["maximize", "minimize"]


def key(a: int, b: int) -> str:
    return f"a={a},b={b}"


def checkpoint(out: str | os.PathLike, trial_key: str) -> Path:
    return Path(out) / "trials" / trial_key / "checkpoint.json"


def checkpoint_step(out: str | os.PathLike, trial_key: str) -> int:
    path = checkpoint(out, trial_key)
    return json.loads(path.read_text())["step"] if path.exists() else 0


@dataclass(frozen=True)
class Toy:
    out: str
    steps: int = 4
    step_seconds: float = 0.05
    fail: dict[int, str] = field(default_factory=dict)  # a → "raise", "own", "nan", "exit"...

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        a = trial.suggest_int("a", 0, 999)
        b = trial.suggest_int("b", 0, 999)
        trial_key = key(a, b)
        start = checkpoint_step(self.out, trial_key)
        trial.set_user_attr("key", trial_key)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("resumed_from", start)
        if "torch" in sys.modules:
            trial.set_user_attr("threads", sys.modules["torch"].get_num_threads())
        path = checkpoint(self.out, trial_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for step in range(start, self.steps):
            time.sleep(self.step_seconds)
            if step == 2 and self.fail.get(a) in ("raise", "own"):
                if self.fail[a] == "own":
                    trial.set_user_attr("fail_reason", f"loss diverged at step {step}")
                raise ValueError(f"toy candidate {trial_key} broke at step {step}")
            if step == 2 and self.fail.get(a) == "nan":
                return float("nan"), float(b)
            if step == 2 and self.fail.get(a) == "exit":
                os._exit(3)
            if step == 2 and self.fail.get(a) == "quit":
                raise SystemExit(f"toy candidate {trial_key} quits")
            write_text_atomic(path, json.dumps({"step": step + 1}))
        trial.set_user_attr("constraints", [a - 900.0])
        return (a % 97) / 97, float(b + 1)


def main(spec: str) -> int:
    args = json.loads(spec)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        toy = args["toy"]
        fail = {int(a): how for a, how in toy.pop("fail", {}).items()}  # JSON keys are text
        run_study(Toy(**toy, fail=fail), directions=DIRECTIONS, **args["run"])
    except KeyboardInterrupt:
        return 130
    except SearchError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
