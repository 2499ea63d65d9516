"""benchmarks/compile_triton.py: every Triton kernel compiled for the H100 (sm_90) on this CPU
machine, in bfloat16 at the benchmark's head dims (K = V = 128) and gdn's at d_model 1024
(K = 256, V = 512). The interpreter cannot catch what fails only in compilation (tl.dot shapes,
bf16 casts, shared memory over the per-block limit); this does, and it holds register spills to
what they are now, with the matmuls on Hopper's wgmma.

The script runs in a subprocess without TRITON_INTERPRET (the tests' own Triton is the
interpreter); the occupancy rule and the problem report are checked in-process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqlab.ops.triton.aot import CompiledKernel
from tests.benchmarks.scripts import ROOT, load_script, script_env
from tests.conftest import INTERPRET

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton ships for Linux only (the test extra)", allow_module_level=True)

SCRIPT = ROOT / "benchmarks" / "compile_triton.py"

TRAINING = {  # kernels one forward and backward launches, by family
    "linear": {"chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk"},
    "simple_gla": {
        "chunk_cumsum", "chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv",
        "chunk_bwd_dqk",
    },
    "gla": {
        "chunk_cumsum", "gla_intra_A", "chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh",
        "chunk_bwd_dv", "gla_bwd_dA", "gla_intra_dqk", "chunk_bwd_dqk",
    },
    "delta": {
        "wy_fwd", "chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk",
        "wy_bwd",
    },
}  # fmt: skip
TRAINING["gated_delta"] = TRAINING["delta"] | {"chunk_cumsum"}
# Kernels whose products are [64, ≥64] tiles: Hopper runs them as wgmma (mma.sync is slower)
WGMMA = {"chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk"}
WGMMA |= {"wy_fwd", "wy_bwd"}


def kernel(**kw) -> CompiledKernel:
    base = dict(name="k", constants={}, dtypes="bf16", num_warps=4, num_stages=2, shared=0)
    base |= dict(registers=32, spill=0, mma="none", mma_transposes=0, compile_s=0.0, arch=90)
    return CompiledKernel(**(base | kw))


def test_blocks_per_sm_follow_the_cuda_occupancy_rule():
    # 24 registers (768 per warp) x 4 warps: 21 blocks by registers, 16 by the 64-warp limit
    small = kernel(registers=24)
    assert (small.blocks_per_sm, small.limited_by) == (16, "warps")
    # 255 registers round up to 8192 per warp: 8 warps per SM, one 8-warp block
    big = kernel(registers=255, num_warps=8)
    assert (big.blocks_per_sm, big.limited_by) == (1, "registers")
    # 128 registers: 4096 per warp, 16 warps, 4 blocks of 4 warps
    assert kernel(registers=128).blocks_per_sm == 4
    # 100 KiB of shared memory (+1 KiB reserved) fits twice in 228 KiB
    shared = kernel(shared=100 * 1024)
    assert (shared.blocks_per_sm, shared.limited_by) == (2, "shared")
    # over the 227 KiB per-block limit: cannot launch
    over = kernel(shared=227 * 1024 + 1)
    assert (over.blocks_per_sm, over.limited_by) == (0, "shared")
    assert kernel(shared=227 * 1024).blocks_per_sm == 1


def test_problems_name_the_kernel_and_fail_the_run_where_they_should():
    script = load_script(SCRIPT)
    row = kernel(name="x", call="training").as_dict() | dict(family="gla", K=128, V=128)
    assert script.problems([row], fail_on_spill=True) == ([], False)
    spilled = row | {"spill": 24}
    found, fatal = script.problems([spilled], fail_on_spill=False)
    assert found == ["x (gla, training, K=128 V=128) spills 24 B per thread to local memory"]
    assert not fatal
    assert script.problems([spilled], fail_on_spill=True)[1]
    over = row | kernel(name="x", call="training", shared=300_000).as_dict()
    found, fatal = script.problems([over], fail_on_spill=False)
    assert fatal and "needs 300000 B of shared memory: it cannot launch" in found[0]


def test_transposed_accumulators_are_found_in_the_ir():
    from seqlab.ops.triton.aot import mma_transposes

    # lines of TTGIR that Triton 3.6 wrote for sm_90 (the first two from chunk_bwd_dqk_kernel
    # before it stored dA and loaded it back transposed)
    hazard = (
        "%b_dk = tt.trans %b_dA_134 {order = array<i32: 1, 0>} : "
        "tensor<64x64xbf16, #mma> -> tensor<64x64xbf16, #linear> loc(#loc240)"
    )
    second = (
        "%x = tt.trans %y {order = array<i32: 1, 0>} : "
        "tensor<64x64xf32, #mma1> -> tensor<64x64xf32, #linear>"
    )
    loaded = (
        "%b_k_174 = tt.trans %b_k_173 {order = array<i32: 0, 3, 2, 1>} : "
        "tensor<64x2x2x16xbf16, #linear1> -> tensor<64x16x2x2xbf16, #linear2> loc(#loc172)"
    )
    assert mma_transposes("\n".join([hazard, loaded, second])) == 2
    assert mma_transposes(loaded) == 0
    script = load_script(SCRIPT)
    row = kernel(name="x", call="training", mma_transposes=1).as_dict()
    found, fatal = script.problems([row | dict(family="gla", K=64, V=64)], fail_on_spill=False)
    assert fatal and "transposes a tl.dot result" in found[0]


def test_bad_arguments_are_named():
    script = load_script(SCRIPT)
    with pytest.raises(SystemExit):
        script.parse_args(["--head-dims", "128", "--out", "x"])
    with pytest.raises(SystemExit):
        script.parse_args(["--families", "gla,mamba", "--out", "x"])


@pytest.mark.skipif(not INTERPRET, reason="the tests' Triton compiles here: covered in-process")
def test_compile_only_refuses_the_interpreter():
    from seqlab.ops.triton.aot import compile_only

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with compile_only():
            pass


def run_script(args: list[str], out: Path) -> dict:
    """The script in a process of its own, with Triton's compiler; its compile.json."""
    env = script_env(interpret=False)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "compile.json").read_text())


