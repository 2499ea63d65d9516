"""What the tests of benchmarks/ share: the repository root, a script loaded as a module, and the
environment its scripts run in as subprocesses."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """The script at `path` (e.g. ROOT / "benchmarks" / "bench_families.py") as a fresh module,
    registered in sys.modules under `name` (its stem) while it runs, as dataclasses need."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_env(interpret: bool) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, then the path this
    process found its packages on (fla through PYTHONPATH, as gpu_run.sh and
    check_gpu_image.sh install it), and TRITON_INTERPRET=1 only if `interpret`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env
