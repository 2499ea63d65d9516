"""`seqlab bench`: the analytic and measured cost of architectures and of their core ops.

    config = BenchConfig(archs=("attn", "gdn", "gdn*3,attn"), seq_lens=parse_seq_lens("512,2k"))
    result = run_bench(config, log=print)     # a JSON-ready dict
    write_results(result, "out/")             # seqlab.profile.report: JSON, markdown, PNGs

Model level: for each architecture (a pattern, built with `d_model`, `n_layers` and the channel
mixer) and each length T: forward and forward+backward latency, prefill tokens/s, the latency of
one decoded token at context T (prefill T tokens, then time successive single steps, each from
the last one's state, as generation runs them: the context grows by a few dozen tokens), peak
memory, the state bytes the model really holds after prefill, and the analytic cost.
Op level: the core op of each distinct mixer (its family's fast form, from the op-family
registry) at that mixer's shapes, against the family's peers timed in the same run
(seqlab.profile.peers).

A measurement is skipped, with the reason recorded, when the wall time of its calls — predicted
from the previous length by the ratio of analytic FLOPs — exceeds `max_seconds`, when its peak
memory exceeds `max_memory_gb` (default: 60 % of the memory available when the run starts) —
predicted analytically (seqlab.profile.cost.memory_bytes; OpSpec.memory_bytes, from the
family's workspace_bytes) for every length, the first included, and extrapolated linearly in
T from the previous length's measured peak, a model's weights (counted on the meta device)
added to both — or when it runs out of memory; the longer lengths of that measurement are then
skipped too.
A length whose every measurement is skipped makes no inputs, so nothing large is allocated; an
architecture is built only at its first length with a measurement that fits.
With `time_limit` the whole run starts no measurement past that many seconds (nor one predicted
to end past it), so a run under a wall-clock limit ends with results. `progress(result)` is
called after every measured length, with `result["complete"]` False until the run ends: the CLI
rewrites its files then, so a run that is killed keeps what it had measured.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from seqlab.config import Config, parse_device
from seqlab.model.lm import CausalLM, ModelConfig
from seqlab.profile.cost import memory_bytes, meta_model, model_cost, weight_bytes
from seqlab.profile.measure import (
    free_memory,
    is_out_of_memory,
    meminfo,
    memory_method,
    peak_memory,
    time_call,
)
from seqlab.profile.peers import OpSpec, implementations, op_spec, peers_available

SCHEMA = "seqlab.bench/1"
MODEL_PASSES = ("forward", "forward_backward", "decode")
OP_PASSES = ("forward", "forward_backward")
PRESETS = {"small": {"d_model": 256, "n_layers": 4}, "large": {"d_model": 1024, "n_layers": 12}}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_UNITS = {"": 1, "k": 1024, "m": 1024**2}
MAX_SEQ_LEN = 2**63 - 1  # torch's sizes are 64-bit ints


def parse_seq_lens(text: str) -> tuple[int, ...]:
    """'512,2k,32k' → (512, 2048, 32768): k = 1024, m = 1024²; sorted, repeats dropped."""
    lens = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", item)
        if m is None or int(m[1]) == 0:
            raise ValueError(
                f"bad sequence length {item.strip()!r} in {text!r}: give positive integers, "
                f"optionally with k (×1024) or m (×1024²), e.g. 512,2k,32k"
            )
        T = int(m[1]) * _UNITS[m[2].lower()]
        if T > MAX_SEQ_LEN:
            raise ValueError(
                f"sequence length {item.strip()!r} in {text!r} is {T:.3g}, above the largest "
                f"torch can index (2^63 - 1)"
            )
        lens.append(T)
    return tuple(sorted(set(lens)))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


class BenchConfig(Config):
    """What `seqlab bench` measures; archs are patterns ("gdn*3,attn"), max_seconds bounds the
    predicted wall time of one measurement, max_memory_gb its peak (None: 60 % of the memory
    available when the run starts), time_limit the whole run's (None: no limit)."""

    archs: tuple[str, ...] = ("attn", "gdn", "gdn*3,attn")
    seq_lens: tuple[Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)], ...] = (512, 2048, 8192, 32768)
    d_model: PositiveInt = 256
    n_layers: PositiveInt = 4
    batch_size: PositiveInt = 1
    vocab_size: PositiveInt = 256
    channel: str | None = "swiglu"
    device: str = "cpu"
    dtype: str = "float32"
    threads: PositiveInt | None = None  # torch's CPU threads (None: its default)
    level: Literal["model", "op", "all"] = "all"
    warmup: NonNegativeInt = 1
    repeats: PositiveInt = 5
    decode_repeats: PositiveInt = 10
    max_seconds: PositiveFloat = 60.0
    max_memory_gb: PositiveFloat | None = None
    time_limit: PositiveFloat | None = None
    seed: int = 0

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, name: str) -> str:
        parse_dtype(name)
        return name

    @field_validator("device")
    @classmethod
    def _usable_device(cls, name: str) -> str:
        parse_device(name)
        return name

    @model_validator(mode="after")
    def _buildable_archs(self):
        if not self.archs:
            raise ValueError("give at least one arch")
        if not self.seq_lens:
            raise ValueError("give at least one sequence length")
        for arch in self.archs:
            try:  # unknown mixers, bad options, n_layers not a multiple of the pattern
                meta_model(self.arch_config(arch))
            except ValueError as e:
                raise ValueError(f"arch {arch!r}: {e}") from None
        return self

    def arch_config(self, arch: str) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            pattern=arch,
            channel=self.channel,
        )


