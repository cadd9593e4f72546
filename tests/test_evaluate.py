"""Evaluation: the Frechet distance against closed forms, the fixed video features, motion_error, the data
row, eval.json / eval.png, the text table and the sample GIFs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline import evaluate
from pipeline.data import toy
from pipeline.data.toy import ToyWorldConfig

CFG = ToyWorldConfig(**toy.TOY16)
"""the toy16 world (8 frames of 16x16, all five motions): the pixel offsets below are written for it"""
STEPS = [1, 2, 4, 8, 16, 32]


def analytic_fd(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance of N(mu_a, cov_a) and N(mu_b, cov_b), in the symmetric form
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``."""
    root_a = scipy.linalg.sqrtm(cov_a).real
    cross = scipy.linalg.sqrtm(root_a @ cov_b @ root_a).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * cross))


def two_gaussians(dim: int = 3):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, dim, dim))
    cov_a, cov_b = a @ a.T / dim + 0.5 * np.eye(dim), b @ b.T / dim + 0.2 * np.eye(dim)
    return np.array([0.0, 1.0, -1.0]), cov_a, np.array([1.0, 0.5, 0.0]), cov_b


def with_exact_moments(rng, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly mu and sample covariance (ddof 1) exactly cov."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mu


def toy_clip(prompt: str, sample_id: int = 3) -> torch.Tensor:
    return toy.render_video(CFG, sample_id, prompt)[0]


def made_up_result() -> dict:
    s = np.array(STEPS, dtype=float)
    return evaluate.eval_json(STEPS, {
        "teacher": {"ode_error": list(0.9 / s), "fd": list(40 / s + 0.6), "motion_error": list(0.8 / s)},
        "student": {"ode_error": list(0.05 / s**0.5), "fd": list(1.5 / s**0.5 + 0.5), "motion_error": [0.1] * 6},
        "student_stage1": {"ode_error": list(0.12 / s**0.4), "fd": list(4 / s**0.5 + 0.7),
                           "motion_error": [0.3] * 6},
        "consistency": {"ode_error": list(0.06 * (1 + 0.3 * np.log2(s))), "fd": [1.6, 2.2, 2.8, 3.4, None, 4.6],
                        "motion_error": [0.2] * 6},
        "data": evaluate.data_row(6, 0.4, 0.0),
    })


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_matches_closed_form_for_samples_with_exact_moments():
    mu_a, cov_a, mu_b, cov_b = two_gaussians()
    rng = np.random.default_rng(1)
    a, b = with_exact_moments(rng, 50, mu_a, cov_a), with_exact_moments(rng, 80, mu_b, cov_b)
    assert evaluate.frechet_distance(a, b) == pytest.approx(analytic_fd(mu_a, cov_a, mu_b, cov_b), rel=1e-9)


def test_frechet_distance_of_gaussian_samples_matches_closed_form():
    """Large samples: the error is within 5 standard deviations of the delta-method estimate.

    First order, FD_hat - FD = 2 d.(e_a - e_b) + tr(C_a dS_a) + tr(C_b dS_b) with d = mu_a - mu_b,
    e the sample-mean errors, dS the sample-covariance errors and C_a = sym(I - S_b (S_a S_b)^-1/2)
    the gradient of the covariance term; for Gaussian data Var tr(C dS) = 2 tr(C S C S) / N.
    The bias, tr(S_a + S_b) / N from the mean term, is added to the tolerance.
    """
    mu_a, cov_a, mu_b, cov_b = two_gaussians()
    n = 20000
    rng = np.random.default_rng(2)
    a, b = rng.multivariate_normal(mu_a, cov_a, n), rng.multivariate_normal(mu_b, cov_b, n)

    def grad(s1, s2):
        g = np.eye(3) - s2 @ np.linalg.inv(scipy.linalg.sqrtm(s1 @ s2).real)
        return (g + g.T) / 2

    d, c_a, c_b = mu_a - mu_b, grad(cov_a, cov_b), grad(cov_b, cov_a)
    sd = np.sqrt((4 * d @ (cov_a + cov_b) @ d + 2 * np.trace(c_a @ cov_a @ c_a @ cov_a)
                  + 2 * np.trace(c_b @ cov_b @ c_b @ cov_b)) / n)
    expected = analytic_fd(mu_a, cov_a, mu_b, cov_b)
    assert abs(evaluate.frechet_distance(a, b) - expected) < 5 * sd + np.trace(cov_a + cov_b) / n
    assert 5 * sd < 0.05 * expected  # the check is tight, not vacuous


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(256, 31)), rng.normal(size=(256, 31)) * 1.5 + 0.2
    assert evaluate.frechet_distance(a, a) < 1e-8
    assert evaluate.frechet_distance(a, b) == pytest.approx(evaluate.frechet_distance(b, a), rel=1e-9)
    assert evaluate.frechet_distance(torch.from_numpy(a), b) == evaluate.frechet_distance(a, b)


