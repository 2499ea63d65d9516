"""Train a CausalLM on a task: AdamW, warm-up then cosine decay, clipping, evaluation by slice,
early stop, NaN guard, and checkpoints that a killed run resumes from.

    config = TrainConfig(steps=2000, eval_every=200, out_dir="runs/mqar-gdn")
    result = train(ModelConfig(vocab_size=task.vocab_size, pattern="gdn"), task, config)
    result.final["all"], result.stop_reason

Run it again with the same `out_dir` and it resumes from the last checkpoint. Batch `i` of a run is
batch `i` of the task's training stream for `seed`, so a resumed run sees the same data and ends
with the same weights as one that was never interrupted.

`out_dir` holds `latest.json` (naming the newest checkpoint), `step-NNNNNNNN/` folders (the model,
`trainer.pt`, and `checkpoint.json` with each file's size and SHA-256) and `.lock`, held by the one
process training there. A step folder is written as `.step-NNNNNNNN.partial` and renamed when
whole, so a step folder without `checkpoint.json` can only come from an older seqlab. Beside them
lie what watches the run: TensorBoard events and curves.json (seqlab.train.watch), and the MLflow
and W&B run ids in tracking.json (seqlab.train.tracking).

Under torchrun, `distributed="ddp"` or `"fsdp"` trains one run in several processes with the same
result as one process (the global batch sharded across the ranks; rank 0 alone writes), and
`sequence_parallel=N` also splits every sequence along T across groups of N ranks (LASP-2):
see seqlab.train.distributed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from seqlab.config import Config, parse_device
from seqlab.files import exclusive_folder, fsync_dir, remove_stale_temporaries, write_atomic
from seqlab.mixers import MIXERS
from seqlab.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.parallel.model import local_slice, refuse_unsplittable, split_sequence, whole_sequence
from seqlab.profile.cost import meta_model, weight_bytes
from seqlab.profile.measure import free_memory
from seqlab.tasks import IGNORE, SyntheticTask, Task, bits_per_byte, evaluate_slices
from seqlab.train.distributed import Distributed, World, full, local_tensors
from seqlab.train.tracking import check_tracking, open_run_log
from seqlab.train.watch import RunLog, write_curves

log = logging.getLogger(__name__)

LATEST = "latest.json"
MODEL, TRAINER = "model.safetensors", "trainer.pt"
MANIFEST = "checkpoint.json"
STEP_DIR = re.compile(r"step-\d{8}")
PARTIAL_DIR = re.compile(r"\.step-\d{8}\.partial")


def step_folders(out: Path) -> list[Path]:
    """The checkpoint folders in `out`: step-NNNNNNNN exactly. Anything else named step-…
    (a user's step-best/, a copied step-00000010-backup/, step-by-step/ where out_dir is a
    working folder) is not the trainer's, and is never read or removed."""
    return [p for p in out.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]


# Fields that may differ between a run and its resumption: they change nothing in the trajectory.
# A run may also resume in another number of processes, with another kind of data parallelism or
# another split of its sequences: the global batch and so the trajectory stay the same, to float
# round-off.
RESUMABLE_CHANGES = frozenset(
    {
        "device",
        "out_dir",
        "progress",
        "compile",
        "tensorboard",
        "mlflow",
        "wandb",
        "distributed",
        "sequence_parallel",
    }
)


class Diverged(Exception):
    """The run cannot go on: a non-finite parameter or optimizer state, or an overflow."""


