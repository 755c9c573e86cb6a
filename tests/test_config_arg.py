"""Configs as a package and the config argument "[preset][,key=value,...]" (configs/base.py):
no config file edits sys.path, the installed project ships `configs`, a config file loads
from another working directory, settings are typed, applied last and refused by name."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import setuptools

from configs import base
from jaxsd.train.validate import validate_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")
METHOD_FILES = [p.stem for p in CONFIG_FILES if p.stem != "base"]


def method(name: str):
    return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_no_config_file_touches_sys_path(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    assert "sys" not in imported, f"{path.name} imports sys"
    assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


def test_the_installed_project_ships_the_configs_package():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = setuptools.find_packages(where=str(REPO), include=find["find"]["include"])
    assert {"configs", "jaxsd", "jaxsd.train"} <= set(packages)


def test_train_py_loads_a_preset_with_settings_from_another_working_directory(tmp_path):
    """The README's relative `--config=configs/...` from a folder without configs/, as an
    installed project (`configs` and `jaxsd` importable, here through PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"),
         "--config=configs/sc_sdpo.py:qwen3_8b,steps=50,model.remat=false", "--print_config"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = set(proc.stdout.splitlines())
    assert {'preset = "qwen3_8b"', "total_steps = 50", "model.remat = false",
            "optim.lr = 1e-05", 'algorithm.name = "sc_sdpo"'} <= lines  # fmt: skip


def test_a_relative_config_path_prefers_the_working_directory(tmp_path, monkeypatch):
    import configs

    monkeypatch.chdir(tmp_path)
    ours = f"{REPO / 'configs' / 'sdpo.py'}:smoke,steps=4"
    assert configs.resolve_path("configs/sdpo.py:smoke,steps=4") == ours
    assert configs.resolve_path("configs/no_such.py") == "configs/no_such.py"
    assert configs.resolve_path("other/sdpo.py:smoke") == "other/sdpo.py:smoke"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sdpo.py").write_text("")
    assert configs.resolve_path("configs/sdpo.py:smoke") == "configs/sdpo.py:smoke"
    argv = ["train.py", "--config=configs/grpo.py", "--config.seed=1"]
    assert configs.resolve_argv(argv)[1] == f"--config={REPO / 'configs' / 'grpo.py'}"


@pytest.mark.parametrize(
    "arg, preset, settings",
    [
        (None, "default", {}),
        ("", "default", {}),
        ("smoke", "smoke", {}),
        ("qwen3_8b,steps=50", "qwen3_8b", {"total_steps": "50"}),
        ("seed=3, optim.lr = 3e-5", "default", {"seed": "3", "optim.lr": "3e-5"}),
        ("gpu_0p6b,task.eval_sets=aime:2024", "gpu_0p6b", {"task.eval_sets": "aime:2024"}),
    ],
)
def test_parse_arg_splits_preset_and_settings(arg, preset, settings):
    assert base.parse_arg(arg) == (preset, settings)


@pytest.mark.parametrize(
    "arg, names",
    [
        ("qwen3_9b", ["'qwen3_9b'", "'qwen3_8b'", "'smoke'", "'gpu_0p6b'"]),
        ("qwen3_9b,steps=5", ["'qwen3_9b'", "'qwen3_8b'"]),
        ("smoke,steps", ["'steps' is not key=value", "'smoke'"]),
        ("steps=5,smoke", ["'smoke' is not key=value"]),
        ("smoke,=5", ["'=5' is not key=value"]),
        ("smoke,preset=qwen3_8b", ["name the preset first"]),
        ("smoke,seed=1,seed=2", ["sets seed twice"]),
    ],
)
def test_a_bad_argument_fails_naming_it_and_the_choices(arg, names):
    with pytest.raises(ValueError) as err:
        base.parse_arg(arg)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "arg, names",
    [
        ("smoke,optim.lrr=1", ["optim.lrr does not exist", "did you mean optim.lr?", "b1, b2"]),
        ("smoke,stepz=5", ["stepz does not exist", "total_steps", "'steps'"]),
        ("smoke,seed.x=1", ["seed.x", "seed is a value"]),
        ("smoke,steps=5.5", ["total_steps=5.5", "an int"]),
        ("smoke,optim.lr=fast", ["optim.lr=fast", "a float"]),
        ("smoke,model.remat=yes", ["model.remat=yes", "true or false"]),
        ("smoke,model=1", ["model=1", "--config.model="]),
    ],
)
def test_an_unknown_key_or_a_badly_typed_value_fails_naming_it(arg, names):
    with pytest.raises(ValueError) as err:
        method("sc_sdpo").get_config(arg)
    for name in names:
        assert name in str(err.value)


def test_settings_take_the_type_of_the_keys_default():
    c = method("sc_sdpo").get_config(
        "smoke,steps=50,optim.lr=3e-5,loss.alpha=1,model.remat=True,loss.rollout_is=false,"
        "task.name=gsm8k,resume_step=4,model.enable_thinking=false"
    )
    assert (c.total_steps, c.optim.lr, c.loss.alpha) == (50, 3e-5, 1.0)
    assert (type(c.total_steps), type(c.optim.lr), type(c.loss.alpha)) == (int, float, float)
    assert c.model.remat is True and c.loss.rollout_is is False
    assert c.task.name == "gsm8k"
    assert c.resume_step == 4 and type(c.resume_step) is int  # an int placeholder
    assert c.model.enable_thinking is False  # a bool placeholder


@pytest.mark.parametrize("name", METHOD_FILES)
def test_steps_changes_total_steps_and_nothing_else_in_every_config(name):
    plain, changed = method(name).get_config("smoke"), method(name).get_config("smoke,steps=50")
    assert plain.total_steps != 50 and changed.total_steps == 50
    changed.total_steps = plain.total_steps
    assert changed.to_dict() == plain.to_dict()


def test_settings_apply_after_the_method_files_own_preset_changes():
    """grpo.py's qwen3_8b sets an 8192-token budget and drift.py's smoke a 1-step warm-up after
    the base config; a setting of the same key still wins."""
    grpo = method("grpo").get_config("qwen3_8b,rollout.max_new_tokens=100")
    assert method("grpo").get_config("qwen3_8b").rollout.max_new_tokens == 8192
    assert grpo.rollout.max_new_tokens == 100
    assert method("drift").get_config("smoke,algorithm.warmup_steps=2").algorithm.warmup_steps == 2
    test_time = method("test_time_sdpo").get_config("smoke,steps=9,run_dir=runs/tt")
    assert (test_time.total_steps, test_time.run_dir) == (9, "runs/tt")


def test_a_preset_with_settings_validates_and_keeps_the_presets_values():
    c = method("sc_sdpo").get_config("qwen3_8b,steps=50,seed=2")
    validate_config(c, vocab_size=151936, num_devices=8)
    paper = method("sc_sdpo").get_config("qwen3_8b")
    assert (c.total_steps, c.seed, paper.total_steps, paper.seed) == (50, 2, 200, 0)
    c.total_steps, c.seed = paper.total_steps, paper.seed
    assert c.to_dict() == paper.to_dict()
