"""Models: conversion Wan -> AnyFlow, save/load, clear errors on bad folders."""

import json

import pytest
import torch

from pipeline.flowmap import models
from pipeline.flowmap.models import StudentFn, VelocityFn


@pytest.fixture(scope="module")
def teacher():
    return models.build_teacher("tiny", seed=0).eval()


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, 4, 8, 8, generator=g)
    cond = torch.randn(b, 5, 16, generator=g)
    return z, cond


def test_converted_student_at_r_equals_t_matches_wan_teacher(teacher):
    student = models.student_from_teacher(teacher).eval()
    z, cond = _inputs()
    t = torch.tensor([0.9, 0.25])
    with torch.no_grad():
        v = VelocityFn(teacher)(z, t, t, cond)
        u = StudentFn(student)(z, t, t, cond)
    assert v.abs().mean() > 0.1  # a real output, not zeros
    assert (u - v).abs().max() < 1e-5
    # and r != t does change the output: the delta embedder is live
    with torch.no_grad():
        u_r = StudentFn(student)(z, t, torch.zeros(2), cond)
    assert (u_r - v).abs().max() > 1e-4


def test_save_load_and_convert_folder_roundtrip(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "wan")
    assert models.model_class_of(tmp_path / "wan") == "WanTransformer3DModel"
    out = models.convert_wan_folder(tmp_path / "wan", tmp_path / "student")
    assert models.model_class_of(out) == "AnyFlowTransformer3DModel"
    student = models.load_student(out)
    direct = models.student_from_teacher(teacher)
    for (k1, a), (k2, b) in zip(student.state_dict().items(), direct.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    # a Wan folder also loads as a student (converted on the fly)
    assert isinstance(models.load_student(tmp_path / "wan"), type(direct))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_student(tmp_path / "nope")


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.load_student(tmp_path / "empty")


def test_folder_of_another_model_is_a_clear_error(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not a Wan, AnyFlow or AnyFlow-FAR transformer"):
        models.load_student(folder)


def test_corrupt_weights_are_a_clear_error(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "wan")
    weights = next((tmp_path / "wan").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not load"):
        models.load_transformer(tmp_path / "wan")


def test_mismatched_latent_and_prompt_batch_is_a_clear_error(teacher):
    z, cond = _inputs(b=2)
    t = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="prompt embeddings must be"):
        VelocityFn(teacher)(z, t, t, cond[:1])


def test_unknown_size_preset():
    with pytest.raises(ValueError, match="unknown model size"):
        models.arch_config("huge")


@pytest.mark.parametrize("size,low,high", [("wan2.1-1.3b", 1.3e9, 1.5e9), ("wan2.1-14b", 14.0e9, 14.5e9)])
def test_wan_size_presets_have_the_published_parameter_counts(size, low, high):
    # Wan2.1 "1.3B" has 1.42B transformer parameters, "14B" has 14.29B.
    # Counted from shapes on the meta device: no memory is allocated.
    with torch.device("meta"):
        teacher = models.build_teacher(size)
    assert low <= models.num_params(teacher) <= high