class TrainConfig(Config):
    model_config = ConfigDict(allow_inf_nan=False)  # an Inf lr or NaN decay fails here, not later

    steps: int = Field(1000, ge=1)
    # Sizes below 2^63: torch takes them as 64-bit ints (larger ones failed at the first batch,
    # or at the first evaluation, after the training before it).
    batch_size: int = Field(64, ge=1, lt=2**63)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the lr decays to lr · min_lr_ratio at `steps`
    weight_decay: float = Field(0.1, ge=0)  # on matrices only, not on gains, biases or gates
    # AdamW's moment decays, each in [0, 1) (torch refused others only when the optimizer was made)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.95,
    )
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None: no clipping
    eval_every: int = Field(100, ge=1)  # also the checkpoint interval
    eval_batch_size: int = Field(256, ge=1, lt=2**63)
    eval_batches: int | None = Field(50, ge=1, lt=2**63)  # cap for streamed held-out splits (text)
    target_accuracy: float | None = Field(None, gt=0, le=1)  # stop once "all" reaches it
    # below 2^62: torch's generators take 64-bit seeds, and the data streams add offsets to it
    seed: int = Field(0, ge=0, lt=2**62)
    device: str = "auto"  # "auto": cuda if available, else cpu
    # checkpoints; None: keep nothing on disk ("" is refused: it would mean the current folder)
    out_dir: str | None = Field(None, min_length=1)
    # On a terminal a progress bar; elsewhere (nohup, CI) one line on stderr per evaluation.
    progress: bool = True
    # "bf16": the forward (and evaluation) under torch.autocast to bfloat16; weights, gradients
    # and the optimizer state stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Micro-batches per update: each update still sees batch_size sequences, in grad_accum
    # pieces of batch_size / grad_accum, and its loss is the same token mean.
    grad_accum: int = Field(1, ge=1)
    compile: bool = False  # torch.compile the model for the training forward
    # TensorBoard event files under <out_dir>/tensorboard (seqlab.train.watch); needs out_dir.
    tensorboard: bool = True
    # The same values to MLflow and W&B (seqlab.train.tracking; the `tracking` extra): an MLflow
    # tracking URI, or "out" for an SQLite store in out_dir; a W&B project (its mode, entity and
    # key from W&B's WANDB_* environment). A resumed run continues their runs.
    mlflow: str | None = Field(None, min_length=1)
    wandb: str | None = Field(None, min_length=1)
    # Under torchrun: "ddp" (each rank holds the model) or "fsdp" (FSDP2, the model sharded across
    # the ranks); batch_size stays the global batch (seqlab.train.distributed). In one process
    # all three train alike; "none" in a job of several processes is an error.
    distributed: Distributed = "none"
    # Under torchrun with "ddp" or "fsdp": every sequence split along T across a group of this
    # many consecutive ranks (LASP-2, seqlab.parallel); the global batch is then shared among
    # world size / sequence_parallel groups. 1: no split. More than 1 in one process is an error.
    sequence_parallel: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _accumulation_divides_the_batch(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum}): each update splits its batch into grad_accum equal pieces"
            )
        return self


@dataclass
class WarmupCosine:
    """The lr multiplier for update `step` (0-based): linear warm-up to 1 over `warmup_steps`
    updates, then half a cosine down to `min_lr_ratio`, reached at `steps`."""

    warmup_steps: int
    steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


