"""What the tests of benchmarks/ share: the repository root, and the environment its scripts run
in as subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script_env(interpret: bool) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, then the path this
    process found its packages on (fla through PYTHONPATH, as gpu_run.sh and
    check_gpu_image.sh install it), and TRITON_INTERPRET=1 only if `interpret`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env