def test_shifting_the_mean_by_delta_adds_its_squared_norm():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    delta = np.array([0.3, -1.0, 2.0, 0.0, 0.5])
    assert evaluate.frechet_distance(a, a + delta) == pytest.approx(delta @ delta, rel=1e-7)
    gap = a.mean(0) - b.mean(0)
    shifted = evaluate.frechet_distance(a, b + delta) - evaluate.frechet_distance(a, b)
    assert shifted == pytest.approx(delta @ delta - 2 * delta @ gap, rel=1e-7)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(10, 20))  # fewer samples than dimensions: rank-deficient covariances
    b = np.concatenate([rng.normal(size=(64, 3)), np.ones((64, 2))], 1)  # constant columns
    c = np.concatenate([rng.normal(size=(64, 3)), np.zeros((64, 2))], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd_ab = evaluate.frechet_distance(a, rng.normal(size=(12, 20)))
        fd_bc = evaluate.frechet_distance(b, c)
    assert np.isfinite(fd_ab) and fd_ab > 0
    assert fd_bc == pytest.approx(2.0 + analytic_fd(np.zeros(3), np.cov(b[:, :3], rowvar=False),
                                                    np.zeros(3), np.cov(c[:, :3], rowvar=False))
                                  + np.sum((b[:, :3].mean(0) - c[:, :3].mean(0)) ** 2), abs=1e-4)


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((10, 3)), np.zeros((10, 4)), "differ in width"),
    (np.zeros((1, 3)), np.zeros((10, 3)), "N >= 2"),
    (np.full((10, 3), np.nan), np.zeros((10, 3)), "non-finite"),
])
def test_frechet_distance_rejects_bad_feature_sets(a, b, message):
    with pytest.raises(ValueError, match=message):
        evaluate.frechet_distance(a, b)