@dataclass
class TrainResult:
    # The trained model; in a run sharded with FSDP, rank 0's whole copy on the CPU (None on the
    # other ranks).
    model: CausalLM | None
    step: int
    stop_reason: str  # "steps", "target_accuracy" or "non_finite"
    message: str
    final: dict[str, float]  # the last evaluation: accuracy per slice, "all", bits_per_byte
    best: dict[str, float]  # the best value of each metric over all evaluations
    # Per evaluation: step, lr (of the next update), train_loss (mean since the last evaluation,
    # MoE aux loss included), grad_norm (the largest before clipping), metrics.
    history: list[dict[str, Any]]
    wall_time_s: float  # training + evaluation, summed over resumptions
    train_time_s: float  # training steps only
    tokens: int  # input tokens trained on
    resumed_from: int | None = None  # the step this process resumed at, if it did
    # history's records with wall_time_s and tokens at each evaluation (seqlab.train.watch)
    curve: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1  # the processes this one trained with

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_time_s if self.train_time_s > 0 else 0.0


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s random stream from update `step` on (rank 0 from the start goes
    on with the run's own stream): distinct per rank, fixed by the run's seed."""
    return seed + 104_729 * rank + 7_919 * step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    # Plain containers and tensors only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(device: str) -> torch.device:
    """ "auto" (cuda if available, else cpu), cpu, cuda or cuda:N; a ValueError if it does not
    exist here."""
    return parse_device(device, auto=True)


def file_record(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {
            "bytes": path.stat().st_size,
            "sha256": hashlib.file_digest(f, "sha256").hexdigest(),
        }


def verify_checkpoint(folder: Path) -> None:
    """Check each file of a step folder against the size and SHA-256 its manifest records; a
    CheckpointError names the file and what is wrong (missing, empty, truncated, bad digest)."""
    manifest = folder / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: missing or damaged ({type(e).__name__} {e})") from None
    if not isinstance(files, dict) or set(files) != {MODEL, TRAINER}:
        raise CheckpointError(f"{manifest}: damaged (files {files!r})")
    for name, want in files.items():
        if not (
            isinstance(want, dict)
            and type(want.get("bytes")) is int
            and isinstance(want.get("sha256"), str)
        ):
            raise CheckpointError(
                f"{manifest}: damaged (the entry of {name} is {want!r}, expected bytes and sha256)"
            )
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file (0 of {want['bytes']} bytes)")
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "wrong size"
            raise CheckpointError(f"{path}: {what} ({size} of {want['bytes']} bytes)")
        if file_record(path)["sha256"] != want["sha256"]:
            raise CheckpointError(
                f"{path}: SHA-256 digest does not match the one in {MANIFEST} (corrupt file)"
            )


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The folder of the checkpoint a run in `out_dir` resumes from, or None if it holds none.
    LATEST names it; without a usable LATEST (missing, damaged, or naming a folder outside
    `out_dir`), the newest step folder whose files verify. Never None beside a checkpoint it
    cannot verify: then a CheckpointError names the folder, so that no run starts over there."""
    out = Path(out_dir)
    pointer = out / LATEST
    problem = f"{pointer} is missing"
    if pointer.exists():
        try:
            name = json.loads(pointer.read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            name = None
        if isinstance(name, str) and STEP_DIR.fullmatch(name) and (out / name).is_dir():
            return out / name
        problem = f"{pointer} is damaged or names no step folder of this run"
    folders = sorted(step_folders(out), reverse=True)
    for folder in folders:
        if (folder / MANIFEST).exists():
            try:
                verify_checkpoint(folder)
            except CheckpointError as e:
                log.warning("skipping a damaged checkpoint: %s", e)
                continue
            log.warning("%s; resuming from %s, the newest complete checkpoint", problem, folder)
            return folder
    # Step folders without a manifest but with a trainer state: an older seqlab's, unverifiable.
    held = [f.name for f in folders if (f / MANIFEST).exists() or (f / TRAINER).exists()]
    if held or pointer.exists():
        raise CheckpointError(
            f"{out}: {problem}, and no step folder holds a complete, verified checkpoint "
            f"(found: {', '.join(held) or 'none'}); move them away to start over, or use another "
            "out_dir"
        )
    return None  # at most a folder an older seqlab began and never finished: nothing to resume


def task_signature(task: Task) -> dict[str, Any]:
    return {"class": type(task).__name__, "config": task.config.model_dump(mode="json")}


def differences(prefix: str, theirs: Any, ours: Any) -> list[str]:
    """ "prefix.key: checkpoint X, now Y" for each dotted key where two settings differ (a key
    one side lacks differs, whatever the other holds)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [
            d
            for k in dict.fromkeys([*ours, *theirs])
            for d in differences(
                f"{prefix}.{k}",
                theirs[k] if k in theirs else _Absent(),
                ours[k] if k in ours else _Absent(),
            )
        ]
    if type(theirs) is _Absent or type(ours) is _Absent or theirs != ours:
        return [f"{prefix}: checkpoint {theirs!r}, now {ours!r}"]
    return []


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def progress_bar(show: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=True,
    )


def first_non_finite(named: Iterator[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or Inf, or None; one device
    sync however many tensors there are."""
    named = [(n, t.detach()) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    largest = torch.stack([torch.linalg.vector_norm(t, ord=math.inf).float() for _, t in named])
    if bool(torch.isfinite(largest).all()):
        return None
    return next(
        n for (n, _), m in zip(named, largest.tolist(), strict=True) if not math.isfinite(m)
    )


def duration(seconds: float) -> str:
    """3.24 → "3.2s", 125 → "2m05s", 7300 → "2h01m"."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def headline(metrics: dict[str, float]) -> str:
    """The metrics a person follows: accuracy over all slices, bits per byte if there are any."""
    parts = [f"all {100 * metrics['all']:.1f}%"] if "all" in metrics else []
    if "bits_per_byte" in metrics:
        parts.append(f"bits_per_byte {metrics['bits_per_byte']:.4g}")
    return " · ".join(parts)


def best_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The best value of each metric over the evaluations: the lowest bits per byte, the highest
    accuracy. NaN and Inf are never best; a metric that was never finite is left out."""
    best: dict[str, float] = {}
    for record in history:
        for k, v in record["metrics"].items():
            if math.isfinite(v):
                pick = min if k == "bits_per_byte" else max
                best[k] = pick(best[k], v) if k in best else v
    return best


class Trainer:
    """One run. `run()` trains to the end (or an early stop) and returns a TrainResult."""

    def __init__(self, model_config: ModelConfig, task: Task, config: TrainConfig):
        if task.objective != "next_token":
            raise ValueError(
                f"the trainer fits next-token tasks; {type(task).__name__} has objective "
                f"{task.objective!r} (MAD compression needs an autoencoder), not trained here"
            )
        if model_config.vocab_size < task.vocab_size:
            raise ValueError(
                f"model vocab_size {model_config.vocab_size} < the task's {task.vocab_size}"
            )
        check_tracking(config)  # a missing package, before the process group and the model
        self.model_config, self.task, self.config = model_config, task, config
        if config.sequence_parallel > 1:
            check_sequence_split(model_config, config.sequence_parallel)
        # Checked (batch divisible among the ranks) before the process group is made.
        self.world, self.device = World.join(
            config.distributed,
            config.batch_size,
            config.grad_accum,
            resolve_device(config.device),
            config.sequence_parallel,
        )
        try:
            self.build()
        except BaseException:
            self.world.leave()
            raise

    def build(self) -> None:
        model_config, config = self.model_config, self.config
        shards = self.world.size if self.world.kind == "fsdp" else 1
        check_model_fits(model_config, self.device, shards)
        seed_everything(config.seed)  # the same initial weights on every rank
        self.model = CausalLM(model_config).to(self.device)
        if self.world.sequence_group is not None:
            # Its mixers now run on this rank's slice of T and exchange states with the group;
            # DDP or FSDP then wraps it as any model.
            split_sequence(self.model, self.world.sequence_group)
        if self.world.rank:
            seed_everything(rank_seed(config.seed, self.world.rank))
        # The training forward (DDP around the model, or the model itself, sharded in place under
        # FSDP); checkpoints, evaluation and the result use the model itself.
        self.train_module = self.world.wrap(self.model)
        self.train_model = torch.compile(self.train_module) if config.compile else self.train_module
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=config.betas,
        )
        names = {id(p): n for n, p in self.model.named_parameters()}
        # the parameters' names in the order Optimizer.state_dict() numbers them
        self.param_names = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        self.host: CausalLM | None = None  # rank 0's whole CPU copy of an FSDP-sharded model
        schedule = WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # history's records with wall_time_s and tokens at each evaluation: the learning curves
        self.curve: list[dict[str, Any]] = []
        self.watch: RunLog | None = None  # rank 0's loggers while it trains
        self.wall_before_s = 0.0  # wall time of the run before this process took it over
        self.started = time.perf_counter()
        self.train_time_s = 0.0
        self.tokens = 0
        self.resumed_from: int | None = None
        self.start_step = 0  # the step this process began at
        self.log_lines = False  # a line per evaluation on stderr (set by run)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The training stream from the current step on: the task's stream for `seed`, skipped
        ahead by the batches already trained on."""
        stream = self.task.batches(self.task.splits[0], self.config.batch_size, self.config.seed)
        return itertools.islice(stream, self.step, None)

    def train_step(self, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
        """One update; returns (loss, grad norm before clipping). Skips the update, leaving the
        weights untouched, when either is not finite. Raises Diverged when the update itself
        overflows or leaves a parameter that is not finite."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        n = self.config.grad_accum
        if self.world.size == 1 and n == 1:
            with self.autocast():
                out = self.train_model(inputs)
            loss = lm_loss(out.logits, targets) + out.aux_loss
            loss.backward()
        else:  # ranks' shares and micro-batches: summed token losses over the global batch's
            loss = self.shard_backward(inputs, targets)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        # global under DDP (whole gradients) and FSDP (a DTensor reduced over the shards)
        norm = full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # the mean over the ranks of the global batch's shares: the global batch's loss
        loss_value, norm_value = self.world.mean(loss.item()), norm.item()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            lr = self.scheduler.get_last_lr()[0]
            try:
                self.optimizer.step()
            except RuntimeError as e:  # "value cannot be converted to type float without overflow"
                if "overflow" not in str(e):
                    raise
                raise Diverged(
                    f"overflow in the optimizer update at step {self.step + 1} (lr {lr:g}: {e}); "
                    "the weights in memory may be partly updated"
                ) from None
            if bad := self.world.first(
                first_non_finite(local_tensors(self.model.named_parameters()))
            ):
                raise Diverged(
                    f"non-finite parameter {bad} after the update at step {self.step + 1} "
                    f"(lr {lr:g})"
                )
            self.scheduler.step()
        return loss_value, norm_value

    def shard_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The backward of this rank's share of the global batch (`inputs`, `targets` [B, T],
        the same on every rank): its replica's contiguous rows B / replicas, in grad_accum
        micro-batches, and with sequence parallelism of those only its group rank's slice of T.
        Its loss is its tokens' summed losses over the global batch's scored tokens, times the
        world size, since DDP and FSDP average the ranks' gradients: that average is then the
        gradient of the global token mean (a sequence group's ranks each hold the gradient of
        their own tokens' losses, the LASP-2 backward having sent every exchanged state its
        share). Returns this rank's loss (detached)."""
        world, n = self.world, self.config.grad_accum
        scored = (targets != IGNORE).sum()
        rows = len(inputs) // world.replicas
        mine = slice(world.replica * rows, (world.replica + 1) * rows)
        inputs, targets = inputs[mine], targets[mine]
        if world.sequence_group is not None:
            # T padded to a multiple of the group's N at the end, with targets nobody scores:
            # the model is causal, so no real token sees the padding (only a MoE balance loss
            # counts it), and each rank takes an equal slice
            pad = -inputs.shape[1] % dist.get_world_size(world.sequence_group)
            if pad:
                inputs = F.pad(inputs, (0, pad), value=0)
                targets = F.pad(targets, (0, pad), value=IGNORE)
            inputs = local_slice(inputs, world.sequence_group)
            targets = local_slice(targets, world.sequence_group)
        pieces = list(zip(inputs.chunk(n), targets.chunk(n), strict=True))
        loss = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(pieces):
            with world.no_sync(self.train_module, last=i == n - 1):
                with self.autocast():
                    out = self.train_model(x)
                part = F.cross_entropy(
                    out.logits.flatten(0, 1).float(),
                    y.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                part = part * world.size / scored + out.aux_loss / n
                part.backward()
            loss = loss + part.detach()
        return loss

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on this device with precision "bf16", else nothing."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def predict(self, inputs: Tensor) -> Tensor:
        with self.autocast():
            return self.model(inputs.to(self.device)).logits.argmax(-1).cpu()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy per slice and "all" on the held-out split; for streamed tasks (text) also
        bits per byte, over at most `eval_batches` batches. With sequence parallelism every
        rank evaluates whole sequences (its mixers' group unset meanwhile): held-out lengths need
        not divide among the group, and the figures are the one-process run's."""
        self.model.eval()
        split = self.world.sequence_group is not None
        with whole_sequence(self.model) if split else contextlib.nullcontext():
            return self.evaluate_whole()

    def evaluate_whole(self) -> dict[str, float]:
        held_out = self.task.splits[1]
        if isinstance(self.task, SyntheticTask):
            return evaluate_slices(
                self.predict, self.task.dataset(held_out), self.config.eval_batch_size
            )
        nats = correct = count = 0.0
        stream = self.task.batches(held_out, self.config.eval_batch_size, self.config.seed)
        for inputs, targets in itertools.islice(stream, self.config.eval_batches):
            with self.autocast():
                logits = self.model(inputs.to(self.device)).logits.float()
            targets = targets.to(self.device)
            scored = targets != IGNORE
            nats += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            correct += ((logits.argmax(-1) == targets) & scored).sum().item()
            count += scored.sum().item()
        return {"all": correct / count, "bits_per_byte": bits_per_byte(nats / count)}

    @property
    def wall_time_s(self) -> float:
        return self.wall_before_s + time.perf_counter() - self.started

    def trainer_state(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds beside the weights; `optimizer`: the optimizer's whole
        state dict, as Optimizer.state_dict() keys it."""
        return {
            "step": self.step,
            "data_position": self.step,  # batches of the training stream consumed
            "world_size": self.world.size,  # informative: a run resumes in any number
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "curve": self.curve,
            "wall_time_s": self.wall_time_s,
            "train_time_s": self.train_time_s,
            "tokens": self.tokens,
            "model_config": self.model_config.model_dump(mode="json"),
            "train_config": self.config.model_dump(mode="json"),
            "task": task_signature(self.task),
        }

    def optimizer_tensors(self, optimizer: dict[str, Any]) -> Iterator[tuple[str, Tensor]]:
        """The tensors of an optimizer state dict, named by key and parameter."""
        for i, state in optimizer["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    yield f"optimizer {key} of {self.param_names[i]}", value

    def whole(self) -> tuple[CausalLM | None, dict[str, Any] | None]:
        """The model with its whole weights and the optimizer's whole state dict on rank 0,
        (None, None) on the other ranks. Under FSDP a collective that gathers them to rank 0's
        CPU (into `self.host`, built once); otherwise the model and optimizer themselves."""
        if self.world.kind != "fsdp":
            if not self.world.is_main:
                return None, None
            return self.model, self.optimizer.state_dict()
        weights = self.world.full_weights(self.model)
        optimizer = self.world.full_optimizer(self.model, self.optimizer)
        if not self.world.is_main:
            return None, None
        if self.host is None:
            with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten
                self.host = CausalLM(self.model_config)
        self.host.load_state_dict(weights)
        return self.host, optimizer

    def save(self) -> Path:
        """Write the checkpoint of this step into its own folder, then point LATEST at it. A kill
        at any moment leaves LATEST naming a complete checkpoint; older folders are removed.
        Raises Diverged, writing nothing, if a weight or optimizer state is not finite: every
        checkpoint is a good one. In a job of several processes, every rank calls it, rank 0
        writes, and every rank raises what rank 0 raised."""
        model, optimizer = self.whole()
        return self.world.on_main(lambda: self.write_checkpoint(model, optimizer))

    def write_checkpoint(self, model: CausalLM, optimizer: dict[str, Any]) -> Path:
        bad = first_non_finite(
            itertools.chain(model.named_parameters(), self.optimizer_tensors(optimizer))
        )
        if bad:
            raise Diverged(
                f"{bad} is not finite at step {self.step}; the checkpoint is not written"
            )
        out = Path(self.config.out_dir)
        folder = out / f"step-{self.step:08d}"
        partial = out / f".{folder.name}.partial"
        for path in (partial, folder):
            if path.exists():
                shutil.rmtree(path)
        try:
            partial.mkdir(parents=True)
            save_checkpoint(model, partial / MODEL)
            state = self.trainer_state(optimizer)
            write_atomic(partial / TRAINER, lambda tmp: torch.save(state, tmp))
            manifest = {
                "step": self.step,
                "files": {n: file_record(partial / n) for n in (MODEL, TRAINER)},
            }
            text = json.dumps(manifest)
            write_atomic(partial / MANIFEST, lambda tmp: Path(tmp).write_text(text))
            fsync_dir(partial)
            partial.rename(folder)
            fsync_dir(out)
            pointer = json.dumps({"dir": folder.name, "step": self.step})
            write_atomic(out / LATEST, lambda tmp: Path(tmp).write_text(pointer))
            fsync_dir(out)
        except OSError as e:  # a full disk, a quota: the run cannot keep its work, so it stops
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(
                f"{folder}: could not write the checkpoint of step {self.step} "
                f"({e.strerror or e}); {out / LATEST} still names the last complete one"
            ) from None
        for old in step_folders(out):  # only the run's own step-NNNNNNNN folders
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def restore(self, folder: Path) -> None:
        """Resume from the checkpoint in `folder`: rank 0 reads and checks it, and every rank
        takes its state (rank 0's broadcast, sharded under FSDP)."""
        world = self.world
        read = world.on_main(lambda: self.read_checkpoint(folder))
        weights, optimizer = read if world.is_main else (None, None)
        state = world.broadcast(self.resumable_state if world.is_main else None)
        world.load(self.model, self.optimizer, weights, optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["data_position"]
        if world.is_main:
            set_rng_state(state["rng"])
        else:
            seed_everything(rank_seed(self.config.seed, world.rank, self.step))
        self.history = state["history"]
        self.curve = state.get("curve", [])  # absent from an older seqlab's checkpoints
        self.wall_before_s = state["wall_time_s"]
        self.train_time_s = state["train_time_s"]
        self.tokens = state["tokens"]
        self.resumed_from = self.step

    def read_checkpoint(self, folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Verify and read the checkpoint in `folder`, refusing one of another run: returns
        its weights and optimizer state dict, and keeps the rest in `resumable_state`."""
        if (folder / MANIFEST).exists():
            verify_checkpoint(folder)
        else:
            log.warning(
                "%s has no %s (an older seqlab wrote it): its files are not verified",
                folder,
                MANIFEST,
            )
        path = folder / TRAINER
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file from outside: any failure to read it is its fault
            raise CheckpointError(
                f"{path}: unreadable trainer state ({type(e).__name__}: {e})"
            ) from None
        self.check_resumable(state)
        model = load_checkpoint(folder / MODEL, config=self.model_config)
        optimizer = state.pop("optimizer")
        self.resumable_state = state
        return model.state_dict(), optimizer

    def check_resumable(self, state: dict[str, Any]) -> None:
        ours = self.config.model_dump(mode="json")
        theirs = state["train_config"]
        diffs = [
            f"train.{k}: checkpoint {theirs.get(k)!r}, now {v!r}"
            for k, v in ours.items()
            if k not in RESUMABLE_CHANGES and theirs.get(k) != v
        ]
        diffs += differences(
            "model", state["model_config"], self.model_config.model_dump(mode="json")
        )
        diffs += differences("task", state["task"], task_signature(self.task))
        if diffs:
            raise ValueError(
                f"{self.config.out_dir} holds a checkpoint of a different run; use another "
                "out_dir or the same settings: " + "; ".join(diffs)
            )

    def run(self, resume: bool = True) -> TrainResult:
        """Train from the latest checkpoint in `out_dir` (if `resume`) to the end; while it runs,
        `out_dir` is locked against other runs, and temporary files left there by a killed write
        are removed first."""
        try:
            with contextlib.ExitStack() as stack:
                if self.config.out_dir is not None:
                    # rank 0 alone: the other ranks never touch out_dir
                    self.world.on_main(lambda: self.claim_out_dir(stack))
                result = self.train_to_end(resume)
            self.world.barrier()  # no rank leaves while another still has a collective to run
            return result
        finally:
            self.release()

    def release(self) -> None:
        """In a job of several processes, drop what holds the process group (DDP's reducer,
        FSDP's sharded model and optimizer), then destroy the group: a gloo group freed later,
        with its peers gone, can hang the process at exit."""
        if self.world.size > 1:
            self.train_module = self.train_model = None
            if self.world.kind == "fsdp":
                self.model, self.optimizer, self.scheduler = self.host, None, None
            elif self.world.sequence_group is not None:
                split_sequence(self.model, None)  # whole sequences again once the group is gone
            gc.collect()
        self.world.leave()

    def claim_out_dir(self, stack: contextlib.ExitStack) -> None:
        """Lock out_dir for the time of `stack` and clean what killed writes left there."""
        out = stack.enter_context(exclusive_folder(self.config.out_dir))
        for folder in (out, *step_folders(out)):
            for path in remove_stale_temporaries(folder):
                log.info("removed %s, left by a killed write", path)
        for partial in out.glob(".step-*.partial"):
            if not PARTIAL_DIR.fullmatch(partial.name) or not partial.is_dir():
                continue  # not a checkpoint this trainer began
            shutil.rmtree(partial)
            log.info("removed %s, a checkpoint whose writing was killed", partial)

    def train_to_end(self, resume: bool) -> TrainResult:
        c = self.config
        self.started = time.perf_counter()
        folder = None
        if resume and c.out_dir is not None:
            folder = self.world.on_main(lambda: latest_checkpoint(c.out_dir))
        if folder is not None:
            self.restore(folder)
            log.info("resumed from %s at step %d", folder, self.step)
        stop_reason, message = "steps", f"trained {c.steps} steps"
        if folder is not None and self.step >= c.steps:
            message = f"{c.out_dir} had already trained {self.step} steps; nothing trained now"
        if self.history and self.reached_target(self.history[-1]["metrics"]):
            stop_reason, message = "target_accuracy", "the checkpoint had reached the target"
        if self.world.is_main:
            name = Path(c.out_dir).name if c.out_dir is not None else self.model_config.pattern
            self.watch = open_run_log(c, self.resumed_from, name, self.settings())
        failed = True
        try:
            result = self.train_steps(stop_reason, message)
            failed = False
            return result
        finally:
            if self.watch is not None:
                self.watch.close(failed)
                self.watch = None

    def settings(self) -> dict[str, Any]:
        """The run's settings as the trackers record them."""
        return {
            "task": task_signature(self.task),
            "model": self.model_config.model_dump(mode="json"),
            "train": self.config.model_dump(mode="json"),
        }

    def train_steps(self, stop_reason: str, message: str) -> TrainResult:
        c = self.config
        losses, norms = [], []
        terminal = sys.stderr.isatty()
        show = c.progress and self.world.is_main  # rank 0 speaks for the run
        self.log_lines = show and not terminal
        self.start_step, label = self.step, self.model_config.pattern
        held_out = f" · held-out {headline(self.history[-1]['metrics'])}" if self.history else ""
        with progress_bar(show and terminal) as progress:
            bar = progress.add_task(label, total=c.steps, completed=self.step)
            batches = self.batches()
            while stop_reason == "steps" and self.step < c.steps:
                inputs, targets = next(batches)
                lr = self.scheduler.get_last_lr()[0]
                t0 = time.perf_counter()
                try:
                    loss, norm = self.train_step(inputs, targets)
                except Diverged as e:
                    stop_reason, message = "non_finite", self.stopped(f"{e}; stopped")
                    break
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    value = loss if what == "loss" else norm
                    stop_reason = "non_finite"
                    message = self.stopped(
                        f"non-finite {what} ({value}) at step {self.step + 1}; stopped before "
                        "updating"
                    )
                    break
                self.train_time_s += time.perf_counter() - t0
                self.step += 1
                self.tokens += inputs.numel()
                losses.append(loss)
                norms.append(norm)
                if self.watch is not None:
                    self.watch.update(self.step, loss, lr, norm)
                progress.update(bar, advance=1, description=f"{label} loss {loss:.3f}{held_out}")
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    metrics = self.log_eval(losses, norms)
                    losses, norms = [], []
                    held_out = f" · held-out {headline(metrics)}"
                    progress.update(bar, description=f"{label} loss {loss:.3f}{held_out}")
                    if c.out_dir is not None:
                        try:
                            self.save()
                        except Diverged as e:
                            stop_reason, message = "non_finite", self.stopped(f"{e}; stopped")
                            break
                    if self.reached_target(metrics):
                        stop_reason = "target_accuracy"
                        message = (
                            f"accuracy {metrics['all']:.4f} ≥ target {c.target_accuracy} "
                            f"at step {self.step}"
                        )
        return TrainResult(
            model=self.result_model(),
            step=self.step,
            stop_reason=stop_reason,
            message=message,
            final=self.history[-1]["metrics"] if self.history else {},
            best=best_metrics(self.history),
            history=self.history,
            wall_time_s=self.wall_time_s,
            train_time_s=self.train_time_s,
            tokens=self.tokens,
            resumed_from=self.resumed_from,
            curve=self.curve,
            world_size=self.world.size,
        )

    def result_model(self) -> CausalLM | None:
        """The trained model: under FSDP rank 0's whole CPU copy (a collective; None on the other
        ranks), else the model itself."""
        return self.whole()[0] if self.world.kind == "fsdp" else self.model

    def stopped(self, why: str) -> str:
        """`why`, naming the last good checkpoint, logged as a warning."""
        if not self.world.is_main:  # every rank stops alike; rank 0 reads out_dir and says why
            return f"{why}. Last good checkpoint: see rank 0"
        kept = latest_checkpoint(self.config.out_dir) if self.config.out_dir is not None else None
        none = "none (no out_dir)" if self.config.out_dir is None else "none written yet"
        message = f"{why}. Last good checkpoint: {kept or none}"
        log.warning(message)
        return message

    def log_eval(self, losses: list[float], norms: list[float]) -> dict[str, float]:
        metrics = self.evaluate()
        self.history.append(
            {
                "step": self.step,
                "lr": self.scheduler.get_last_lr()[0],
                "train_loss": sum(losses) / len(losses) if losses else math.nan,
                "grad_norm": max(norms) if norms else math.nan,
                "metrics": metrics,
            }
        )
        self.curve.append(
            {
                **self.history[-1],
                "wall_time_s": self.wall_time_s,
                "train_time_s": self.train_time_s,  # the steps alone: throughput between points
                "tokens": self.tokens,
            }
        )
        if self.watch is not None:
            tokens_per_s = self.tokens / self.train_time_s if self.train_time_s > 0 else 0.0
            self.watch.evaluation(self.step, metrics, tokens_per_s)
        if self.config.out_dir is not None and self.world.is_main:
            task = type(self.task).__name__
            write_curves(Path(self.config.out_dir), self.model_config.pattern, task, self.curve)
        if self.log_lines:
            self.print_log_line()
        return metrics

    def print_log_line(self) -> None:
        """One line for a log file: step, training loss, held-out metrics, elapsed time, ETA
        (from this process's pace), flushed at once."""
        record, c = self.history[-1], self.config
        spent = time.perf_counter() - self.started
        eta = spent / max(1, self.step - self.start_step) * (c.steps - self.step)
        parts = [
            f"[{self.model_config.pattern}] step {self.step}/{c.steps}",
            f"loss {record['train_loss']:.4f}",
            headline(record["metrics"]),
            f"elapsed {duration(self.wall_time_s)}",
            f"ETA {duration(eta)}",
        ]
        print(" · ".join(p for p in parts if p), file=sys.stderr, flush=True)

    def reached_target(self, metrics: dict[str, float]) -> bool:
        target = self.config.target_accuracy
        return target is not None and metrics.get("all", 0.0) >= target


# Float32 copies of the weights training holds: the weights, their gradients and AdamW's two
# moments.
TRAINING_COPIES = 4


def check_model_fits(model_config: ModelConfig, device: torch.device, shards: int = 1) -> None:
    """A ValueError, before the model is built, when its weights, gradients and AdamW state
    (`TRAINING_COPIES` float32 copies, counted on the meta device; split over `shards` FSDP
    ranks) exceed the memory free on `device`; also when a weight's size overflows (meta_model).
    Activations come on top: passing this is necessary, not sufficient."""
    meta = meta_model(model_config)
    params = sum(p.numel() for p in meta.parameters())
    need = TRAINING_COPIES * weight_bytes(meta) // max(1, shards)
    free = free_memory(device)
    if free is not None and need > free:
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise ValueError(
            f"the model has {params:,} parameters: its weights, gradients and AdamW state take "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB {where} has free "
            f"(d_model {model_config.d_model}, n_layers {model_config.n_layers}, vocab_size "
            f"{model_config.vocab_size}); choose a smaller model"
        )


def check_sequence_split(model_config: ModelConfig, n: int) -> None:
    """A ValueError, before any work, if `n` ranks cannot share the model's training sequences:
    a mixer of the pattern that cannot run on a slice of T. (A length T that `n` does not divide
    is padded at the end: `Trainer.shard_backward`.)"""
    named = {s.name: MIXERS[s.name] for s in model_config.mixer_specs() if s.name in MIXERS}
    try:
        refuse_unsplittable(named)
    except ValueError as e:
        raise ValueError(
            f"train.sequence_parallel {n} with model pattern {model_config.pattern!r}: {e}"
        ) from None


def train(
    model_config: ModelConfig, task: Task, config: TrainConfig, resume: bool = True
) -> TrainResult:
    """Train a fresh model (or resume the run in `config.out_dir`) and return the result."""
    return Trainer(model_config, task, config).run(resume=resume)
