"""Quality against sampling steps: metrics, ``eval.json``, ``eval.png``, sample GIFs.

Three metrics, lower is better for all (DESIGN.md, "Contracts the checks rely on"; the
user's guide is docs/evaluation.md):

* ``ode_error`` (:func:`ode_error`): mean squared distance of a model's samples to
  the teacher's high-accuracy ODE solution from the same noise.
* ``fd`` (:func:`frechet_distance` of :func:`video_features`): Frechet distance
  between a model's samples and the held-out data in a fixed, documented feature
  space (no learned network: cheap, and the same for every caller).
* ``motion_error`` (:func:`motion_error`): the fraction of samples whose motion over
  the clip (wrap-aware, :func:`clip_displacement`) is not the one their toy-world
  prompt asks for; None for prompts outside the toy world.

Beside the models, eval.json has a ``data`` row (:func:`data_row`): a second sample of
the data scored like a model, the floor that every model's figures are read against.

Results travel as the ``eval.json`` dict, ``{"steps": [...], "models": {NAME:
{METRIC: [one value per step]}}}``, built and validated by :func:`eval_json`,
written with the figure by :func:`write_eval`, printed by :func:`format_table`.

Pure torch / numpy / scipy / matplotlib / imageio: no Ray, no MLflow.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.fft
import scipy.linalg
import torch

from pipeline.data import toy

METRICS = ("ode_error", "fd", "motion_error")
"""The metric names of eval.json, in plotting order."""

DATA = "data"
"""Name of the data row of eval.json: a second sample of the data, scored like a model (the floor)."""
MODELS = ("teacher", "student", "student_stage1", "consistency", DATA)
"""Known model names (plot order and styles); other names are accepted and drawn after them."""

# --------------------------------------------------------------------------- motion on the torus

MOTION_THRESHOLD = 0.1
"""Displacement over the clip, as a fraction of the frame, up to which a clip counts as standing still
(:func:`motion_class`). The toy world's still clips measure 0 and its moving ones 0.32 to 0.48 at the
default travel (docs/evaluation.md), so 0.1 (1.6 px of a 16 px frame) sits far from both."""
UPSAMPLE = 8
"""Sub-pixel search of :func:`frame_shifts`: the band-limited correlation is evaluated on a grid of
1 / UPSAMPLE pixel within 1 px of its integer peak, and a parabola through the best point and its
neighbours places the peak between grid points."""

_MOTION_DIRECTIONS = {  # (dx, dy) of a prompt's motion; y grows downwards, as in the frames
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


_shift_tables: dict[tuple[int, int], tuple] = {}


def _tables(H: int, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed tables of :func:`frame_shifts` for H x W frames: the frequency band (no DC, whose channel
    means carry no shift, and no Nyquist row or column, whose real bin has no phase to shift), and for
    x and for y the phasors ``exp(i k n)`` of every whole-pixel offset n in [-size / 2, size / 2) and
    ``exp(i k j / UPSAMPLE)`` of the sub-pixel ones, j = -UPSAMPLE .. UPSAMPLE (k the bin's angular
    frequency)."""
    if (H, W) not in _shift_tables:
        band = np.ones((H, W))
        band[0, 0] = 0.0
        if H % 2 == 0:
            band[H // 2] = 0.0
        if W % 2 == 0:
            band[:, W // 2] = 0.0
        sub = np.arange(-UPSAMPLE, UPSAMPLE + 1) / UPSAMPLE

        def phasors(n: int) -> tuple[np.ndarray, np.ndarray]:
            k = 2 * np.pi * np.fft.fftfreq(n)
            return np.exp(1j * _signed(np.arange(n), n)[:, None] * k), np.exp(1j * sub[:, None] * k)

        _shift_tables[H, W] = (band, *phasors(W), *phasors(H))
    return _shift_tables[H, W]


def _signed(index: np.ndarray, size: int) -> np.ndarray:
    """Circular offsets 0 .. size - 1 as signed ones in [-size / 2, size / 2)."""
    return np.where(index >= size / 2, index - size, index).astype(np.float64)


def _vertex(left: np.ndarray, mid: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Offset in [-1/2, 1/2] grid steps of the vertex of the parabola through three equally spaced
    points around a maximum (0 where they are flat)."""
    curve = left - 2 * mid + right
    return np.where(curve < 0, 0.5 * (left - right) / np.where(curve < 0, curve, -1.0), 0.0).clip(-0.5, 0.5)


def _grid_peak(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each ``(G, G)`` grid of ``r`` ``(P, G, G)`` (indexed [y, x]) peaks, in grid steps from its
    centre, (x, y): its best point moved to the vertex of the parabola through it and its two
    neighbours along each axis (not at the grid's edge, where one is missing)."""
    P, G, _ = r.shape
    best = r.reshape(P, G * G).argmax(1)
    jy, jx = best // G, best % G
    pair = np.arange(P)
    inner_x, inner_y = (jx > 0) & (jx < G - 1), (jy > 0) & (jy < G - 1)
    left, right = r[pair, jy, np.maximum(jx - 1, 0)], r[pair, jy, np.minimum(jx + 1, G - 1)]
    up, down = r[pair, np.maximum(jy - 1, 0), jx], r[pair, np.minimum(jy + 1, G - 1), jx]
    mid = r[pair, jy, jx]
    fx = jx + np.where(inner_x, _vertex(left, mid, right), 0.0)
    fy = jy + np.where(inner_y, _vertex(up, mid, down), 0.0)
    return fx - (G - 1) / 2, fy - (G - 1) / 2


def frame_shifts(video: np.ndarray) -> np.ndarray:
    """Wrap-aware shift of each frame against the one before it: float64 ``(F - 1, 2)`` pixels (dx, dy).

    The peak of the circular cross-correlation of consecutive frames, summed over channels (an inner
    product over channels, so channels of either sign and any mean count alike), band-limited (no DC
    or Nyquist bins, see :func:`_tables`): the integer peak of its inverse FFT, then the best point of
    the band-limited correlation on a grid of 1 / UPSAMPLE pixel within 1 px of it, then the vertex of
    a parabola through that point and its grid neighbours. The plain correlation, not phase
    correlation: whitening gives the weak high bins as much say as the shape's own, which on the toy
    world made the estimate 4 to 6 times less accurate (docs/evaluation.md). One float64 video
    ``(F, C, H, W)``; numpy and scipy, as a few dozen small operations cost less there than in torch.
    """
    F, C, H, W = video.shape
    if F < 2:
        return np.zeros((0, 2))
    band, whole_x, sub_x, whole_y, sub_y = _tables(H, W)
    spec = scipy.fft.fft2(video)
    cross = (spec[1:] * spec[:-1].conj()).sum(1) * band  # (P, H, W) with P = F - 1 pairs
    peak = scipy.fft.ifft2(cross).real.reshape(F - 1, H * W).argmax(1)
    px, py = peak % W, peak // W
    # the correlation r(d) = Re sum_k cross_k exp(i k.d) at d = (px, py) + (jx, jy) / UPSAMPLE
    ex = whole_x[px][:, None, :] * sub_x  # (P, G, W) with G = 2 UPSAMPLE + 1
    ey = whole_y[py][:, None, :] * sub_y  # (P, G, H)
    along_x = (cross[:, :, None, :] * ex[:, None, :, :]).sum(-1)  # (P, H, G)
    r = (ey[:, :, :, None] * along_x[:, None, :, :]).sum(2).real  # (P, G, G): [pair, jy, jx]
    fx, fy = _grid_peak(r)
    return np.stack([_signed(px, W) + fx / UPSAMPLE, _signed(py, H) + fy / UPSAMPLE], 1)


def _track(video: np.ndarray) -> np.ndarray:
    """The unwrapped path of one video's content: ``(F, 2)`` (x, y) in fractions of the frame, frame 0 at 0."""
    F, _, H, W = video.shape
    steps = frame_shifts(video) / np.array([W, H])
    return np.concatenate([np.zeros((1, 2)), steps.cumsum(0)])


def _line_fit(track: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares line through a ``(F, 2)`` track against clip time t in [-1/2, 1/2]: its slope (the
    displacement over the clip, ``(2,)``) and the RMS distance of the track from it."""
    F = track.shape[0]
    if F == 1:
        return np.zeros(2), 0.0
    t = np.linspace(-0.5, 0.5, F)[:, None]
    centred = track - track.mean(0)
    slope = (centred * t).sum(0) / np.square(t).sum()
    return slope, float(np.sqrt(np.square(centred - slope * t).sum(1).mean()))


def _per_sample(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` of every video of ``x`` alone (float64 numpy ``(F, C, H, W)`` in, 1-D array out), stacked
    as a float64 tensor. One video at a time, so a video's result depends on that video only, bit for
    bit (a batched reduction or matmul may round differently with the batch size)."""
    if x.ndim != 5 or min(x.shape) < 1:
        raise ValueError(f"expected non-empty videos (N, F, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("got non-finite values in the videos")
    return torch.from_numpy(np.stack([fn(v) for v in x.numpy()]))


@torch.no_grad()
def clip_displacement(x: torch.Tensor) -> torch.Tensor:
    """How far each clip's content moves over the clip: float64 ``(N, 2)``, (x, y) in fractions of the
    frame (x to the right, y down): the slope of the least-squares line through the unwrapped track of
    :func:`frame_shifts` against clip time in [-1/2, 1/2]; for a constant speed, the last frame's
    position minus the first's. Wrap-aware: a shape that leaves one border and comes back at the other
    moves on. Videos ``(N, F, C, H, W)``."""
    return _per_sample(lambda v: _line_fit(_track(v))[0], x)


def motion_class(displacement: torch.Tensor) -> list[str]:
    """The motion each ``(N, 2)`` displacement shows: ``"still"`` when its length is at most
    MOTION_THRESHOLD, else the direction (left, right, up, down) nearest to it."""
    names = list(_MOTION_DIRECTIONS)
    directions = torch.tensor([_MOTION_DIRECTIONS[n] for n in names], dtype=torch.float64)
    nearest = (displacement.to(torch.float64) @ directions.T).argmax(1).tolist()
    length = displacement.to(torch.float64).norm(dim=1).tolist()
    return ["still" if n <= MOTION_THRESHOLD else names[k] for k, n in zip(nearest, length)]


def prompt_motions(prompts: list[str]) -> list[str] | None:
    """The motion each toy-world prompt asks for (``"left"`` ... ``"still"``); None unless every prompt
    is a toy-world prompt (other datasets have no motion vocabulary to check)."""
    try:
        return [toy.MOTIONS[toy.parse_prompt(p)[2]] for p in prompts]
    except ValueError:
        return None


def motion_error(feats: torch.Tensor, prompts: list[str]) -> float | None:
    """Fraction of clips whose :func:`motion_class` is not the motion their prompt asks for; None when
    the prompts are not all toy-world prompts. ``feats``: the clips' :func:`video_features` (its
    ``vel_x, vel_y`` columns are :func:`clip_displacement` in tenths), ``prompts`` one per clip."""
    if len(prompts) != len(feats):
        raise ValueError(f"motion_error needs one prompt per clip, got {len(prompts)} for {len(feats)}")
    wanted = prompt_motions(prompts)
    if not wanted:
        return None
    names = feature_names(feats.shape[1] - len(feature_names(0)))
    velocity = feats[:, [names.index("vel_x"), names.index("vel_y")]] * GEOMETRY_UNIT
    seen = motion_class(velocity)
    return sum(a != b for a, b in zip(seen, wanted)) / len(wanted)


# --------------------------------------------------------------------------- the fixed feature space

FEATURE_SEED = 0
"""Seed of the fixed random projection in :func:`video_features`."""
TEXTURE_GRID = 4
"""Frames are average-pooled to TEXTURE_GRID x TEXTURE_GRID cells for the texture features."""
TEXTURE_DIMS = 16
"""Dimensions of the random projection of the pooled frames."""
GEOMETRY_UNIT = 0.1
"""Positions, motions and sizes are measured in units of GEOMETRY_UNIT of the frame (tenths)."""
JITTER_UNIT = 0.01
"""The jitter of the motion track is measured in units of JITTER_UNIT of the frame (hundredths)."""
RATIO_SCALE = 10.0
"""Factor on the dimensionless ratios sharpness, change and flicker."""
_EPS = 1e-12

_projections: dict[int, np.ndarray] = {}


def _projection(rows: int) -> np.ndarray:
    """The fixed (rows, TEXTURE_DIMS) projection: N(0, 1 / rows) entries from FEATURE_SEED."""
    if rows not in _projections:
        gen = torch.Generator().manual_seed(FEATURE_SEED)
        _projections[rows] = (torch.randn(rows, TEXTURE_DIMS, generator=gen, dtype=torch.float64)
                              / math.sqrt(rows)).numpy()
    return _projections[rows]


def _pooling(n: int) -> np.ndarray:
    """(TEXTURE_GRID, n) weights of adaptive average pooling along one axis: cell i averages pixels
    floor(i n / G) .. ceil((i + 1) n / G) - 1, as ``adaptive_avg_pool2d`` does."""
    weights = np.zeros((TEXTURE_GRID, n))
    for i in range(TEXTURE_GRID):
        lo, hi = (i * n) // TEXTURE_GRID, -((-(i + 1) * n) // TEXTURE_GRID)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


def feature_names(channels: int) -> list[str]:
    """Names of the ``video_features`` columns for videos with ``channels`` channels."""
    return (["pos_x_cos", "pos_x_sin", "pos_y_cos", "pos_y_sin", "vel_x", "vel_y", "jitter", "size_x", "size_y"]
            + [f"colour_{c}" for c in range(channels)]
            + ["rms", "sharpness", "change", "flicker"]
            + [f"texture_{k}" for k in range(TEXTURE_DIMS)])


def _circular(marginal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame wrap-aware place and extent along one axis from a ``(F, n)`` distribution over its n
    pixels: the first circular moment ``sum_j p_j exp(2 pi i (j + 0.5) / n)`` (complex, ``(F,)``) and the
    spread about its angle, the RMS of the wrapped offsets, in fractions of the frame (``(F,)``)."""
    n = marginal.shape[-1]
    centres = (np.arange(n) + 0.5) / n
    moment = (marginal * np.exp(2j * np.pi * centres)).sum(-1)
    offset = np.remainder(centres - np.angle(moment)[:, None] / (2 * np.pi) + 0.5, 1.0) - 0.5
    return moment, np.sqrt((marginal * np.square(offset)).sum(-1))


def _geometry(video: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The 9 geometry columns of one video from its per-frame energy distribution ``(F, H, W)``."""
    mx, sx = _circular(weights.sum(-2))
    my, sy = _circular(weights.sum(-1))
    radius = 1 / (2 * np.pi * GEOMETRY_UNIT)  # a circle whose circumference is the frame, in tenths
    mx, my = mx.mean() * radius, my.mean() * radius
    velocity, jitter = _line_fit(_track(video))
    return np.array([mx.real, mx.imag, my.real, my.imag, velocity[0] / GEOMETRY_UNIT, velocity[1] / GEOMETRY_UNIT,
                     jitter / JITTER_UNIT, sx.mean() / GEOMETRY_UNIT, sy.mean() / GEOMETRY_UNIT])


@torch.no_grad()
def video_features(x: torch.Tensor) -> torch.Tensor:
    """The fixed feature space of the ``fd`` metric: float64 ``(N, 29 + C)`` from videos ``(N, F, C, H, W)``.

    Hand-made, no learned weights, the same for every caller; any F, C, H, W >= 1. Position, extent and
    motion are wrap-aware: the toy world is a torus, and a shape across the border is one shape
    (docs/evaluation.md says why the plain centroid is wrong there).
    Let ``e = mean_c x^2 + 1e-12`` be the per-pixel energy and ``w = e / sum_hw e``
    its distribution within each frame (uniform on an all-zero frame); pixel
    centres sit at ``(i + 0.5) / H`` and ``(j + 0.5) / W`` of the frame, and
    ``rms = sqrt(mean x^2)`` over the whole clip. The columns, in order:

    * ``pos_x_cos, pos_x_sin, pos_y_cos, pos_y_sin`` (4): where the object is,
      on the circle each axis wraps to: the first circular moment of ``w``'s
      marginal, ``sum_j w_j exp(2 pi i x_j)``, averaged over frames, as a
      point (real, imaginary part) on a circle whose circumference is 10
      tenths of the frame (radius ``1 / (2 pi GEOMETRY_UNIT)``): a small move
      of a compact object moves it by the same number of tenths, and an
      object's place across the border is no different from anywhere else.
    * ``vel_x, vel_y`` (2): how it moves: :func:`clip_displacement` (the slope
      of the least-squares line through the track of :func:`frame_shifts`,
      the displacement over the whole clip) in tenths of the frame (0 when F = 1).
    * ``jitter`` (1): RMS distance of that track from its line, in
      hundredths of the frame (``JITTER_UNIT``): jumpy or non-uniform motion.
    * ``size_x, size_y`` (2): object extent: the RMS of the wrapped offsets
      (in [-1/2, 1/2)) of x and of y from the angle of the frame's circular
      moment, weighted by the marginal of ``w``, averaged over frames, in tenths.
    * ``colour_c`` (C): the object's colour: the energy-weighted mean of channel
      c, ``sum_hw w x_c``, averaged over frames (latent units).
    * ``rms`` (1): overall amplitude (latent units).
    * ``sharpness`` (1): ``10 sqrt(sum of squared differences to the next pixel
      along x and along y, wrapping at the border / (F C H W)) / rms``: blurry
      samples score low.
    * ``change`` (1): temporal consistency: ``10 sqrt(sum of squared
      frame-to-frame differences / (F C H W)) / rms`` (0 when F = 1).
    * ``flicker`` (1): ``10 std_f(rms_f) / rms``, the spread over frames of the
      per-frame RMS. (In these three ratios 10 is ``RATIO_SCALE`` and ``rms``
      stands for ``rms + 1e-12``.)
    * ``texture_k`` (16): layout and shape: every frame average-pooled to a 4 x 4
      grid of cells (``adaptive_avg_pool2d``), averaged over frames, flattened
      (channel-major) to ``C * 16`` values and multiplied by a fixed
      ``(C * 16, 16)`` matrix with ``N(0, 1 / (C * 16))`` entries drawn by
      ``torch.randn`` (float64) from a ``torch.Generator`` seeded
      ``FEATURE_SEED = 0`` (as an elementwise product and a sum, not a matmul).

    The units are chosen so that on the toy world every feature spreads by
    order 1 across clips and visible defects (noise, blur, frozen motion,
    flicker, faded colour) move features by order 1. D = 33 for the toy world
    (C = 4) and D = 45 for Wan latents (C = 16): few enough that 256 samples
    estimate the covariance well. Computed in float64 on the CPU, one sample at
    a time, so a sample's features do not depend on the batch, bit for bit.
    """
    return _per_sample(_features, x)


def _features(video: np.ndarray) -> np.ndarray:
    """:func:`video_features` of one float64 video ``(F, C, H, W)``."""
    F, C, H, W = video.shape
    energy = np.square(video).mean(1) + _EPS  # (F, H, W)
    weights = energy / energy.sum((-2, -1), keepdims=True)
    colour = (weights[:, None] * video).sum((-2, -1)).mean(0)  # (C,)
    rms = np.sqrt(np.square(video).mean())
    grad_sq = (np.square(np.roll(video, -1, -1) - video).sum()  # the border's neighbour is across it
               + np.square(np.roll(video, -1, -2) - video).sum())
    sharpness = np.sqrt(grad_sq / video.size)
    change = np.sqrt(np.square(np.diff(video, axis=0)).sum() / video.size)
    flicker = np.sqrt(np.square(video).mean((1, 2, 3))).std()  # of the per-frame RMS
    rows = (video[:, :, None] * _pooling(H)[:, :, None]).sum(3)  # (F, C, G, W)
    pooled = (rows[:, :, :, None] * _pooling(W)).sum(-1).reshape(F, C * TEXTURE_GRID**2).mean(0)
    texture = (pooled[:, None] * _projection(C * TEXTURE_GRID**2)).sum(0)
    ratios = np.array([sharpness, change, flicker]) * (RATIO_SCALE / (rms + _EPS))
    return np.concatenate([_geometry(video, weights), colour, [rms], ratios, texture])


# --------------------------------------------------------------------------- metrics


def _as_matrix(feats: Any, name: str) -> np.ndarray:
    a = np.asarray(feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) with N >= 2 samples, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    return a


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """Real part of ``scipy.linalg.sqrtm(a)``; whether scipy warned that ``a`` is singular; whether
    the root is usable (finite, imaginary part rounding: at most 1e-3 of its largest entry)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    usable = bool(np.isfinite(root).all())
    if usable and np.iscomplexobj(root):
        usable = np.abs(root.imag).max() <= 1e-3 * max(np.abs(root).max(), _EPS)
        root = root.real
    return root, singular, usable


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` in float64, with sample
    covariances (``ddof = 1``). The matrix square root is ``scipy.linalg.sqrtm``
    with small imaginary parts (rounding) dropped. When the product is singular
    (scipy warns), or the root is not finite or clearly complex, it is
    recomputed on ``(S_a + e I)(S_b + e I)`` with ``e`` = 1e-6 times the mean
    diagonal of ``S_a`` and ``S_b``; if that root is unusable too, ValueError.
    The result is clamped at 0 (a squared distance; tiny negatives are rounding).
    """
    a, b = _as_matrix(feats_a, "feats_a"), _as_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, singular, usable = _sqrtm(cov_a @ cov_b)
    if singular or not usable:
        offset = 1e-6 * max(float(np.trace(cov_a) + np.trace(cov_b)) / (2 * len(mu_a)), _EPS)
        eye = np.eye(len(mu_a))
        covmean, _, usable = _sqrtm((cov_a + offset * eye) @ (cov_b + offset * eye))
        if not usable:
            raise ValueError("frechet_distance: no usable matrix square root of the covariance product, "
                             "even with a diagonal offset")
    fd = float(np.square(mu_a - mu_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(fd, 0.0)


def ode_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of the mean squared elementwise distance between ``x`` and ``ref`` (N, ...)."""
    if x.shape != ref.shape or x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"ode_error needs two batches of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    diff = x.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
    return float(diff.square().reshape(len(diff), -1).mean(1).mean())


def data_row(num_steps: int, fd: float | None, motion: float | None) -> dict[str, list[float | None]]:
    """The ``data`` row of eval.json: the floor's ``fd`` and ``motion_error`` at every one of
    ``num_steps`` step counts (data has no steps, so one value repeated), ``ode_error`` None."""
    return {"ode_error": [None] * num_steps, "fd": [fd] * num_steps, "motion_error": [motion] * num_steps}


def halves_floor(feats: torch.Tensor, prompts: list[str]) -> tuple[float | None, float | None]:
    """The floor of a dataset without a world to draw a second sample from: ``fd`` between the even
    and the odd rows of the held-out clips' features ``(N, D)`` (None when a half has fewer than 2),
    and ``motion_error`` of all N clips against their ``prompts``. Each half has N / 2 clips, so this
    fd carries the larger bias of smaller samples (docs/evaluation.md measures it on the toy world)."""
    fd = frechet_distance(feats[0::2], feats[1::2]) if len(feats) >= 4 else None
    return fd, motion_error(feats, prompts)


# --------------------------------------------------------------------------- eval.json


def _check_value(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must be a finite float or None, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{where} must be a finite float or None (use None for 'not measured'), got {value!r}")
    return float(value)


FD_PER_CHUNK = "fd_per_chunk"
"""Optional key of eval.json for causal (chunk-by-chunk) runs: ``{"chunk_partition": [frames per chunk],
"models": {NAME: [[fd of chunk 0, chunk 1, ...] one list per step]}}``, each chunk's frames against the
same frames of the held-out clips (early against late chunks: where exposure bias shows)."""


def fd_per_chunk(chunk_partition: list[int], models: Mapping[str, list[list[float | None]]]) -> dict:
    """The :data:`FD_PER_CHUNK` entry (checked against the steps by :func:`eval_json`)."""
    return {"chunk_partition": [int(c) for c in chunk_partition],
            "models": {name: [list(per_step) for per_step in values] for name, values in models.items()}}


def _check_per_chunk(entry: Any, steps: list[int]) -> dict:
    if not isinstance(entry, Mapping) or set(entry) != {"chunk_partition", "models"}:
        raise ValueError(f"{FD_PER_CHUNK} must be a dict with keys 'chunk_partition' and 'models', got {entry!r:.200}")
    cp = entry["chunk_partition"]
    if (not isinstance(cp, (list, tuple)) or not cp
            or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in cp)):
        raise ValueError(f"{FD_PER_CHUNK}.chunk_partition must be a non-empty list of ints >= 1, got {cp!r}")
    if not isinstance(entry["models"], Mapping):
        raise ValueError(f"{FD_PER_CHUNK}.models must be a dict {{model: [[fd per chunk] per step]}}")
    models = {}
    for name, values in entry["models"].items():
        if not isinstance(values, (list, tuple)) or len(values) != len(steps):
            raise ValueError(f"{FD_PER_CHUNK}.models[{name!r}] must hold one list per step {steps}, got {values!r:.200}")
        models[name] = []
        for i, row in enumerate(values):
            if not isinstance(row, (list, tuple)) or len(row) != len(cp):
                raise ValueError(f"{FD_PER_CHUNK}.models[{name!r}][{i}] must hold one fd per chunk ({len(cp)}), "
                                 f"got {row!r:.200}")
            models[name].append([_check_value(v, f"{FD_PER_CHUNK}.models[{name!r}][{i}]") for v in row])
    return {"chunk_partition": [int(c) for c in cp], "models": models}


def eval_json(steps: list[int], metrics: Mapping[str, Mapping[str, list[float | None]]],
              per_chunk: Mapping | None = None) -> dict:
    """The ``eval.json`` dict ``{"steps": [...], "models": {NAME: {METRIC: [one value per step]}}}``,
    plus ``fd_per_chunk`` (:data:`FD_PER_CHUNK`) when `per_chunk` is given (causal runs).

    ``steps``: distinct ints >= 1, increasing. ``metrics[name][metric]``: one finite
    number (or None, not measured) per step; metric names among :data:`METRICS`.
    Returns a fresh dict of plain Python types; ValueError says what is wrong.
    """
    if (not isinstance(steps, (list, tuple)) or not steps
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in steps)):
        raise ValueError(f"steps must be a non-empty list of ints >= 1, got {steps!r}")
    steps = [int(s) for s in steps]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be strictly increasing, got {steps}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict {{model: {{metric: [values]}}}}, got {type(metrics).__name__}")
    models: dict[str, dict[str, list[float | None]]] = {}
    for name, per_metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"model names must be non-empty strings, got {name!r}")
        if not isinstance(per_metric, Mapping):
            raise ValueError(f"models[{name!r}] must be a dict {{metric: [values]}}, got {per_metric!r}")
        models[name] = {}
        for metric, values in per_metric.items():
            if metric not in METRICS:
                raise ValueError(f"models[{name!r}]: unknown metric {metric!r}; expected one of {list(METRICS)}")
            if not isinstance(values, (list, tuple)) or len(values) != len(steps):
                raise ValueError(f"models[{name!r}][{metric!r}] must be a list of {len(steps)} values "
                                 f"(one per step {steps}), got {values!r}")
            models[name][metric] = [_check_value(v, f"models[{name!r}][{metric!r}][{i}] (steps={steps[i]})")
                                    for i, v in enumerate(values)]
    out = {"steps": steps, "models": models}
    if per_chunk is not None:
        out[FD_PER_CHUNK] = _check_per_chunk(per_chunk, steps)
    return out


def _validated(result: Mapping) -> dict:
    if not isinstance(result, Mapping) or not {"steps", "models"} <= set(result) <= {"steps", "models", FD_PER_CHUNK}:
        raise ValueError(f"an eval result is a dict with keys 'steps' and 'models' (and, for a causal run, "
                         f"{FD_PER_CHUNK!r}), got {result!r:.200}")
    return eval_json(result["steps"], result["models"], result.get(FD_PER_CHUNK))


def read_eval(path: str | Path) -> dict:
    """Read and validate an ``eval.json`` file (or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    return _validated(json.loads(path.read_text()))


def write_eval(run_dir: str | Path, result: Mapping) -> tuple[Path, Path]:
    """Validate ``result`` (see :func:`eval_json`) and write ``run_dir/eval.json`` and ``run_dir/eval.png``."""
    result = _validated(result)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = run_dir / "eval.json", run_dir / "eval.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_eval(result, png_path)
    return json_path, png_path


def format_table(result: Mapping) -> str:
    """A compact text table of an eval result: a row per model and metric, a column per step (4 s.f.)."""
    result = _validated(result)
    header = ["model", "metric"] + [str(s) for s in result["steps"]]
    rows = [[name, metric] + ["-" if v is None else f"{v:.4g}" for v in values]
            for name, per_metric in _ordered(result["models"]) for metric, values in _ordered_metrics(per_metric)]
    if FD_PER_CHUNK in result:  # causal runs: fd of each chunk position, one row per model and chunk
        rows += [[name, f"fd chunk {c}"] + ["-" if per_step[c] is None else f"{per_step[c]:.4g}" for per_step in values]
                 for name, values in _ordered(result[FD_PER_CHUNK]["models"])
                 for c in range(len(result[FD_PER_CHUNK]["chunk_partition"]))]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _ordered(models: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Models in the order of :data:`MODELS`, unknown names after them in their given order."""
    known = [(n, models[n]) for n in MODELS if n in models]
    return known + [(n, v) for n, v in models.items() if n not in MODELS]


def _ordered_metrics(per_metric: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(m, per_metric[m]) for m in METRICS if m in per_metric]


# --------------------------------------------------------------------------- eval.png

FIGSIZE = (15.0, 4.4)
"""Size of eval.png in inches; at PLOT_DPI that is 2250 x 660 pixels."""
PLOT_DPI = 150
PLOT_TITLE = "quality against sampling steps (lower is better)"

_STYLES = {  # one look per model, the same in both panels
    "teacher": dict(label="teacher (flow matching)", color="#6e6e6e", linestyle="--", marker="s"),
    "student": dict(label="student (AnyFlow)", color="#c0392b", linestyle="-", marker="o", linewidth=2.4),
    "student_stage1": dict(label="student, stage 1 only", color="#eba59e", linestyle="-", marker="o"),
    "consistency": dict(label="consistency baseline", color="#2471a3", linestyle="-", marker="^"),
    DATA: dict(label="data (floor: a second sample)", color="#111111", linestyle=":", linewidth=1.6),
}
_EXTRA_COLOURS = ("#27ae60", "#8e44ad", "#d68910", "#17a589")
_PANELS = {
    "ode_error": ("ODE error", "mean squared distance to the\nteacher's accurate ODE solution"),
    "fd": ("Fréchet distance to held-out data", "FD in the fixed video features"),
    "motion_error": ("motion error", "fraction of samples whose motion\ndoes not follow the prompt"),
}


def _style(name: str, index: int) -> dict:
    if name in _STYLES:
        return dict(_STYLES[name])
    return dict(label=name, color=_EXTRA_COLOURS[index % len(_EXTRA_COLOURS)], linestyle="-", marker="D")


def _draw_panel(ax: Any, result: dict, metric: str) -> None:
    from matplotlib import ticker

    steps = result["steps"]
    title, ylabel = _PANELS[metric]
    values_seen: list[float] = []
    for k, (name, per_metric) in enumerate(_ordered(result["models"])):
        if metric not in per_metric or all(v is None for v in per_metric[metric]):
            continue  # not measured (the data row's ode_error): no line and no legend entry
        ys = [np.nan if v is None else v for v in per_metric[metric]]
        values_seen += [v for v in ys if np.isfinite(v)]
        ax.plot(steps, ys, markersize=6, clip_on=False, zorder=3, **_style(name, k))
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlim(steps[0] / 1.25, steps[-1] * 1.25)
    positive = [v for v in values_seen if v > 0]
    if positive and len(positive) == len(values_seen) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")  # ticks at 1, 2, 5 x 10^k, written plainly (0.05, not 5e-2)
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    elif values_seen and min(values_seen) >= 0:
        ax.set_ylim(bottom=0, top=1.08 * max(values_seen) if max(values_seen) > 0 else 1)
    if not values_seen:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="#888888")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", color="#e3e3e3", linewidth=0.8, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)


def plot_eval(result: Mapping, path: str | Path) -> Path:
    """Draw ``eval.png``: a panel per metric against sampling steps, one line per model (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend to pick

    result = _validated(result)
    fig = Figure(figsize=FIGSIZE, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        _draw_panel(ax, result, metric)
    legend: dict[str, Any] = {}  # label -> handle, over both panels (a model may lack a metric)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=len(legend), frameon=False)
    fig.suptitle(PLOT_TITLE, fontsize=13)
    fig.savefig(path, dpi=PLOT_DPI)
    return Path(path)


# --------------------------------------------------------------------------- sample videos

VIDEO_WHITE = 2.83
"""Latent value shown at full intensity in sample GIFs: the toy world's SHAPE_GAIN (a fully
covered pixel of a colour whose channel is on)."""
GIF_FRAME_MS = 250
"""Display time of one frame of a sample GIF."""


def video_to_rgb(video: torch.Tensor, scale: int = 8) -> np.ndarray:
    """uint8 frames ``(F, H * scale + bar, W * scale, 3)`` of one latent video ``(F, C, H, W)``.

    The fixed map from latents to colours: with C >= 3, channels 0, 1, 2 are R,
    G, B and a value v shows as ``255 * clip(v / VIDEO_WHITE, 0, 1)``; the toy
    world's empty background (0) is black and its red, green, blue and yellow
    shapes come out in those colours (their off channels are negative, hence
    black). With C < 3, channel 0 is shown in grey as ``255 * clip((v +
    VIDEO_WHITE) / (2 VIDEO_WHITE), 0, 1)`` (0 is mid-grey). Frames are
    upscaled by ``scale`` with nearest neighbours, and a progress bar of
    ``max(2, scale // 2)`` pixel rows under each frame shows the frame's place
    in the clip (so consecutive frames always differ and GIFs keep F frames).
    """
    if video.ndim != 4 or scale < 1:
        raise ValueError(f"video_to_rgb expects one video (F, C, H, W) and scale >= 1, got "
                         f"{tuple(video.shape)}, scale={scale}")
    v = video.detach().to("cpu", torch.float64).numpy()
    F, C, H, W = v.shape
    if C >= 3:
        rgb = np.clip(v[:, :3] / VIDEO_WHITE, 0, 1)
    else:
        rgb = np.repeat(np.clip((v[:, :1] + VIDEO_WHITE) / (2 * VIDEO_WHITE), 0, 1), 3, axis=1)
    frames = np.round(255 * rgb).astype(np.uint8).transpose(0, 2, 3, 1)  # (F, H, W, 3)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    bar = np.full((F, max(2, scale // 2), W * scale, 3), 40, dtype=np.uint8)
    for f in range(F):
        bar[f, :, : round(W * scale * (f + 1) / F)] = 200
    return np.concatenate([frames, bar], axis=1)


def _slug(text: str, keep: str = "") -> str:
    return re.sub(rf"[^a-z0-9{keep}]+", "-", text.lower()).strip("-")[:60] or "video"


def write_videos(folder: str | Path, videos: Mapping[str, torch.Tensor], prompts: list[str],
                 scale: int = 8) -> list[Path]:
    """Write one looping GIF per video: ``folder/<key>_<i>_<prompt>.gif``; returns the paths.

    ``videos[key]`` is ``(N, F, C, H, W)`` (e.g. key ``"student_steps4"``) and
    ``prompts`` its N captions, the same for every key. Colours and layout:
    :func:`video_to_rgb`; each frame shows for ``GIF_FRAME_MS``.
    """
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, batch in videos.items():
        if batch.ndim != 5 or len(batch) != len(prompts):
            raise ValueError(f"videos[{key!r}] must be (N, F, C, H, W) with N = {len(prompts)} (one per prompt), "
                             f"got shape {tuple(batch.shape)}")
        for i, (video, prompt) in enumerate(zip(batch, prompts)):
            path = folder / f"{_slug(key, keep='_')}_{i:02d}_{_slug(prompt)}.gif"
            iio.imwrite(path, video_to_rgb(video, scale), extension=".gif", duration=GIF_FRAME_MS, loop=0)
            paths.append(path)
    return paths
