"""MLflow and Weights & Biases beside TensorBoard: the same values under the same names and steps,
through each one's own library (the `tracking` extra: pip install -e '.[tracking]').

    TrainConfig(out_dir="runs/x", mlflow="out")    # MLflow store sqlite:///runs/x/mlflow.db
    TrainConfig(out_dir="runs/x", mlflow="sqlite:///mlflow.db", wandb="mqar-study")

`mlflow` is a tracking URI (sqlite:///FILE, http://HOST:PORT, databricks; a plain folder is
MLflow's file store, which MLflow 3.18 refuses unless MLFLOW_ALLOW_FILE_STORE=true) or "out", an
SQLite store in the run folder. The experiment is $MLFLOW_EXPERIMENT_NAME, else "seqlab". `wandb`
is a W&B project; W&B's own settings (WANDB_MODE=offline, WANDB_ENTITY, WANDB_API_KEY, ...) come
from its environment, and its files go under <out>/wandb.

Rank 0 alone logs. A new tracking run gets the run's settings once (MLflow params task.*, model.*,
train.*; W&B config {task, model, train}), the run folder's absolute path (MLflow tag
seqlab.run_folder, W&B config run_folder; W&B tags hold 64 characters at most) and the folder's
name as its run name. Its id is kept in <out>/tracking.json, written atomically, so a run resumed
from a checkpoint continues the same MLflow run and W&B run (resume="allow") instead of starting
a new one; a run that starts from step 0 starts new ones.

A killed process has logged updates past its last checkpoint, which the resumed process trains and
logs again. MLflow keeps every value it is given, so the resumed process skips, name by name, the
steps the MLflow run already holds: its history stays one value per step (the killed process's
value for those steps, the same number when the run resumes bit for bit). W&B ignores a step
below the last one its run holds; online, its server tells the resumed run where it stands and
those steps are skipped here the same way. Offline (WANDB_MODE=offline), each process writes its
own offline-run folder under <out>/wandb with the same run id, and `wandb sync` uploads them as
one run; which of two values logged for one step W&B keeps is then up to W&B.

MLflow takes only letters, digits, _ - . / and spaces in names: any other character of a name
(a slice such as num_kv_pairs=2,seq_len=64) becomes _ there; TensorBoard and W&B keep it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqlab.files import write_atomic
from seqlab.train.watch import EVENTS, EventLog, Logger, RunLog

if TYPE_CHECKING:
    from seqlab.train.trainer import TrainConfig

log = logging.getLogger(__name__)

TRACKING = "tracking.json"  # the MLflow and W&B run ids of the run in this folder
OUT = "out"  # train.mlflow's name for the SQLite store in the run folder
MLFLOW_DB = "mlflow.db"
EXTRA = "pip install -e '.[tracking]'"
# config field (and module) → the package that brings it
PACKAGES = {"mlflow": "mlflow-skinny", "wandb": "wandb"}


def check_tracking(config: TrainConfig) -> None:
    """A ValueError, before any work, when a tracker asked for cannot run: its package is not
    installed, or the MLflow store is to go in a run folder the run does not have."""
    for field, package in PACKAGES.items():
        if getattr(config, field) is not None and importlib.util.find_spec(field) is None:
            raise ValueError(
                f"train.{field} is set, but the {field} package is not installed: install "
                f"seqlab's tracking extra ({EXTRA}) or {package} itself (pip install {package})"
            )
    if config.mlflow == OUT and config.out_dir is None:
        raise ValueError(
            f"train.mlflow = {OUT!r} keeps the MLflow store in the run folder, and this run has "
            "none: set train.out_dir (--out), or give a tracking URI such as sqlite:///mlflow.db"
        )


def mlflow_uri(value: str, out: Path | None) -> str:
    if value == OUT:
        return f"sqlite:///{(out / MLFLOW_DB).resolve()}"
    return value


def mlflow_name(name: str) -> str:
    return re.sub(r"[^/\w.\- ]", "_", name)


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys and text values: {"train": {"lr": 0.001}} →
    {"train.lr": "0.001"}."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


class MLflowLog:
    """Values into an MLflow run: a new one, or the run `run_id` continued. Updates are held
    and sent at each flush (evaluation) and at close, one batch call, not a call per update."""

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        name: str,
        params: dict[str, str],
        tags: dict[str, str],
    ):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        self.client, self.batch = MlflowClient(uri), MAX_METRICS_PER_BATCH
        self.pending: list = []
        self.logged: dict[str, int] = {}  # name → the last step the run holds
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                log.warning("MLflow run %s is not in %s: a new run starts", run_id, uri)
            else:
                self.run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                self.logged = {m.key: m.step for m in run.data.to_proto().metrics}
                return
        run = self.client.create_run(self.experiment(), run_name=name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def experiment(self) -> str:
        """The id of the experiment $MLFLOW_EXPERIMENT_NAME (else "seqlab"), made if new."""
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "seqlab"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # made meanwhile by another run on the same store
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, value in values.items():
            key = mlflow_name(name)
            if step > self.logged.get(key, -1):
                self.pending.append(Metric(key, float(value), now, step))

    def flush(self) -> None:
        for i in range(0, len(self.pending), self.batch):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + self.batch])
        self.pending = []

    def close(self, failed: bool) -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbLog:
    """Values into a W&B run: a new one, or the run `run_id` resumed (resume="allow")."""

    def __init__(
        self,
        project: str,
        run_id: str | None,
        folder: Path | None,
        name: str,
        config: dict[str, Any],
    ):
        import wandb

        self.run = wandb.init(
            project=project,
            id=run_id,
            resume="allow" if run_id is not None else None,
            dir=None if folder is None else str(folder),
            name=name,
            config=config if run_id is None else None,  # a resumed run has it already
        )
        # Online, a resumed run stands after the last step its server holds; W&B drops lower
        # steps with a warning, so they are not sent.
        self.from_step = self.run.step

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.from_step:
            self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # W&B sends as it goes

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def read_ids(out: Path) -> dict[str, dict[str, str]]:
    path = out / TRACKING
    if not path.exists():
        return {}
    try:
        ids = json.loads(path.read_text())
        if not isinstance(ids, dict):
            raise ValueError("not a JSON object")
        return ids
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): new MLflow and W&B runs start", path, e)
        return {}


def open_run_log(
    config: TrainConfig,
    resumed_at: int | None,
    name: str,
    settings: dict[str, Any],
) -> RunLog:
    """The loggers `config` asks for, as one RunLog: TensorBoard (with an out_dir), MLflow, W&B.
    `resumed_at`: the checkpoint step this process resumed from (None: from step 0), which
    continues the MLflow and W&B runs named in <out>/tracking.json. `name`: the tracking runs'
    name; `settings`: {"task", "model", "train"}, logged once when a tracking run is made."""
    out = None if config.out_dir is None else Path(config.out_dir)
    loggers: list[Logger] = []
    if out is not None and config.tensorboard:
        loggers.append(EventLog(out / EVENTS, resumed_at=resumed_at or 0))
    ids = read_ids(out) if out is not None and resumed_at is not None else {}
    folder = None if out is None else str(out.resolve())
    try:
        if config.mlflow is not None:
            uri = mlflow_uri(config.mlflow, out)
            kept = ids.get("mlflow", {})
            run_id = kept.get("run_id") if kept.get("uri") == config.mlflow else None
            tags = {} if folder is None else {"seqlab.run_folder": folder}
            try:
                logger = MLflowLog(uri, run_id, name, flat(settings), tags)
            except Exception as e:  # the store is user input: name it, whatever failed
                raise ValueError(
                    f"train.mlflow {config.mlflow!r}: MLflow could not open a run in {uri} "
                    f"({type(e).__name__}: {e})"
                ) from e
            loggers.append(logger)
            ids["mlflow"] = {"uri": config.mlflow, "run_id": logger.run_id}
        if config.wandb is not None:
            kept = ids.get("wandb", {})
            run_id = kept.get("id") if kept.get("project") == config.wandb else None
            wandb_config = {**settings, "run_folder": folder}
            try:
                logger = WandbLog(config.wandb, run_id, out, name, wandb_config)
            except Exception as e:
                raise ValueError(
                    f"train.wandb {config.wandb!r}: W&B could not start its run "
                    f"({type(e).__name__}: {e})"
                ) from e
            loggers.append(logger)
            ids["wandb"] = {"project": config.wandb, "id": logger.run.id}
        if out is not None and (config.mlflow is not None or config.wandb is not None):
            text = json.dumps(ids)
            write_atomic(out / TRACKING, lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        RunLog(loggers).close(failed=True)
        raise
    return RunLog(loggers)
