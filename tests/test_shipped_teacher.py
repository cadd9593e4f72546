"""The pretrained toy teachers that ship with the package (pipeline/teachers/toy8 for the default run,
pipeline/teachers/toy for the toy16 world of `--config toy16`): each is made for its run's toy world and schema, the run
starts from it, it gets better with sampling steps, and a stale or mismatched teacher is refused with
the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import teachers
from pipeline.config import load_config
from pipeline.data import toy
from pipeline.evaluate import frechet_distance, video_features
from pipeline.flowmap import draws, models
from pipeline.flowmap.models import GuidedFn, VelocityFn
from pipeline.flowmap.simulate import euler_sample
from pipeline.guard import InputError
from pipeline.stages import preflight

SHIPPED = teachers.SHIPPED["toy8"]
RUNS = {"toy8": None, "toy": "toy16"}
"""model.size of each shipped teacher -> the preset of the run it is made for (None: the default run)"""


def test_every_shipped_teacher_has_a_run():
    assert set(RUNS) == set(teachers.SHIPPED) and set(RUNS) == set(teachers.REBUILDS)


@pytest.mark.parametrize("size", sorted(RUNS))
def test_the_shipped_teacher_is_stamped_for_its_runs_world_and_has_its_recipe(size):
    folder = teachers.SHIPPED[size]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", *teachers.RECIPE_FILES, teachers.STAMP):
        assert (folder / name).is_file(), name
    cfg = load_config(RUNS[size], [])
    assert cfg.model.size == size and cfg.model.teacher_path == teachers.AUTO
    stamp = teachers.check_stamp(folder, cfg.data.toy, cfg.model.size)
    assert stamp["toy_world_version"] == toy.TOY_WORLD_VERSION
    assert stamp == teachers.stamp_for(cfg.data.toy, size) and stamp["rebuild"] == teachers.rebuild_command(size)
    recipe = load_config(str(folder / "config.yaml"))  # the config that trained it resolves today
    assert recipe.model.size == size and recipe.model.teacher_path == "" and "teacher" in recipe.run.stages
    assert {k: getattr(recipe.data.toy, k) for k in teachers.WORLD_FIELDS} == stamp["world"]
    shipped_eval = json.loads((folder / "eval.json").read_text())
    assert shipped_eval["models"]["teacher"]["fd"][-1] < shipped_eval["models"]["teacher"]["fd"][0]


def test_the_default_run_starts_from_the_shipped_teacher():
    cfg = load_config(None, [])
    assert cfg.model.teacher_path == teachers.AUTO
    assert teachers.teacher_path(cfg.model.size, cfg.model.teacher_path, cfg.data.path) == SHIPPED
    old = load_config("toy16", [])
    assert teachers.teacher_path(old.model.size, old.model.teacher_path, "") == teachers.SHIPPED["toy"]
    assert teachers.teacher_path("toy", "", "") is None  # training it is one flag away
    assert teachers.teacher_path("tiny", teachers.AUTO, "") is None  # no teacher ships for the tiny model
    assert teachers.teacher_path("toy", teachers.AUTO, "/my/latents") is None  # nor for other data
    assert teachers.teacher_path("toy", "/my/wan", "") == teachers.Path("/my/wan")


@torch.no_grad()
@pytest.mark.parametrize("size", sorted(RUNS))
def test_the_shipped_teacher_gets_better_with_steps(size):
    """fd (the project's feature space) at 32 Euler steps beats 1 step on 128 held-out prompts."""
    cfg = load_config(RUNS[size], [])
    world = cfg.data.toy
    teacher = models.load_transformer(teachers.SHIPPED[size], expect="WanTransformer3DModel").eval()
    ids = np.arange(world.num_train, world.num_train + 128)
    data, prompts = toy.render_videos(world, ids)
    cond = toy.embed_prompts(prompts, world)
    guided = GuidedFn(VelocityFn(teacher), toy.null_embed(world)[None], cfg.eval.teacher_guidance)
    noise = torch.randn(data.shape, generator=draws.generator(0, "eval", 0))
    reference = video_features(toy.render_videos(world, ids + 10_000)[0])
    fd = {n: frechet_distance(video_features(euler_sample(guided, noise, cond, n, cfg.model.shift)), reference)
          for n in (1, 32)}
    floor = frechet_distance(video_features(data), reference)
    assert fd[32] < fd[1], fd
    assert floor < fd[32], (floor, fd)  # the comparison can fail: the data itself is closer still


def _stale_copy(tmp_path, **changes):
    folder = tmp_path / "teacher"
    shutil.copytree(SHIPPED, folder)
    stamp = json.loads((folder / teachers.STAMP).read_text())
    for key, value in changes.items():
        if key in teachers.WORLD_FIELDS:
            stamp["world"][key] = value
        else:
            stamp[key] = value
    (folder / teachers.STAMP).write_text(json.dumps(stamp))
    return folder


@pytest.mark.parametrize("changes, named", [
    ({"toy_world_version": toy.TOY_WORLD_VERSION - 1}, "toy_world_version: made for"),
    ({"travel": 0.25}, "data.toy.travel: made for 0.25"),
    ({"bar_length": 1.4}, "data.toy.bar_length: made for 1.4"),
    ({"schema": {"format": "anyflow-latent-video", "version": 0}}, "schema: made for"),
])
def test_a_stale_teacher_is_refused_naming_the_rebuild_command(tmp_path, changes, named):
    folder = _stale_copy(tmp_path, **changes)
    with pytest.raises(teachers.StaleTeacherError) as info:
        teachers.check_stamp(folder, toy.ToyWorldConfig(), "toy8")
    assert named in str(info.value) and teachers.REBUILD in str(info.value)
    (folder / teachers.STAMP).unlink()
    with pytest.raises(teachers.StaleTeacherError, match="has no teacher.json"):
        teachers.check_stamp(folder, toy.ToyWorldConfig(), "toy8")
    assert teachers.check_stamp(folder, toy.ToyWorldConfig(), "toy8", required=False) is None


def test_a_stamp_from_before_a_world_field_counts_as_its_old_value(tmp_path):
    folder = _stale_copy(tmp_path)
    stamp = json.loads((folder / teachers.STAMP).read_text())
    stamp["world"].pop("bar_length", None)  # stamped before data.toy.bar_length existed: its bars were 1.6
    (folder / teachers.STAMP).write_text(json.dumps(stamp))
    teachers.check_stamp(folder, toy.ToyWorldConfig(bar_length=1.6), "toy8")
    with pytest.raises(teachers.StaleTeacherError, match="data.toy.bar_length: made for 1.6"):
        teachers.check_stamp(folder, toy.ToyWorldConfig(), "toy8")


def test_a_run_whose_world_differs_from_the_shipped_teachers_stops_before_any_work(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.track=false", "data.toy.travel=0.3",
                             "data.toy.num_train=32", "data.toy.num_heldout=8"])
    with pytest.raises(InputError) as info:
        preflight(cfg)
    message = str(info.value)
    assert "shipped toy teacher" in message and "data.toy.travel: made for" in message
    assert teachers.REBUILD in message and "model.teacher_path=''" in message
    assert not cfg.run_dir.exists()
    other_sample = dataclasses.replace(toy.ToyWorldConfig(), num_train=32, num_heldout=8, seed=3, shard_rows=8)
    teachers.check_stamp(SHIPPED, other_sample, "toy8")  # split sizes and seed are not part of the world


@pytest.mark.parametrize("preset", ["toy16", "toy16-teacher"])
def test_the_toy16_presets_write_out_the_toy16_world(preset):
    """toy.TOY16 and the two presets' data.toy blocks are three copies of one world: they must not drift apart."""
    cfg = load_config(preset, [])
    assert cfg.data.toy == toy.ToyWorldConfig(**toy.TOY16) and cfg.model.size == "toy"
