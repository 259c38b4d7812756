"""Configs: defaults validate, YAML round trip, typed --set overrides, errors that name the field or the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from instructedit.experiments.balance import load_balance_config
from instructedit.experiments.scaling import load_scaling_config
from instructedit.config import Config, YAMLLoader, config_from_dict, load_config, parse_override, save_config
from instructedit.editors.calinet import CaliNetConfig
from instructedit.editors.ft import FTConfig
from instructedit.editors.grace import GRACEConfig
from instructedit.editors.registry import EDITORS
from instructedit.experiments.table3 import ExperimentConfig
from instructedit.experiments.transfer import TransferConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))
# configs/baselines/*.yaml hold {method, options} for an editing method instead of an experiment config
METHOD_OPTIONS = {"ft": FTConfig, "grace": GRACEConfig, "calinet": CaliNetConfig}


def test_defaults_validate() -> None:
    config = load_config()
    assert config == Config()
    assert config.data.tasks == ["counterfact", "wikirecent", "convsent"]
    assert config.training.edit_loss_on == "rephrase"
    assert config.evaluation.instruction == "seen"


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ["training.lr=1e-5", "data.tasks=[zsre]", "model.edit_weights=[a.b, c.d]",
                                "model.architecture={layers: x, final_norm: y, mlp_modules: [z]}", "data.max_per_task=7"])
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert again.to_dict() == config.to_dict()
    save_config(Config(), path)
    assert load_config(path) == Config()


def test_overrides_are_typed() -> None:
    config = load_config(None, ["training.lr=1e-5", "data.tasks=[zsre]", "training.c_loc=2", "training.batch_size=4",
                                "data.instructions=false", "evaluation.instruction=unseen", "data.instruction_pool=/x.json"])
    assert config.training.lr == 1e-5 and type(config.training.lr) is float
    assert config.data.tasks == ["zsre"]
    assert config.training.c_loc == 2.0 and type(config.training.c_loc) is float  # int accepted for a float
    assert config.training.batch_size == 4 and type(config.training.batch_size) is int
    assert config.data.instructions is False
    assert config.evaluation.instruction == "unseen"
    assert config.data.instruction_pool == "/x.json"


@pytest.mark.parametrize("text", ["1e-5", "1E-5", "-1e-5", "+1e5", "1.5e-5", "1.0e-5", "0.00001"])
def test_exponent_floats_parse_as_floats(text: str) -> None:
    _, value = parse_override(f"training.lr={text}")
    assert isinstance(value, float) and value == float(text)


def test_yaml_file_with_exponent_float(tmp_path: Path) -> None:
    path = tmp_path / "lr.yaml"
    path.write_text("training:\n  lr: 3e-4\n  lr_lr: 1e-3\n")
    config = load_config(path)
    assert config.training.lr == 3e-4 and config.training.lr_lr == 1e-3


def test_override_replaces_file_value(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text("training:\n  max_steps: 10\n  lr: 0.1\n")
    config = load_config(path, ["training.max_steps=20"])
    assert config.training.max_steps == 20 and config.training.lr == 0.1


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("training.batch_size=true", "training.batch_size"),  # bool is not an int
        ("training.max_steps=1.5", "training.max_steps"),
        ("training.lr=fast", "training.lr"),
        ("training.lr=true", "training.lr"),
        ("data.tasks=zsre", "data.tasks"),
        ("data.instructions=3", "data.instructions"),
        ("model.name=null", "model.name"),
    ],
)
def test_wrong_type_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"config field '{field}'")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("training.edit_loss_on=paraphrase", "training.edit_loss_on", "'paraphrase' is not one of ['rephrase', 'edit_input', 'rephrase+chat', 'rephrase+plain+chat']"),
        ("training.locality_frames=[raw, chat]", "training.locality_frames", "must be distinct frames out of ['raw', 'wrapped']"),
        ("training.locality_frames=[raw, raw]", "training.locality_frames", "must be distinct frames"),
        ("training.locality_frames=[]", "training.locality_frames", "must be distinct frames"),
        ("data.tasks=[counterfact, wikipedia]", "data.tasks", "unknown task 'wikipedia'"),
        ("data.split_fractions=[0.8, 0.1, 0.2]", "data.split_fractions", "must sum to 1"),
        ("data.split_fractions=[0.5, 0.5]", "data.split_fractions", "three positive fractions"),
        ("model.dtype=float64", "model.dtype", "'float64' is not one of float32, bfloat16, float16"),
        ("evaluation.instruction=sometimes", "evaluation.instruction", "'sometimes' is not 'seen', 'unseen' or a description index"),
        ("training.lr=-1e-5", "training.lr", "must be positive"),
        ("training.lr=.inf", "training.lr", "must be positive and finite"),
        ("training.lr=.nan", "training.lr", "must be positive and finite"),
        ("training.lr=0", "training.lr", "must be positive"),
        ("training.lr_lr=.inf", "training.lr_lr", "must be finite and >= 0"),
        ("training.lr_lr=-1e-4", "training.lr_lr", "must be finite and >= 0"),
        ("training.grad_clip=-1", "training.grad_clip", "must be > 0"),
        ("training.grad_clip=.nan", "training.grad_clip", "must be > 0"),
        ("training.val_size=0", "training.val_size", "at least 1 record"),
        ("training.val_size=-5", "training.val_size", "at least 1 record"),
        ("editor.method=ft", "editor.method", "'ft': training meta-trains learned editors only"),
        ("editor.condition_dim=0", "editor.condition_dim", "0: must be >= 1"),
        ("model.architecture={layers: x}", "model.architecture", "missing keys"),
        ("data.allow_held_out=true", "data.allow_held_out", "only a single-task editor without instructions may train on a held-out task"),
    ],
)
def test_invalid_value_names_the_field(override: str, field: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"config field '{field}': ") + ".*" + re.escape(why)):
        load_config(None, [override])


def test_only_a_single_task_editor_without_instructions_may_train_on_a_held_out_task() -> None:
    assert load_config(None, ["data.tasks=[zsre]", "data.instructions=false", "data.allow_held_out=true"]).data.allow_held_out
    for overrides in (["data.tasks=[zsre]"], ["data.tasks=[zsre, counterfact]", "data.instructions=false"]):
        with pytest.raises(ValueError, match=re.escape("config field 'data.allow_held_out'")):
            load_config(None, [*overrides, "data.allow_held_out=true"])


def test_evaluation_instruction_accepts_an_index() -> None:
    assert load_config(None, ["evaluation.instruction=9"]).evaluation.instruction == "9"


def test_unknown_key_is_named_with_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['training\.learning_rate'\]; valid keys: .*'lr'"):
        load_config(None, ["training.learning_rate=1e-5"])


def test_unknown_section_is_named_with_the_valid_sections() -> None:
    valid = "['data', 'editor', 'evaluation', 'model', 'training']"
    with pytest.raises(ValueError, match=re.escape(f"unknown config key(s) ['optimizer']; valid keys: {valid}")):
        load_config(None, ["optimizer.lr=1e-5"])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("editor:\n  rnak: 8\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*'editor\.rnak'.*valid keys: .*'rank'"):
        load_config(path)


@pytest.mark.parametrize("text", ["lr=1e-5", "training.lr", "a.b.c=1"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        config_from_dict({}, [text])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_config(path)


def test_invalid_yaml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("training:\n  lr: [1e-5\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- training\n- model\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " must hold a mapping"):
        load_config(path)


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "flat.yaml"
    path.write_text("training: 5\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*section 'training' must be a mapping"):
        load_config(path)


def test_there_are_shipped_configs() -> None:
    assert CONFIG_DIR.is_dir() and SHIPPED, f"no YAML configs under {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED])
def test_shipped_config_validates(path: Path) -> None:
    raw = yaml.load(path.read_text(), Loader=YAMLLoader)
    if isinstance(raw, dict) and "method" in raw:
        assert set(raw) <= {"method", "options"}, f"{path}: unknown keys {sorted(set(raw) - {'method', 'options'})}"
        assert raw["method"] in EDITORS, f"{path}: unknown method {raw['method']!r}"
        assert raw["method"] in METHOD_OPTIONS, f"{path}: add the options class of {raw['method']!r} to this test"
        METHOD_OPTIONS[raw["method"]].from_options(raw.get("options") or {})
    elif path.parent.name == "analysis":  # configs/analysis/*.yaml: studies (instructedit analyze scaling/balance)
        loader = load_balance_config if path.stem.startswith("balance") else load_scaling_config
        study, base = loader(path)
        assert isinstance(load_config(base), Config), base
    elif path.parent.name == "experiments":  # configs/experiments/*.yaml: whole experiments (instructedit experiment)
        if path.stem.startswith("table1"):  # experiment transfer: single-task editors, each scored on every task
            experiment = TransferConfig.from_yaml(path)
            trained = [load_config(CONFIG_DIR.parent / run.config, run.overrides).data.tasks for run in experiment.editors]
            assert sorted(t for tasks in trained for t in tasks) == sorted(experiment.tasks) and all(len(t) == 1 for t in trained)
        else:
            experiment = ExperimentConfig.from_yaml(path)
            assert experiment.rows and experiment.tasks
        for run in experiment.editors:
            assert isinstance(load_config(CONFIG_DIR.parent / run.config, run.overrides), Config), run.name
    else:
        assert isinstance(load_config(path), Config)