# Register spills (bytes per thread of local memory and stack frame) that the kernels have now,
# found when the stack frame was first counted: they may shrink, not grow or spread.
SPILL_BUDGET = {"chunk_bwd_dqk": 96, "chunk_bwd_dh": 432}


def test_every_kernel_compiles_for_sm90_within_its_spill_budget(tmp_path):
    data = run_script([], tmp_path)
    assert all("spills" in p for p in data["problems"]), data["problems"]
    rows = data["kernels"]
    for K, V in [(128, 128), (256, 512)]:
        for family, expected in TRAINING.items():
            mine = [r for r in rows if (r["K"], r["V"], r["family"]) == (K, V, family)]
            names = {r["name"].removesuffix("_kernel") for r in mine}
            training = {r["name"].removesuffix("_kernel") for r in mine if r["call"] == "training"}
            assert training == expected, (K, V, family)
            assert "fused_recurrent" in names, (K, V, family)
            for r in mine:
                budget = SPILL_BUDGET.get(r["name"].removesuffix("_kernel"), 0)
                assert r["arch"] == 90 and r["spill"] <= budget and r["blocks_per_sm"] >= 1, r
                assert r["mma_transposes"] == 0, r
                if r["name"].removesuffix("_kernel") in WGMMA:
                    assert r["mma"] == "wgmma" and "bf16" in r["dtypes"].split(","), r
    text = (tmp_path / "compile.md").read_text()
    assert "| 256×512 | gated_delta | training | wy_fwd_kernel |" in text


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="fla-core is not installed")
def test_fla_compiles_as_on_an_h100_and_its_hopper_guard_is_reported(tmp_path):
    """fla imported as on an H100 chooses its Hopper configs; its gated backward then refuses
    Triton 3.4-3.7.0 on Hopper, as it does on the GPU machine (Triton 3.6.0)."""
    data = run_script(["--fla", "--families", "simple_gla", "--head-dims", "64x64"], tmp_path)
    fla = [r for r in data["kernels"] if r["impl"] == "fla"]
    # its autotuner compiles every config it lists, several per kernel
    assert len(fla) > len({r["name"] for r in fla}) >= 2
    [error] = data["fla_errors"]
    assert error["pass"] == "backward" and "Hopper" in error["error"], error
    assert "fla raised" in (tmp_path / "compile.md").read_text()
