"""`train`, `probe`, `bench` and `results` check what they will need before any training or
timing (issue 14, item 3): a results database that opens and is an SQLite database, a writable
--out, a --device that exists, every --arch of a probe. Each error names the option and the
value. `results` reads a database it cannot write (read-only file or filesystem).

Run: .venv/bin/python -m pytest tests/test_cli_preflight.py -q

Work is replaced by a function that fails the test, so each case proves the check came first.
"""

from __future__ import annotations

import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from seqlab.cli import app
from seqlab.train.results import ResultsStore
from tests.train.conftest import TINY_MQAR_ARGS

TASK = ["--task", "mqar", *(a for o in TINY_MQAR_ARGS for a in ("--task-option", o))]
TRAIN = ["train", *TASK, "--arch", "gla", "--d-model", "16", "--n-layers", "1", "--steps", "2"]
TRAIN += ["--batch-size", "4", "--eval-every", "2", "--no-progress", "--device", "cpu"]
PROBE = ["probe", *TASK, "--steps", "2", "--batch-size", "4", "--d-model", "16", "--no-progress"]
PROBE += ["--device", "cpu"]
BENCH = ["bench", "--arch", "gdn(num_heads=2, head_dim=8)", "--seq-lens", "16", "--d-model", "16"]
BENCH += ["--n-layers", "2", "--repeats", "1", "--warmup", "0", "--decode-repeats", "1"]
NO_DEVICE = "cuda:7" if torch.cuda.device_count() <= 7 else "cuda:99"


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Training and timing fail the test: every check must come before them."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("seqlab.train.trainer.Trainer.run", work)
    monkeypatch.setattr("seqlab.profile.bench.time_call", work)


def results_db(command, tmp_path):
    return [] if command == "bench" else ["--results", str(tmp_path / "r.db")]


def run(args):
    result = CliRunner().invoke(app, args, terminal_width=250)
    return result, " ".join(result.output.split())


def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a database\n" * 20)
    return path


@pytest.mark.parametrize("command", ["train", "probe"])
def test_a_results_file_that_is_not_a_database(command, tmp_path):
    db = text_file(tmp_path)
    args = TRAIN if command == "train" else [*PROBE, "--out", str(tmp_path / "p")]
    result, text = run([*args, "--results", str(db)])
    assert result.exit_code == 2, result.output
    assert "--results" in text and str(db) in text and "not an SQLite database" in text
    assert db.read_text().startswith("these are notes")  # untouched


def test_results_command_on_a_file_that_is_not_a_database(tmp_path):
    db = text_file(tmp_path)
    result, text = run(["results", "--db", str(db)])
    assert result.exit_code == 2 and "--db" in text and "not an SQLite database" in text


