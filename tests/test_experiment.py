"""ExperimentConfig: TOML in and out, dotted overrides reaching every field, clear errors, strict
types, and run_experiment's record carrying the config.

Run: .venv/bin/python -m pytest tests/test_experiment.py -q
"""

from __future__ import annotations

import pytest
import torch

from seqlab.experiment import (
    ExperimentConfig,
    ModelSpec,
    apply_overrides,
    experiment_from_dict,
    experiment_to_toml,
    load_experiment,
    parse_value,
    run_experiment,
)
from seqlab.model.lm import ModelConfig
from seqlab.train.results import ResultsStore
from seqlab.train.trainer import TrainConfig
from tests.train.conftest import TINY_MQAR

# Every field of TrainConfig and ModelSpec: (--set text, the value it gives), none a default.
SETTINGS = {
    "train.steps": ("7", 7),
    "train.batch_size": ("4", 4),
    "train.lr": ("3e-3", 3e-3),
    "train.warmup_steps": ("0", 0),
    "train.min_lr_ratio": ("0.25", 0.25),
    "train.weight_decay": ("0.05", 0.05),
    "train.betas": ("[0.8, 0.99]", (0.8, 0.99)),
    "train.grad_clip": ("none", None),
    "train.eval_every": ("5", 5),
    "train.eval_batch_size": ("16", 16),
    "train.eval_batches": ("none", None),
    "train.target_accuracy": ("0.9", 0.9),
    "train.seed": ("11", 11),
    "train.device": ("cpu", "cpu"),
    "train.out_dir": ("runs/x", "runs/x"),
    "train.progress": ("false", False),
    "train.precision": ('"bf16"', "bf16"),
    "train.grad_accum": ("2", 2),
    "train.compile": ("true", True),
    "train.tensorboard": ("false", False),
    "train.mlflow": ('"sqlite:///runs.db"', "sqlite:///runs.db"),
    "train.wandb": ("mqar-study", "mqar-study"),
    "train.distributed": ('"fsdp"', "fsdp"),
    "train.sequence_parallel": ("2", 2),
    "model.d_model": ("32", 32),
    "model.n_layers": ("4", 4),
    "model.pattern": ("gdn*3,attn", "gdn*3,attn"),
    "model.channel": ("'moe(num_experts=4)'", "moe(num_experts=4)"),
    "model.norm_eps": ("1e-6", 1e-6),
    "model.init_std": ("0.01", 0.01),
    "model.tie_embeddings": ("false", False),
}
TINY = [
    *(f"task.options.{k}={v!r}".replace("(", "[").replace(")", "]") for k, v in TINY_MQAR.items()),
    "model.d_model=16",
    "model.n_layers=1",
    "model.pattern=gla",
    "train.steps=6",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.progress=false",
    "train.device=cpu",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def every_field_set() -> ExperimentConfig:
    overrides = [f"{key}={text}" for key, (text, _) in SETTINGS.items()]
    overrides += ["task.name=mqar", "task.preset=none", "task.options.num_kv_pairs=3"]
    overrides += ["task.options.train_mix=[[16, 2, 256], [16, 4, 256]]"]
    return load_experiment(None, overrides)


def test_the_settings_cover_every_field_of_train_and_model_config():
    model_fields = set(ModelConfig.model_fields) - {"vocab_size"}
    assert set(ModelSpec.model_fields) == model_fields
    assert set(SETTINGS) == {f"train.{f}" for f in TrainConfig.model_fields} | {
        f"model.{f}" for f in model_fields
    }
    defaults = ExperimentConfig()
    for key, (_, value) in SETTINGS.items():
        section, name = key.split(".")
        assert getattr(getattr(defaults, section), name) != value, f"{key}: pick a non-default"


@pytest.mark.parametrize("key", list(SETTINGS))
def test_every_field_is_reachable_by_set(key):
    text, value = SETTINGS[key]
    cfg = load_experiment(None, [f"{key}={text}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    if section == "model":  # it reaches the model the trainer builds
        assert getattr(cfg.model_config_for(32), name) == value


def test_every_field_is_reachable_from_a_toml_file(tmp_path):
    cfg = every_field_set()
    path = tmp_path / "run.toml"
    path.write_text(experiment_to_toml(cfg))
    assert load_experiment(path) == cfg
    for key, (_, value) in SETTINGS.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_toml_round_trip_is_exact(tmp_path):
    for cfg in (ExperimentConfig(), every_field_set()):
        text = experiment_to_toml(cfg)
        path = tmp_path / "run.toml"
        path.write_text(text)
        again = load_experiment(path)
        assert again == cfg and experiment_to_toml(again) == text
        # a results record's form, with null for unset values, reads back too
        assert experiment_from_dict(cfg.model_dump(mode="json")) == cfg
    assert 'grad_clip = "none"' in experiment_to_toml(every_field_set())


def test_task_options_compare_equal_from_tuples_and_lists():
    from_python = experiment_from_dict({"task": {"options": {"train_mix": ((16, 2, 256),)}}})
    from_toml = load_experiment(None, ["task.options.train_mix=[[16, 2, 256]]"])
    assert from_python == from_toml
    assert from_toml.task.build().config.train_mix == ((16, 2, 256),)


def test_n_layers_defaults_to_the_pattern_rounded_up_to_two():
    assert load_experiment().model_config_for(8).n_layers == 2
    assert load_experiment(None, ["model.pattern=gdn*3,attn"]).model_config_for(8).n_layers == 4
    with pytest.raises(ValueError, match="model: n_layers = 3 is not a multiple"):
        load_experiment(None, ["model.pattern=gdn*3,attn", "model.n_layers=3"])


def test_parse_value_reads_toml_else_text():
    assert parse_value("3e-3") == 3e-3 and parse_value("8") == 8 and parse_value("true") is True
    assert parse_value("[0.9, 0.99]") == [0.9, 0.99]
    assert parse_value("'gdn*3,attn'") == parse_value("gdn*3,attn") == "gdn*3,attn"
    assert parse_value("gla(expand_k=0.5)") == "gla(expand_k=0.5)"
    assert parse_value("1\nother = 2") == "1\nother = 2"  # one value, never more keys


def test_overrides_apply_in_order_and_leave_the_input_alone():
    data = {"train": {"lr": 0.1}}
    out = apply_overrides(data, ["train.lr=0.2", "train.lr=0.3", "model.d_model=8"])
    assert out == {"train": {"lr": 0.3}, "model": {"d_model": 8}}
    assert data == {"train": {"lr": 0.1}}


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.lrr=1", ["unknown key 'train.lrr'", "valid keys of [train]", "train.lr,"]),
        ("trian.lr=1", ["unknown key 'trian.lr'", "task.name", "model.pattern", "train.lr"]),
        ("train=3", ["'train' is a table", "train.steps"]),
        ("train.lr.x=1", ["unknown key 'train.lr.x'"]),
        ("train.lr", ["must read KEY=VALUE"]),
        ("-x=1", ["'-x' is not a dotted key"]),
        ("task.options.nope=1", ["task", "unknown option(s) nope", "num_kv_pairs"]),
        ("task.name=nope", ["unknown task 'nope'", "mqar", "parity"]),
        ("task.preset=big", ["no preset 'big'", "cpu"]),
        ("model.pattern=nope", ["model", "unknown mixer 'nope'", "gdn"]),
        ("model.pattern=gdn(nope=1)", ["model", "nope"]),
        ("model.n_layers=0", ["model.n_layers", "greater than 0"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("train.lr=inf", ["train.lr", "finite"]),
        ("train.lr=fast", ["train.lr", "valid number", "'fast'"]),
        ("train.betas=[0.9]", ["train.betas"]),
        ("model.pattern=none", ["unknown mixer 'none'"]),  # "none" unsets optional fields only
        ("model.d_model=none", ["model.d_model", "valid integer", "'none'"]),
    ],
)
def test_unknown_keys_and_bad_values_are_clear_errors(override, fragments):
    with pytest.raises(ValueError) as e:
        load_experiment(None, [override])
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=true",
        "train.steps=5.0",
        "train.steps='5'",
        "model.tie_embeddings=1",
        "train.progress='yes'",
        "model.d_model=64.0",
        "train.lr='0.1'",
        "train.betas=[true, 0.9]",
        "model.channel=true",
    ],
)
def test_types_are_strict(override):
    key = override.partition("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_experiment(None, [override])


def test_an_int_fills_a_float_field():
    assert load_experiment(None, ["train.lr=1"]).train.lr == 1.0


def test_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "run.toml"
    with pytest.raises(ValueError, match="no such file"):
        load_experiment(path)
    path.write_text("[train]\nlr = \n")
    with pytest.raises(ValueError, match=f"{path}: not valid TOML"):
        load_experiment(path)
    path.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(ValueError, match=f"{path}: unknown key 'train.lrr'; valid keys"):
        load_experiment(path)
    path.write_text("[training]\nlr = 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'training'"):
        load_experiment(path)
    path.write_text("[task]\noptions = 3\n")
    with pytest.raises(ValueError, match="task.options must be a table"):
        load_experiment(path)


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npattern = "gla"\nd_model = 16\n[train]\nlr = 0.01\n')
    cfg = load_experiment(path, ["train.lr=0.02"], values={"model.d_model": 24})
    assert (cfg.model.pattern, cfg.model.d_model, cfg.train.lr) == ("gla", 24, 0.02)
    cfg = load_experiment(path, defaults={"train.lr": 0.5, "train.steps": 9})
    assert (cfg.train.lr, cfg.train.steps) == (0.01, 9)  # the file wins over defaults


def test_updated_checks_the_new_values():
    cfg = ExperimentConfig()
    assert cfg.updated({"model.pattern": "gdn"}).model.pattern == "gdn"
    with pytest.raises(ValueError, match="unknown mixer"):
        cfg.updated({"model.pattern": "nope"})


def test_run_experiment_records_the_config_and_extra(tmp_path):
    cfg = load_experiment(None, TINY)
    store = ResultsStore(tmp_path / "r.db")
    seen = []
    extra = {"search": {"study": "s", "trial": 3}, "tags": {"probe": "no"}}
    result, record = run_experiment(cfg, store=store, extra=extra, on_result=seen.append)
    assert seen == [result] and result.step == 6
    (stored,) = store.runs()
    assert stored["id"] == record["id"]
    assert stored["search"] == {"study": "s", "trial": 3} and stored["tags"] == {"probe": "no"}
    assert experiment_from_dict(stored["experiment"]) == cfg
    assert stored["model"]["pattern"] == "gla" and stored["model"]["vocab_size"] == 32
    assert stored["train"]["steps"] == 6 and stored["metrics"]["final"] == result.final
    assert run_experiment(cfg)[1] is None  # no store: nothing recorded
    assert store.count() == 1


def test_run_experiment_resumes_from_out_dir(tmp_path):
    out = tmp_path / "run"
    cfg = load_experiment(None, [*TINY, f"train.out_dir='{out}'"])
    first, _ = run_experiment(cfg)
    again, _ = run_experiment(cfg)
    assert again.resumed_from == 6 and again.final == first.final
