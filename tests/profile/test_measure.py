"""Timing statistics and the peak-memory measure. No assertion here depends on how fast
anything runs: speed is measured by `seqlab bench`, not tested."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from seqlab.profile.measure import (
    Timing,
    interleaved_times,
    is_out_of_memory,
    memory_method,
    package_versions,
    peak_memory,
    time_call,
)

CPU = torch.device("cpu")
MiB = 2**20


def test_timing_statistics():
    t = Timing(first_call_s=9.0, samples_s=(5.0, 1.0, 4.0, 2.0, 3.0))
    assert (t.median_s, t.q1_s, t.q3_s, t.min_s, t.max_s) == (3.0, 2.0, 4.0, 1.0, 5.0)
    d = t.to_dict()
    assert d["first_call_s"] == 9.0 and d["repeats"] == 5 and d["median_s"] == 3.0
    one = Timing(first_call_s=1.0, samples_s=(2.0,))
    assert one.q1_s == one.median_s == one.q3_s == 2.0


@pytest.mark.parametrize("warmup,repeats", [(0, 1), (2, 3)])
def test_time_call_times_the_first_call_apart(warmup, repeats):
    calls = []
    timing = time_call(lambda: calls.append(1), CPU, warmup=warmup, repeats=repeats)
    assert len(calls) == 1 + warmup + repeats
    assert len(timing.samples_s) == repeats
    assert timing.first_call_s >= 0 and timing.min_s >= 0


def test_time_call_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, CPU, repeats=0)


def _log_calls(names):
    log = []
    return log, {n: (lambda n=n: log.append(n)) for n in names}


def test_interleaved_times_shuffles_each_round_reproducibly():
    """Every call runs once per round; the orders vary between rounds (so no call always runs
    after the same one), and the same seed gives the same orders."""
    names, rounds = ["a", "b", "c", "d"], 12
    log, calls = _log_calls(names)
    times = interleaved_times(calls, rounds)
    assert set(times) == set(names) and all(len(t) == rounds for t in times.values())
    assert all(t >= 0 for ts in times.values() for t in ts)
    orders = [tuple(log[i : i + 4]) for i in range(0, len(log), 4)]
    assert all(sorted(o) == names for o in orders)
    assert len(set(orders)) > 1
    # over the run, each call comes right after at least two different calls
    after = {n: {log[i - 1] for i in range(1, len(log)) if log[i] == n} for n in names}
    assert all(len(prev) >= 2 for prev in after.values()), after
    again, calls = _log_calls(names)
    interleaved_times(calls, rounds)
    assert again == log
    other, calls = _log_calls(names)
    interleaved_times(calls, rounds, seed=1)
    assert other != log


def test_package_versions_names_each_package_or_its_absence():
    line = package_versions(("torch", "pydantic", "seqlab-no-such-package"))
    assert line == (
        f"torch {importlib.metadata.version('torch')}, "
        f"pydantic {importlib.metadata.version('pydantic')}, seqlab-no-such-package not installed"
    )
    assert package_versions(()) == ""


def test_interleaved_times_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times({"a": lambda: None}, 0)


needs_rss = pytest.mark.skipif(
    memory_method(CPU).startswith("unavailable"), reason=memory_method(CPU)
)


@needs_rss
def test_peak_memory_sees_what_a_call_allocates():
    def two_live_tensors():
        a = torch.ones(16 * MiB // 4)  # 16 MiB
        b = a * 2  # 16 MiB more while a is alive
        return b.sum()

    peak = peak_memory(two_live_tensors, CPU)
    assert 31 * MiB <= peak < 40 * MiB  # RSS is counted in pages: a little slack


@needs_rss
def test_peak_memory_is_not_hidden_by_memory_freed_earlier():
    """Memory a previous call freed goes back to the OS first, so it is not reused unseen."""
    big = torch.ones(64 * MiB // 4)
    del big
    peak = peak_memory(lambda: torch.ones(32 * MiB // 4).sum(), CPU)
    assert 31 * MiB <= peak < 40 * MiB  # RSS is counted in pages: a little slack


def test_memory_method_names_the_measure():
    assert "max_memory_allocated" in memory_method(torch.device("cuda"))
    assert memory_method(torch.device("meta")).startswith("unavailable")
    assert peak_memory(lambda: None, torch.device("meta")) is None


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