def command_line(config: BenchConfig, out: str | Path) -> str:
    """The `seqlab bench` command that reproduces `config`, for the results to quote."""
    args = ["seqlab", "bench"]
    for arch in config.archs:
        args += ["--arch", arch]
    args += ["--seq-lens", ",".join(map(str, config.seq_lens))]
    defaults = BenchConfig.model_fields
    for name in BenchConfig.model_fields:
        value = getattr(config, name)
        if name not in ("archs", "seq_lens") and value != defaults[name].default:
            args += [f"--{name.replace('_', '-')}", "" if value is None else str(value)]
    return shlex.join([*args, "--out", str(out)])


def fit_slope(xs: list[float], ys: list[float | None]) -> dict[str, float] | None:
    """Least-squares slope of log y on log x (y ∝ x^slope), and the slope between the last two
    points (the long-T behaviour); points with y None are left out; None if fewer than two."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    (x0, y0), (x1, y1) = pts[-2:]
    return {
        "slope": slope,
        "last_slope": (y1 - y0) / (x1 - x0),
        "coefficient": math.exp(my - slope * mx),
        "points": len(pts),
    }


def readable_amount(x: float, decimals: int) -> str:
    """x with `decimals` decimals, or two significant digits where that would read as 0: a skip's
    reason must not say "predicted 0 s > max 1e-06 s"."""
    return f"{x:.{decimals}f}" if x == 0 or abs(x) >= 0.5 * 10**-decimals else f"{x:.2g}"


def over_memory(need_bytes: float, max_bytes: float) -> str:
    """ "predicted X GiB > max Y GiB", the reason a measurement over the memory limit is skipped."""
    need, limit = readable_amount(need_bytes / 2**30, 1), readable_amount(max_bytes / 2**30, 1)
    return f"predicted {need} GiB > max {limit} GiB"


class _Budget:
    """Predicts a measurement's wall time and memory from the same measurement at the previous
    length; remembers skips so longer lengths are skipped too. With a time limit, nothing starts
    once it has passed (`stopped` says so), nor anything predicted to end after it."""

    def __init__(
        self,
        max_seconds: float,
        max_bytes: int | None,
        time_limit: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.last: dict[Any, tuple[int, float, float, int | None]] = {}  # T, work, s, bytes
        self.skipped: dict[Any, str] = {}
        self.time_limit = time_limit
        self.clock = clock
        self.deadline = None if time_limit is None else clock() + time_limit
        self.stopped: str | None = None

    def seconds(self, key: Any, work: float) -> float | None:
        if key not in self.last:
            return None
        _, work0, s0, _ = self.last[key]
        return s0 * work / work0

    def check_memory(
        self, key: Any, T: int, predicted: int | None, held_bytes: int = 0
    ) -> str | None:
        """Skip (and remember) a measurement whose analytic peak memory, plus the `held_bytes`
        live before it (a model's weights), is over the limit; works for the first length too,
        where there is no measurement to extrapolate from."""
        if key in self.skipped:
            return self.skipped[key]
        if predicted is None and not held_bytes:
            return None
        predicted = held_bytes + (predicted or 0)
        if self.max_bytes is None or predicted <= self.max_bytes:
            return None
        return self.fail(key, T, over_memory(predicted, self.max_bytes))

    def check(
        self,
        key: Any,
        T: int,
        work: float,
        calls: int,
        extra_s: float,
        predicted_bytes: int | None = None,
        held_bytes: int = 0,
    ) -> str | None:
        """Skip (with the reason) a measurement predicted over a limit; `held_bytes` are live
        before it and not part of its measured peak (a model's weights), so they are added to
        the predicted peak and to the peak extrapolated from the previous length."""
        if key in self.skipped:
            return self.skipped[key]
        left = None if self.deadline is None else self.deadline - self.clock()
        if left is not None and left <= 0:
            self.stopped = self.stopped or f"the run's time limit ({self.time_limit:g} s) passed"
            return self.stopped
        if reason := self.check_memory(key, T, predicted_bytes, held_bytes):
            return reason
        if key not in self.last:
            return None
        T0, _, _, bytes0 = self.last[key]
        seconds = self.seconds(key, work) * calls + extra_s
        if seconds > self.max_seconds:
            return self.fail(
                key, T, f"predicted {readable_amount(seconds, 0)} s > max {self.max_seconds:g} s"
            )
        if left is not None and seconds > left:
            need, have = readable_amount(seconds, 0), readable_amount(left, 0)
            return self.fail(key, T, f"predicted {need} s > {have} s left of the time limit")
        grown = None if bytes0 is None else held_bytes + bytes0 * T / T0
        if grown is not None and self.max_bytes is not None and grown > self.max_bytes:
            return self.fail(key, T, over_memory(grown, self.max_bytes))
        return None

    def fail(self, key: Any, T: int, reason: str) -> str:
        self.skipped[key] = f"{reason} (at T = {T})"
        return self.skipped[key]

    def record(self, key: Any, T: int, work: float, seconds: float, peak: int | None) -> None:
        self.last[key] = (T, work, seconds, peak)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(
    budget: _Budget,
    key: Any,
    T: int,
    work: float,
    make_fn: Callable[[], tuple[Callable[[], object], dict[str, Any]]],
    device: torch.device,
    warmup: int,
    repeats: int,
    extra_s: float = 0.0,
    peer: bool = False,
    predicted_bytes: int | None = None,
    held_bytes: int = 0,
) -> dict[str, Any]:
    """Time and measure the call `make_fn` sets up, unless the budget says skip. A peer's
    failure is recorded, not raised: another library's kernel may reject a shape."""
    calls = 2 + warmup + repeats  # first call, warm-up, samples, the memory call
    reason = budget.check(key, T, work, calls, extra_s, predicted_bytes, held_bytes)
    if reason is not None:
        return {"skipped": reason}
    try:
        fn, info = make_fn()
        timing = time_call(fn, device, warmup, repeats)
        peak = peak_memory(fn, device)
    except Exception as e:
        _free(device)
        if is_out_of_memory(e):
            return {"skipped": budget.fail(key, T, "out of memory")}
        if not peer:
            raise
        return {"skipped": budget.fail(key, T, f"failed: {type(e).__name__}: {e}"[:300])}
    budget.record(key, T, work, timing.median_s, peak)
    return {**timing.to_dict(), "peak_bytes": peak, **info}


def _model_calls(model: CausalLM, ids: torch.Tensor) -> dict[str, Callable[[], tuple]]:
    """Set-ups of the three passes over ids [B, T + 1]: each makes the call to time and returns
    it with extra facts. The passes read the first T tokens; the last one is the next target
    (forward+backward) or the decoded token (decode)."""
    inputs, params = ids[:, :-1], list(model.parameters())

    def forward():
        with torch.no_grad():
            model(inputs)

    def forward_backward():
        out = model(inputs)
        logits = out.logits.flatten(0, 1).float()
        (F.cross_entropy(logits, ids[:, 1:].flatten()) + out.aux_loss).backward()
        for p in params:  # after, not before: the memory call then sees the gradients
            p.grad = None

    def decode():
        with torch.no_grad():
            prefilled = model(inputs).state
        token = ids[:, -1:]
        state = [prefilled]

        def step():
            # as `generate` runs it: each step continues the last (so an attention cache writes
            # into its room, as in generation), no id check; the context grows from T by one
            # token per call, a few dozen in all
            with torch.no_grad():
                state[0] = model(token, state[0], check_ids=False).state

        return step, {"state_bytes": CausalLM.state_bytes(prefilled) // ids.shape[0]}

    return {
        "forward": lambda: (forward, {}),
        "forward_backward": lambda: (forward_backward, {}),
        "decode": decode,
    }


def _bench_model(config: BenchConfig, arch: str, device, dtype, budget, log, entry, save) -> None:
    """Fill `entry` (already in the result) with a point per length, calling save() after each.

    The costs and memory predictions come from the model built on the meta device; the real one
    is built only at the first length with a pass that fits, its weights (`weight_bytes`) counted
    in every pass's predicted peak, so an architecture whose weights alone are over the limit is
    skipped with nothing allocated. It is built on the device in float32, then cast: that build
    (float32 weights, and the cast copy for another dtype) must fit the limit too."""
    meta = meta_model(config.arch_config(arch), dtype)
    weights = weight_bytes(meta)
    # the build: float32 weights on the device, then (another dtype) their cast copy beside them
    build = weights if dtype == torch.float32 else weight_bytes(meta_model(meta.config)) + weights
    model: CausalLM | None = None
    B = config.batch_size
    gen = torch.Generator().manual_seed(config.seed)
    layers = [str(s) for s in meta.config.mixer_specs()]
    entry.update(arch=arch, layers=layers, params=meta.num_params(), weight_bytes=weights)
    entry.update(points=[], fits={})
    for T in config.seq_lens:
        cost = model_cost(meta, T)
        memory = memory_bytes(meta, T, B)
        point: dict[str, Any] = {"seq_len": T, "analytic": cost.to_dict()}
        point["predicted_peak_bytes"] = memory
        skips = {
            name: budget.check_memory((arch, name), T, memory[name], weights) for name in memory
        }
        if model is None and not all(skips.values()):
            reason = budget.check_memory((arch, "build"), T, None, build)
            if reason is not None:  # every pass of every length: the model is never built
                skips = {name: f"building the model: {reason}" for name in memory}
        if all(skips.values()):  # none fits: make no inputs (nor, before now, the model)
            for name in MODEL_PASSES:
                point[name] = {"skipped": skips[name]}
                log(f"{arch} T={T} {name}: {skips[name]}")
            _add_model_point(entry, point)
            save()
            continue
        if model is None:
            torch.manual_seed(config.seed)
            with torch.device(device):  # on the device: a GPU bench's weights never on the host
                model = CausalLM(config.arch_config(arch))
            model = model.to(device=device, dtype=dtype).eval()
        ids = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen).to(device)
        calls = _model_calls(model, ids)
        work = {
            "forward": B * cost.prefill.total,
            "forward_backward": B * cost.train.total,
            "decode": B * cost.decode.total,
        }
        for name in MODEL_PASSES:
            repeats = config.decode_repeats if name == "decode" else config.repeats
            prefill_s = budget.seconds((arch, "forward"), work["forward"]) or 0.0
            point[name] = _measure(
                budget,
                (arch, name),
                T,
                work[name],
                calls[name],
                device,
                config.warmup,
                repeats,
                extra_s=prefill_s if name == "decode" else 0.0,
                predicted_bytes=memory[name],
                held_bytes=weights,
            )
            log(f"{arch} T={T} {name}: {_brief(point[name])}")
        fwd = point["forward"]
        if "median_s" in fwd:
            point["prefill_tokens_per_s"] = B * T / fwd["median_s"]
            point["forward_flops_per_s"] = work["forward"] / fwd["median_s"]
        _add_model_point(entry, point)
        save()


def _add_model_point(entry: dict[str, Any], point: dict[str, Any]) -> None:
    entry["points"].append(point)
    Ts = [p["seq_len"] for p in entry["points"]]
    entry["fits"] = {
        name: fit_slope(Ts, [p[name].get("median_s") for p in entry["points"]])
        for name in MODEL_PASSES
    }


def distinct_ops(config: BenchConfig) -> list[tuple[OpSpec, list[str]]]:
    """The distinct core ops of the archs' mixers, each with the archs that use it."""
    used: dict[OpSpec, list[str]] = {}
    for arch in config.archs:
        for block in meta_model(config.arch_config(arch)).blocks:
            spec = op_spec(block.mixer)
            archs = used.setdefault(spec, [])
            if arch not in archs:
                archs.append(arch)
    return list(used.items())


def _op_calls(impl: Callable, x: dict[str, torch.Tensor]) -> dict[str, Callable[[], tuple]]:
    def forward():
        with torch.no_grad():
            impl(x)

    def forward_backward():
        leaves = {n: t.detach().requires_grad_() if _differentiable(t) else t for n, t in x.items()}
        impl(leaves).float().sum().backward()

    return {"forward": lambda: (forward, {}), "forward_backward": lambda: (forward_backward, {})}


def _differentiable(t: object) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def _bench_op(config, spec: OpSpec, archs, device, dtype, peers, budget, log, entry, save) -> None:
    """Fill `entry` (already in the result) with a point per length, calling save() after each."""
    B = config.batch_size
    gen = torch.Generator().manual_seed(config.seed)
    impls = implementations(spec, peers)
    entry.update(op=spec.name, spec=spec.to_dict(), used_by=archs, impls=list(impls))
    entry.update(points=[], fits={})
    for T in config.seq_lens:
        flops = spec.flops(T).total
        point: dict[str, Any] = {"seq_len": T, "flops": flops}
        memory = {impl: spec.memory_bytes(T, B, dtype.itemsize, impl) for impl in impls}
        point["predicted_peak_bytes"] = memory
        keys = [(spec, impl_name, name) for impl_name in impls for name in OP_PASSES]
        skips = {key: budget.check_memory(key, T, memory[key[1]][key[2]]) for key in keys}
        if all(skips.values()):  # none fits: make no inputs
            for spec_, impl_name, name in keys:
                point.setdefault(impl_name, {})[name] = {"skipped": skips[spec_, impl_name, name]}
                log(f"{spec.name} T={T} {impl_name} {name}: {skips[spec_, impl_name, name]}")
            point["ratios"] = {peer: {} for peer in impls if peer != "seqlab"}
            _add_op_point(entry, point, impls)
            save()
            continue
        x = spec.make_inputs(B, T, dtype, device, gen)
        if "seqlab_backend" not in entry:
            entry["seqlab_backend"] = spec.backend(x)
        for impl_name, impl in impls.items():
            calls = _op_calls(impl, x)
            point[impl_name] = {}
            for name in OP_PASSES:
                work = B * flops * (3 if name == "forward_backward" else 1)
                point[impl_name][name] = _measure(
                    budget,
                    (spec, impl_name, name),
                    T,
                    work,
                    calls[name],
                    device,
                    config.warmup,
                    config.repeats,
                    peer=impl_name != "seqlab",
                    predicted_bytes=memory[impl_name][name],
                )
                log(f"{spec.name} T={T} {impl_name} {name}: {_brief(point[impl_name][name])}")
        point["ratios"] = {
            peer: {
                name: point["seqlab"][name]["median_s"] / point[peer][name]["median_s"]
                for name in OP_PASSES
                if "median_s" in point["seqlab"][name] and "median_s" in point[peer][name]
            }
            for peer in impls
            if peer != "seqlab"
        }
        _add_op_point(entry, point, impls)
        save()


def _add_op_point(entry: dict[str, Any], point: dict[str, Any], impls) -> None:
    entry["points"].append(point)
    Ts = [p["seq_len"] for p in entry["points"]]
    entry["fits"] = {
        impl: {
            name: fit_slope(Ts, [p[impl][name].get("median_s") for p in entry["points"]])
            for name in OP_PASSES
        }
        for impl in impls
    }


def _brief(m: dict[str, Any]) -> str:
    return m["skipped"] if "skipped" in m else f"{1e3 * m['median_s']:.2f} ms"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": meminfo("MemTotal"),
        "load_average_start": os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            compute_capability=f"{props.major}.{props.minor}",
        )
    return info


def _memory_budget(config: BenchConfig, device: torch.device) -> int | None:
    return memory_limit(config.max_memory_gb, device)


def memory_limit(max_memory_gb: float | None, device: torch.device) -> int | None:
    """Bytes a run may use: `max_memory_gb`, else 60 % of what is free now (on the GPU, or the
    machine's MemAvailable); None where neither is known."""
    if max_memory_gb is not None:
        if not 0 < max_memory_gb < math.inf:
            raise ValueError(f"max_memory_gb must be a positive finite number, got {max_memory_gb}")
        return int(max_memory_gb * 2**30)
    available = free_memory(device)
    return None if available is None else int(0.6 * available)


def run_bench(
    config: BenchConfig,
    log: Callable[[str], object] = lambda line: None,
    progress: Callable[[dict], object] = lambda result: None,
) -> dict:
    """Run what `config` asks for and return the results as a JSON-ready dict; `progress` sees
    the result so far after every measured length (its "complete" is False until the end)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, log, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, log, progress) -> dict:
    device, dtype = parse_device(config.device), parse_dtype(config.dtype)
    max_bytes = _memory_budget(config, device)
    budget = _Budget(config.max_seconds, max_bytes, config.time_limit)
    ops = distinct_ops(config) if config.level in ("op", "all") else []
    peers = peers_available(device, [spec for spec, _ in ops])
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {**config.model_dump(), "max_memory_bytes": max_bytes},
        "machine": describe_machine(device),
        "memory_method": memory_method(device),
        "peers": peers,
        "complete": False,
        "models": [],
        "ops": [],
    }

    def entry(kind: str) -> dict[str, Any]:
        result[kind].append({})
        return result[kind][-1]

    def save() -> None:
        if budget.stopped:
            result["stopped"] = budget.stopped
        progress(result)

    if config.level in ("model", "all"):
        for arch in config.archs:
            _bench_model(config, arch, device, dtype, budget, log, entry("models"), save)
    if config.level in ("op", "all"):
        for spec, archs in ops:
            args = (config, spec, archs, device, dtype, peers, budget, log, entry("ops"), save)
            _bench_op(*args)
    if budget.stopped:
        result["stopped"] = budget.stopped
    result["machine"]["load_average_end"] = os.getloadavg()
    result["complete"] = True
    return result


def titles(result: dict[str, Any]) -> dict[str, str]:
    s, m = result["settings"], result["machine"]
    where = m.get("gpu") or m["cpu"]
    shape = f"d_model {s['d_model']}, {s['n_layers']} layers, batch {s['batch_size']}"
    return {
        "models": f"Models ({shape}, vocab {s['vocab_size']}, {s['dtype']}, {where})",
        "fits": "Fitted time ∝ T^slope over all lengths (and between the two longest)",
        "ops": f"Core ops vs peers (batch {s['batch_size']}, {s['dtype']}, {where})",
    }