def test_results_command_on_a_missing_database_creates_nothing(tmp_path):
    db = tmp_path / "none" / "results.db"
    result, text = run(["results", "--db", str(db)])
    assert result.exit_code == 2 and "--db" in text and "no results database" in text
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("command", ["train", "probe", "bench"])
@pytest.mark.parametrize("where", ["file", "under_file", "broken_link", "under_broken_link"])
def test_an_out_that_cannot_be_a_writable_folder(command, where, tmp_path):
    blocker = text_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")  # a dangling link: bench once ran and lost its results
    out = {
        "file": blocker,
        "under_file": blocker / "sub",
        "broken_link": link,
        "under_broken_link": link / "sub",
    }[where]
    args = {"train": TRAIN, "probe": PROBE, "bench": BENCH}[command]
    result, text = run([*args, "--out", str(out), *results_db(command, tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--out" in text and str(out) in text


@pytest.mark.parametrize("command", ["train", "probe", "bench"])
@pytest.mark.parametrize("device", [NO_DEVICE, "tpu", "cuda:x", "cpu:1"])
def test_a_device_that_does_not_exist(command, device, tmp_path):
    args = {"train": TRAIN, "probe": PROBE, "bench": BENCH}[command]
    out = ["--out", str(tmp_path / "out"), *results_db(command, tmp_path)]
    result, text = run([*args, *out, "--device", device])
    assert result.exit_code == 2, result.output
    assert "--device" in text and repr(device) in text


def test_probe_checks_every_arch_before_training_the_first(tmp_path):
    args = [*PROBE, "--out", str(tmp_path / "p"), "--arch", "attn", "--arch", "gdn(nope=1)"]
    result, text = run([*args, "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 2, result.output
    assert "gdn(nope=1)" in text and "nope" in text


def test_results_reads_a_database_it_cannot_write(tmp_path, monkeypatch):
    """A read-only file in a read-only folder (chmod 0444 in 0555: root ignores those, so the
    filesystem's refusal is simulated): only connections that ask for read-only access open."""
    store = ResultsStore(tmp_path / "ro" / "results.db")
    run_id = store.add({"task": {"name": "mqar"}, "model": {"pattern": "gdn"}, "metrics": {}})
    connect = sqlite3.connect

    def read_only_filesystem(database, *args, uri=False, **kwargs):
        if not (uri and ("mode=ro" in str(database) or "immutable=1" in str(database))):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_filesystem)
    result, text = run(["results", "--db", str(store.path)])
    assert result.exit_code == 0, result.output
    assert "1 runs in" in text and run_id in text


def test_read_only_store_opens_read_only(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    store.add({"task": {"name": "mqar"}, "model": {"pattern": "gdn"}, "metrics": {}})
    reader = ResultsStore(store.path, read_only=True)
    assert len(reader.runs()) == 1
    db = reader.connect()
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM runs")
    finally:
        db.close()


@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_results_csv_that_cannot_be_a_file_is_refused(where, tmp_path):
    db = tmp_path / "r.db"
    ResultsStore(db)
    csv = tmp_path if where == "folder" else text_file(tmp_path) / "runs.csv"
    result, text = run(["results", "--db", str(db), "--csv", str(csv)])
    assert result.exit_code == 2, result.output
    assert "--csv" in text and str(csv) in text


def test_a_binary_config_file_is_named(tmp_path):
    config = tmp_path / "binary.toml"
    config.write_bytes(b"\xff\xfe\x00garbage")
    result, text = run(["train", "--config", str(config), "--no-record"])
    assert result.exit_code == 2, result.output
    assert str(config) in text and "not valid TOML" in text


def test_an_empty_out_dir_is_refused(tmp_path):
    result, text = run([*TRAIN, "--set", "train.out_dir=''", "--no-record"])
    assert result.exit_code == 2, result.output
    assert "out_dir" in text


@pytest.mark.parametrize("command", ["train", "probe", "bench"])
def test_a_model_whose_size_overflows_is_named(command, tmp_path):
    """A width whose weights overflow 64-bit sizes: torch's 'Storage size calculation
    overflowed' traceback before; now an error naming the sizes, exit 2."""
    base = {"train": TRAIN, "probe": PROBE, "bench": BENCH}[command]
    args = [a if a != "16" else str(2**63 - 1) for a in base]  # --d-model
    out = ["--out", str(tmp_path / "o")] + results_db(command, tmp_path)
    result, text = run([*args, *out])
    assert result.exit_code == 2, text
    assert "too large to build" in text and str(2**63 - 1) in text
    assert "Traceback" not in text


@pytest.mark.parametrize("command", ["train", "probe"])
def test_a_model_larger_than_free_memory_is_refused_before_it_is_built(
    command, tmp_path, monkeypatch
):
    """Weights, gradients and AdamW state beyond the memory free: torch's allocator traceback
    ('can't allocate memory') after building; now refused first, naming the sizes."""
    monkeypatch.setattr("seqlab.train.trainer.free_memory", lambda device: 1000)
    built = []
    real = __import__("seqlab.model.lm", fromlist=["CausalLM"]).CausalLM.__init__

    def spy(self, config):
        if torch.get_default_device().type != "meta":
            built.append(config)
        real(self, config)

    monkeypatch.setattr("seqlab.model.lm.CausalLM.__init__", spy)
    base = {"train": TRAIN, "probe": PROBE}[command]
    out = ["--out", str(tmp_path / "o")] + results_db(command, tmp_path)
    result, text = run([*base, *out])
    assert result.exit_code != 0, repr(result.exception)
    assert "more than the 0.0 GiB this machine has free" in text, text
    assert "parameters" in text and "choose a smaller model" in text
    assert built == []


def test_check_model_fits_counts_four_float32_copies_and_fsdp_shards(monkeypatch):
    from seqlab.model.lm import ModelConfig
    from seqlab.profile.cost import meta_model, weight_bytes
    from seqlab.train.trainer import check_model_fits

    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, pattern="gla")
    need = 4 * weight_bytes(meta_model(config))
    cpu = torch.device("cpu")
    monkeypatch.setattr("seqlab.train.trainer.free_memory", lambda device: need)
    check_model_fits(config, cpu)  # exactly enough
    monkeypatch.setattr("seqlab.train.trainer.free_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match="more than the"):
        check_model_fits(config, cpu)
    check_model_fits(config, cpu, shards=2)  # FSDP: half on each rank
    monkeypatch.setattr("seqlab.train.trainer.free_memory", lambda device: None)
    check_model_fits(config, cpu)  # unknown free memory: no refusal