def test_ode_error_is_the_mean_over_samples_of_the_per_sample_mse():
    x = torch.randn(5, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    assert evaluate.ode_error(x, x) == 0.0
    assert evaluate.ode_error(x + offsets.view(5, 1, 1, 1, 1), x) == pytest.approx(offsets.square().mean().item())
    with pytest.raises(ValueError, match="one shape"):
        evaluate.ode_error(x, x[:4])


# --------------------------------------------------------------------------- features

COL = {n: i for i, n in enumerate(evaluate.feature_names(4))}


def _angle(feats: torch.Tensor, axis: str) -> torch.Tensor:
    """Where the object sits along an axis, as a fraction of the frame: the angle of (pos_*_cos, pos_*_sin)."""
    return torch.atan2(feats[:, COL[f"pos_{axis}_sin"]], feats[:, COL[f"pos_{axis}_cos"]]) / (2 * np.pi)


def test_video_features_are_fixed_and_have_the_documented_columns():
    x, _ = toy.render_videos(CFG, np.arange(16))
    first = evaluate.video_features(x)
    assert first.shape == (16, 29 + 4) and first.dtype == torch.float64
    assert len(evaluate.feature_names(4)) == 33
    evaluate.video_features(torch.randn(3, 5, 16, 8, 8))  # another channel count in between
    evaluate._projections.clear()  # as a fresh process: the projection is rebuilt from the seed
    evaluate._shift_tables.clear()
    assert torch.equal(evaluate.video_features(x), first)
    for part in (slice(0, 5), slice(5, 9), slice(3, 4), slice(15, 16)):  # a sample's features ignore the batch
        assert torch.equal(evaluate.video_features(x[part]), first[part]), part
    assert torch.equal(evaluate.video_features(x.flip(0)), first.flip(0))


@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 1), (2, 1, 16, 3, 5), (2, 21, 16, 6, 10), (2, 8, 2, 16, 16)])
def test_video_features_work_for_any_shape(shape):
    feats = evaluate.video_features(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    assert feats.shape == (2, 29 + shape[2]) and torch.isfinite(feats).all()
    assert torch.isfinite(evaluate.video_features(torch.zeros(shape))).all()


def test_video_features_follow_a_translation_on_the_torus():
    """A shift of the whole clip (wrapped, as the toy world wraps) moves the position and the pooled
    layout and nothing else, also when it carries the shape across the border."""
    clip = toy_clip("red square standing still")
    shifted = [clip.roll(2, dims=-1), clip.roll(-1, dims=-2), clip.roll(8, dims=-1), clip.roll((5, 7), dims=(-2, -1))]
    feats = evaluate.video_features(torch.stack([clip, *shifted]))
    moved = (_angle(feats[1:], "x") - _angle(feats[:1], "x") + 0.5) % 1 - 0.5
    assert moved.tolist() == pytest.approx([2 / 16, 0, 8 / 16 - 1, 7 / 16], abs=1e-9)  # 8 px: -1/2 = +1/2
    moved = (_angle(feats[1:], "y") - _angle(feats[:1], "y") + 0.5) % 1 - 0.5
    assert moved.tolist() == pytest.approx([0, -1 / 16, 0, 5 / 16], abs=1e-9)
    radius = [feats[:, COL[f"pos_{a}_cos"]].hypot(feats[:, COL[f"pos_{a}_sin"]]) for a in "xy"]
    assert torch.allclose(radius[0], radius[0][:1]) and torch.allclose(radius[1], radius[1][:1])
    unchanged = [COL[n] for n in COL if not n.startswith(("pos", "texture"))]
    assert torch.allclose(feats[1:, unchanged], feats[:1, unchanged].expand(4, -1), atol=1e-9)
    assert not torch.allclose(feats[1, COL["texture_0"]:], feats[0, COL["texture_0"]:])  # the layout moved


def test_video_features_measure_the_motion_of_the_object():
    still = toy_clip("green circle standing still")
    shifts = [0, 1, 1, 2, 2, 3, 3, 4]  # pixels to the right, frame by frame
    moved = torch.stack([frame.roll(s, dims=-1) for frame, s in zip(still, shifts)])
    jumpy = torch.stack([frame.roll(s, dims=-1) for frame, s in zip(still, [0, 3, 0, 3, 0, 3, 0, 3])])
    feats = evaluate.video_features(torch.stack([still, moved, jumpy, moved.roll(8, dims=-1)]))
    t = np.linspace(-0.5, 0.5, 8)
    expected = np.polyfit(t, np.array(shifts) / 16, 1)[0] / evaluate.GEOMETRY_UNIT  # displacement over the clip
    assert abs(feats[0, COL["vel_x"]]) < 1e-9 and abs(feats[0, COL["jitter"]]) < 1e-9
    assert feats[1, COL["vel_x"]] == pytest.approx(expected, abs=1e-9)
    assert feats[3, COL["vel_x"]] == pytest.approx(expected, abs=1e-9)  # across the border: the same motion
    assert abs(feats[1, COL["vel_y"]]) < 1e-9
    assert feats[2, COL["jitter"]] > 5 * feats[1, COL["jitter"]] > 0
    assert feats[1, COL["change"]] > feats[0, COL["change"]] == 0

    toy_moves = evaluate.video_features(torch.stack([toy_clip(f"green circle moving {d}")
                                                     for d in ("left", "right", "up", "down")]))
    assert toy_moves[0, COL["vel_x"]] < -2 < 2 < toy_moves[1, COL["vel_x"]]  # 0.4 of the frame +-20%
    assert toy_moves[2, COL["vel_y"]] < -2 < 2 < toy_moves[3, COL["vel_y"]]  # y grows downwards


def test_fd_of_toy_features_separates_data_from_damaged_data():
    x, _ = toy.render_videos(CFG, np.arange(2048, 2048 + 256))
    y, _ = toy.render_videos(CFG, np.arange(256))
    ref = evaluate.video_features(x)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(y.flatten(0, 1), 3, 1, 1).reshape(y.shape)
    frozen = y[:, :1].expand_as(y)  # the first frame held: no motion
    fd = {name: evaluate.frechet_distance(evaluate.video_features(v), ref)
          for name, v in [("same world", y), ("noisy", 0.8 * y + 0.6 * noise), ("blurred", blurred),
                          ("frozen", frozen), ("faded", 0.7 * y)]}
    assert fd["same world"] < 1.5, fd
    assert min(fd["noisy"], fd["blurred"], fd["frozen"], fd["faded"]) > 2 * fd["same world"], fd


# --------------------------------------------------------------------------- motion


def band_limited_shift(frames: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """``frames`` (..., H, W) moved by (dx, dy) pixels on the torus, exactly for a band-limited image:
    every Fourier bin times exp(-i k.d) (the Nyquist bins, which have no phase to shift, dropped)."""
    H, W = frames.shape[-2:]
    ky = 2 * np.pi * torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    kx = 2 * np.pi * torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    spec = torch.fft.fft2(frames.to(torch.float64))
    spec[..., H // 2, :] = 0
    spec[..., :, W // 2] = 0
    return torch.fft.ifft2(spec * torch.exp(-1j * (kx * dx + ky * dy))).real


def test_frame_shifts_find_sub_pixel_shifts_on_the_torus():
    smooth = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
                                            .repeat(1, 1, 3, 3), 5, 1, 2)[:, :, 16:32, 16:32]  # (C, 1, H, W)
    steps = [(0.37, -1.62), (-2.5, 0.0), (7.2, 3.9), (0.05, 0.95)]  # the third wraps past the border
    frames, d = [smooth[:, 0]], np.zeros(2)
    for dx, dy in steps:
        d += (dx, dy)
        frames.append(band_limited_shift(smooth[:, 0], *d))
    found = evaluate.frame_shifts(torch.stack(frames).numpy())
    assert found.shape == (4, 2)
    assert np.abs(found - np.array(steps)).max() < 0.01, found


def test_clip_displacement_of_toy_clips_matches_the_prompt_and_ignores_the_batch():
    x, prompts = toy.render_videos(CFG, np.arange(2048, 2048 + 64))
    d = evaluate.clip_displacement(x)
    directions = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
    for (dx, dy), motion in zip(d.tolist(), evaluate.prompt_motions(prompts)):
        ux, uy = directions[motion]
        along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux) if motion != "still" else np.hypot(dx, dy)
        if motion == "still":
            assert across < 1e-9
        else:  # the world's travel, 0.4 of the frame +-20 %, to about 0.01
            assert 0.8 * CFG.travel - 0.012 < along < 1.2 * CFG.travel + 0.012 and across < 0.012
    assert torch.equal(evaluate.clip_displacement(x[7:12]), d[7:12])
    feats = evaluate.video_features(x)
    assert torch.equal(feats[:, [COL["vel_x"], COL["vel_y"]]], d / evaluate.GEOMETRY_UNIT)


def heldout_clips(n: int = 256, cfg: ToyWorldConfig = CFG) -> tuple[torch.Tensor, list[str]]:
    return toy.render_videos(cfg, toy.split_ids(cfg, "heldout")[:n])


def _motion_error_is_zero_on_the_data_and_one_when_wrong(x: torch.Tensor, prompts: list[str]):
    """The checks both worlds share; returns which clips move, and those clips with their prompts."""
    moving = torch.tensor([m != "still" for m in evaluate.prompt_motions(prompts)])
    length = evaluate.clip_displacement(x).norm(dim=1)
    # the threshold sits far from the data on both sides: still clips measure 0, moving ones >= 0.8 travel
    assert length[~moving].max() < 1e-9 and length[moving].min() > 3 * evaluate.MOTION_THRESHOLD
    assert evaluate.motion_error(evaluate.video_features(x), prompts) == 0.0
    mv, mv_prompts = x[moving], [p for p, m in zip(prompts, moving) if m]
    turned = mv.transpose(-2, -1)  # x and y swapped: left becomes up, right becomes down
    for name, clips in (("reversed", mv.flip(1)), ("frozen", mv[:, :1].expand_as(mv)), ("turned", turned)):
        assert evaluate.motion_error(evaluate.video_features(clips), mv_prompts) == 1.0, name
    return moving, mv, mv_prompts


def test_motion_error_is_zero_on_the_data_and_one_on_clips_whose_motion_is_wrong():
    x, prompts = heldout_clips()
    moving, mv, mv_prompts = _motion_error_is_zero_on_the_data_and_one_when_wrong(x, prompts)
    still, still_prompts = x[~moving], [p for p, m in zip(prompts, moving) if not m]
    drifting = torch.stack([frame.roll(f // 2, dims=-1) for frame, f in zip(still.unbind(1), range(8))], 1)
    assert evaluate.motion_error(evaluate.video_features(drifting), still_prompts) == 1.0  # 3.5 px over the clip
    half = len(mv) // 2
    mixed = torch.cat([mv[:half], mv[half:].flip(1)])
    assert evaluate.motion_error(evaluate.video_features(mixed), mv_prompts) == pytest.approx(1 - half / len(mv))


def test_motion_error_is_zero_on_the_default_worlds_data_and_one_when_its_motion_is_wrong():
    """The default world (4 frames of 12x12; right, down, still): few frames, a small torus."""
    x, prompts = heldout_clips(cfg=ToyWorldConfig())
    moving, _, _ = _motion_error_is_zero_on_the_data_and_one_when_wrong(x, prompts)
    assert 0.5 < moving.float().mean() < 0.85


def test_motion_error_ignores_the_batch_and_is_none_outside_the_toy_world():
    x, prompts = heldout_clips(40)
    damaged = torch.cat([x[:20], x[20:].flip(1)])
    feats = evaluate.video_features(damaged)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    error = evaluate.motion_error(feats, prompts)
    assert 0 < error < 1
    assert evaluate.motion_error(evaluate.video_features(damaged[order]), [prompts[i] for i in order]) == error
    assert evaluate.motion_error(feats, ["a cat playing piano"] + prompts[1:]) is None
    assert evaluate.prompt_motions(["Red  Square moving LEFT", "blue bar standing still"]) == ["left", "still"]
    with pytest.raises(ValueError, match="one prompt per clip"):
        evaluate.motion_error(feats, prompts[:3])


def test_motion_class_names_the_nearest_direction_or_still():
    d = torch.tensor([[0.0, 0.0], [0.09, 0.03], [-0.3, 0.1], [0.3, 0.1], [0.1, -0.3], [0.05, 0.2]])
    assert evaluate.motion_class(d) == ["still", "still", "left", "right", "up", "down"]


# --------------------------------------------------------------------------- the data row


def test_data_row_and_halves_floor():
    assert evaluate.data_row(3, 1.5, 0.0) == {"ode_error": [None] * 3, "fd": [1.5] * 3, "motion_error": [0.0] * 3}
    x, prompts = heldout_clips()
    feats = evaluate.video_features(x)
    fd, motion = evaluate.halves_floor(feats, prompts)
    assert fd == pytest.approx(evaluate.frechet_distance(feats[0::2], feats[1::2])) and motion == 0.0
    assert evaluate.halves_floor(feats[:3], prompts[:3])[0] is None
    assert evaluate.halves_floor(feats, ["a cat"] * 256)[1] is None


def test_the_data_floor_is_a_fresh_sample_of_the_toy_world_or_the_halves_of_a_dataset():
    from pipeline.config import load_config
    from pipeline.sampling import data_floor

    cfg = load_config(None, ["data.toy.num_train=64", "data.toy.num_heldout=48"])
    world = cfg.data.toy
    x, prompts = toy.render_videos(world, toy.split_ids(world, "heldout"))
    feats = evaluate.video_features(x)
    fresh, fresh_prompts = toy.render_videos(world, 64 + 48 + np.arange(48))  # after train and held-out
    fd, motion = data_floor(cfg, feats, prompts)
    assert fd == evaluate.frechet_distance(evaluate.video_features(fresh), feats) and motion == 0.0
    frozen = fresh[:, :1].expand_as(fresh)
    assert 2 * fd < evaluate.frechet_distance(evaluate.video_features(frozen), feats)  # it measures something
    cfg.data.path = "/a/real/dataset"  # no world to draw from: the held-out halves
    assert data_floor(cfg, feats, prompts) == evaluate.halves_floor(feats, prompts)
    assert data_floor(cfg, feats, ["a cat playing piano"] * 48)[1] is None


# --------------------------------------------------------------------------- eval.json, eval.png, table


def test_eval_json_has_the_design_schema():
    result = evaluate.eval_json(STEPS, {"student": {"ode_error": [np.float32(0.5)] + [0.1] * 5,
                                                    "fd": [1, None, 2.0, 3.0, torch.tensor(4.0), 5.0]}})
    assert result == {"steps": STEPS, "models": {"student": {"ode_error": [0.5] + [0.1] * 5,
                                                             "fd": [1.0, None, 2.0, 3.0, 4.0, 5.0]}}}
    assert json.loads(json.dumps(result)) == result  # plain JSON types only
    assert all(type(v) is float for v in result["models"]["student"]["ode_error"])


@pytest.mark.parametrize("steps, metrics, message", [
    (STEPS, {"student": {"fd": [1.0] * 5}}, "list of 6 values"),
    (STEPS, {"student": {"fd": [1.0] * 5 + [float("nan")]}}, "finite float or None"),
    (STEPS, {"student": {"fd": [1.0] * 5 + [float("inf")]}}, "finite float or None"),
    (STEPS, {"student": {"fd": [1.0] * 5 + ["1"]}}, "finite float or None"),
    (STEPS, {"student": {"fd": [1.0] * 5 + [True]}}, "finite float or None"),
    (STEPS, {"student": {"fid": [1.0] * 6}}, "unknown metric 'fid'"),
    (STEPS, {"": {"fd": [1.0] * 6}}, "non-empty strings"),
    (STEPS, {"student": [1.0] * 6}, "must be a dict"),
    ([], {}, "non-empty list of ints"),
    ([1, 0], {}, "ints >= 1"),
    ([1, 2.5], {}, "ints >= 1"),
    ([4, 2], {}, "strictly increasing"),
])
def test_eval_json_rejects_malformed_results(steps, metrics, message):
    with pytest.raises(ValueError, match=message):
        evaluate.eval_json(steps, metrics)


def test_write_eval_writes_the_json_and_a_png_of_the_expected_size(tmp_path):
    result = made_up_result()
    json_path, png_path = evaluate.write_eval(tmp_path / "run", result)
    assert json_path == tmp_path / "run" / "eval.json" and png_path == tmp_path / "run" / "eval.png"
    assert json.loads(json_path.read_text()) == result == evaluate.read_eval(tmp_path / "run")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = iio.imread(png_path)
    width, height = (round(v * evaluate.PLOT_DPI) for v in evaluate.FIGSIZE)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 10  # something is drawn
    with pytest.raises(ValueError, match="list of 6 values"):
        evaluate.write_eval(tmp_path / "bad", {"steps": STEPS, "models": {"student": {"fd": [1.0]}}})
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_format_table_lists_every_model_metric_and_step():
    result = made_up_result()
    table = evaluate.format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "metric"] + [str(s) for s in STEPS]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [(m, k) for m in ("teacher", "student", "student_stage1", "consistency",
                                                             "data")
                                            for k in ("ode_error", "fd", "motion_error")]
    assert all(len(r) == 2 + len(STEPS) for r in rows)
    assert rows[0][2:4] == ["0.9", "0.45"] and rows[10][6] == "-"  # 4 significant digits; None is "-"
    assert rows[-3][2:] == ["-"] * 6 and rows[-2][2:] == ["0.4"] * 6  # the data row: no ode_error
    assert "0.03536" in table  # 0.05 / sqrt(2)


# --------------------------------------------------------------------------- sample videos


def test_write_videos_writes_readable_gifs_with_every_frame(tmp_path):
    prompts = ["red square moving right", "blue bar standing still"]
    videos = torch.stack([toy_clip(p) for p in prompts])
    paths = evaluate.write_videos(tmp_path / "videos", {"student_steps4": videos, "teacher_steps1": videos[:, :, :1]},
                                  prompts, scale=8)
    assert [p.name for p in paths] == [
        "student_steps4_00_red-square-moving-right.gif", "student_steps4_01_blue-bar-standing-still.gif",
        "teacher_steps1_00_red-square-moving-right.gif", "teacher_steps1_01_blue-bar-standing-still.gif"]
    bar = 4  # progress bar rows: max(2, scale // 2)
    for path in paths:
        frames = iio.imread(path, index=None)
        assert frames.shape[:3] == (8, 16 * 8 + bar, 16 * 8) and path.stat().st_size < 30_000
    red = iio.imread(paths[0], index=None)[..., :3]
    cy = int((_angle(evaluate.video_features(videos[:1]), "y")[0] % 1) * 16 * 8)  # centre row
    assert red[0, cy, :, 0].max() == 255 and red[0, cy, :, 1].max() == 0  # red shape, black background
    assert tuple(red[0, 2, 2]) == (0, 0, 0)
    grey = iio.imread(paths[2], index=None)[..., :3]
    assert tuple(grey[0, 2, 2]) in {(127, 127, 127), (128, 128, 128)}  # C < 3: grey, 0 is mid-grey
    with pytest.raises(ValueError, match="one per prompt"):
        evaluate.write_videos(tmp_path, {"x": videos}, prompts[:1])


def test_evaluate_imports_neither_ray_nor_mlflow():
    code = ("import sys, pipeline.evaluate; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
