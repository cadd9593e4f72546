"""Config: presets, dotted overrides, typed checks, one-line errors with exit status 2."""

import subprocess
import sys

import pytest
import yaml

from pipeline.config import Config, ConfigError, field_help, load_config, save_config


def test_defaults_validate_and_nested_defaults_survive_partial_overrides():
    cfg = load_config(None, ["teacher.optim.lr=0.01", "stage2.num_steps_choices=[2, 3]"])
    assert cfg.teacher.optim.lr == 0.01
    assert cfg.teacher.optim.ema == Config().teacher.optim.ema  # the teacher's own default, not OptimConfig's
    assert cfg.stage2.num_steps_choices == [2, 3]
    assert cfg.consistency.num_steps_choices == Config().consistency.num_steps_choices


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "a", "seed": 3}, "stage1": {"steps": 5}}))
    cfg = load_config(str(path), ["run.seed=4"])
    assert (cfg.run.name, cfg.run.seed, cfg.stage1.steps) == ("a", 4, 5)


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads 3e-5 (no dot) as a string; a float field takes it as the number it spells
    path = tmp_path / "c.yaml"
    path.write_text("stage2:\n  optim:\n    lr: 3e-5\n")
    assert load_config(str(path)).stage2.optim.lr == 3e-5
    assert load_config(None, ["stage1.optim.lr=2E-4"]).stage1.optim.lr == 2e-4


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["data.toy.frames=4", "eval.steps=[1, 3]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("override,match", [
    ("nope.key=1", "nope: unknown key"),
    ("stage1.nope=1", "stage1.nope: unknown key"),
    ("teacher.steps=abc", "teacher.steps: expected an integer"),
    ("teacher.steps=1.5", "teacher.steps: expected an integer"),
    ("teacher.steps=-1", "teacher.steps: must be >= 0"),
    ("eval.steps=[1, 0, 4]", "eval.steps"),
    ("stage2.num_steps_choices=[]", "stage2.num_steps_choices"),
    ("model.size=huge", "model.size"),
    ("run.stages=[teacher, bake]", "unknown stage"),
    ("stage2.grad_calls=[shortcut_in]", "stage2.grad_calls"),
    ("data.toy.frames=0", "data.toy"),
    ("stage1.optim.lr=0", "stage1.optim.lr"),
    ("stage1.optim.lr=fast", "stage1.optim.lr: expected a number"),
    ("stage1.optim.lr=nan", "stage1.optim.lr: expected a number"),
    ("noequals", "overrides look like"),
])
def test_bad_keys_and_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_every_field_has_a_docstring():
    missing = [k for k, doc, _ in field_help() if not doc]
    assert not missing, missing


@pytest.mark.parametrize("args", [["bogus.key=1"], ["teacher.steps=-5"], ["--config", "/no/such/file.yaml"]])
def test_entry_point_bad_input_is_one_line_and_exit_2(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args, f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not any(tmp_path.iterdir())  # no work started
