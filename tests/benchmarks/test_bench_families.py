"""benchmarks/bench_families.py: its table builder over every registered family at tiny T, in
seconds (nothing asserts on speed)."""

from __future__ import annotations

from seqlab.ops.registry import families
from tests.benchmarks.scripts import ROOT, load_script


def load():
    return load_script(ROOT / "benchmarks" / "bench_families.py")


def test_table_covers_every_family_variant_and_form(tmp_path):
    bench = load()
    table = bench.rows(passes=(("fwd+bwd", 16), ("fwd", 32)), repeats=1, skip_slow=True)
    seen = {(r["family"], r["variant"]) for r in table}
    assert seen == {(n, v) for n, fam in families().items() for v in fam.variants}
    for r in table:
        fam = families()[r["family"]]
        skipped = fam.fast != "fft" and r["form"] != fam.fast and r["T"] == 32
        if r["form"] == bench.slow_form(fam) and skipped:
            assert r["s"] == "skipped"
        elif not r["form"].startswith("peer:"):
            assert isinstance(r["s"], float) and r["s"] > 0, r
    fast = [r for r in table if r["fast"] and r["pass"] == "fwd+bwd"]
    with_slow = [r for r in fast if bench.slow_form(families()[r["family"]]) != r["form"]]
    assert with_slow and all("vs_recurrent" in r for r in with_slow)
    text = bench.markdown(table, "# header")
    assert text.count("\n| ") == len(table) + 1 and "Targets:" in text


def test_main_writes_the_markdown(tmp_path):
    out = tmp_path / "families.md"
    load().main(["--families", "lmu", "--seq-lens", "8,16", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert "| lmu | default | **fft** | fwd+bwd | 8 |" in text and "torch" in text


def test_verdicts_hold_each_family_to_its_own_targets():
    """rnn is held to torch.nn (within 1.2x), not to its loop; mlstm to both its loop and half of
    mlstm_kernels' chunkwise time; a missed target says MISSED."""
    bench = load()

    def row(family, form, what, **ratios):
        base = {"family": family, "variant": "v", "form": form, "pass": what, "T": 16}
        return base | {"fast": True} | ratios

    table = [
        row("rnn", "fused", "fwd+bwd", vs_recurrent=2.0, vs_peers={"peer:torch.nn": 0.9}),
        row("mlstm", "chunk", "fwd+bwd", vs_recurrent=12.0),
        row("mlstm", "chunk", "fwd", vs_peers={"peer:mlstm_kernels_chunkwise": 1.5}),
    ]
    lines = bench._verdicts(table)
    assert lines == [
        "rnn/v fused fwd+bwd T=16 vs peer:torch.nn: 0.90x (≥ 0.83x met)",
        "mlstm/v chunk fwd+bwd T=16 vs recurrent: 12.00x (≥ 10.00x met)",
        "mlstm/v chunk fwd T=16 vs peer:mlstm_kernels_chunkwise: 1.50x (≥ 2.00x MISSED)",
    ]


def test_a_target_must_name_the_loop_or_a_registered_peer():
    import dataclasses

    import pytest

    fam = families()["rnn"]
    with pytest.raises(ValueError, match="target 'peer:cudnn'"):
        dataclasses.replace(fam, targets={"peer:cudnn": 1.0})
    with pytest.raises(ValueError, match="positive ratio"):
        dataclasses.replace(fam, targets={"recurrent": 0.0})
