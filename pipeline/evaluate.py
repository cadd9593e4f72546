"""Quality against sampling steps: metrics, ``eval.json``, ``eval.png``, sample GIFs.

Two metrics, lower is better for both (DESIGN.md, "Contracts the checks rely on"):

* ``ode_error`` (:func:`ode_error`): mean squared distance of a model's samples to
  the teacher's high-accuracy ODE solution from the same noise.
* ``fd`` (:func:`frechet_distance` of :func:`video_features`): Frechet distance
  between a model's samples and the held-out data in a fixed, documented feature
  space (no learned network: cheap, and the same for every caller).

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
import scipy.linalg
import torch

METRICS = ("ode_error", "fd")
"""The metric names of eval.json, in plotting order."""

MODELS = ("teacher", "student", "student_stage1", "consistency")
"""Known model names (plot order and styles); other names are accepted and drawn after them."""

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
"""The jitter of the centroid track is measured in units of JITTER_UNIT of the frame (hundredths)."""
RATIO_SCALE = 10.0
"""Factor on the dimensionless ratios sharpness, change and flicker."""
_EPS = 1e-12
_CHUNK_ELEMENTS = 2**24  # video elements per float64 batch in video_features (128 MiB)

_projections: dict[int, torch.Tensor] = {}


def _projection(rows: int) -> torch.Tensor:
    """The fixed (rows, TEXTURE_DIMS) projection: N(0, 1 / rows) entries from FEATURE_SEED."""
    if rows not in _projections:
        gen = torch.Generator().manual_seed(FEATURE_SEED)
        _projections[rows] = torch.randn(rows, TEXTURE_DIMS, generator=gen, dtype=torch.float64) / math.sqrt(rows)
    return _projections[rows]


def feature_names(channels: int) -> list[str]:
    """Names of the ``video_features`` columns for videos with ``channels`` channels."""
    return (["pos_x", "pos_y", "vel_x", "vel_y", "jitter", "size_x", "size_y"]
            + [f"colour_{c}" for c in range(channels)]
            + ["rms", "sharpness", "change", "flicker"]
            + [f"texture_{k}" for k in range(TEXTURE_DIMS)])


def _centroid_track(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame centroid (cx, cy) and spread (sx, sy), fractions of the frame, from (N, F, H, W) weights."""
    H, W = weights.shape[-2:]
    ys = (torch.arange(H, dtype=torch.float64) + 0.5) / H
    xs = (torch.arange(W, dtype=torch.float64) + 0.5) / W
    wx, wy = weights.sum(-2), weights.sum(-1)  # marginals (N, F, W), (N, F, H)
    cx, cy = (wx * xs).sum(-1), (wy * ys).sum(-1)
    sx = (wx * (xs - cx[..., None]).square()).sum(-1).clamp_min(0).sqrt()
    sy = (wy * (ys - cy[..., None]).square()).sum(-1).clamp_min(0).sqrt()
    return cx, cy, sx, sy


def _motion(cx: torch.Tensor, cy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares line through the (N, F) centroid track against clip time t in [-1/2, 1/2]:
    its slopes (the displacement over the clip) in x and y, and the RMS distance of the track from it."""
    F = cx.shape[1]
    if F == 1:
        zero = torch.zeros_like(cx[:, 0])
        return zero, zero, zero
    t = torch.linspace(-0.5, 0.5, F, dtype=torch.float64)
    dx, dy = cx - cx.mean(1, keepdim=True), cy - cy.mean(1, keepdim=True)
    vx, vy = (dx * t).sum(1) / t.square().sum(), (dy * t).sum(1) / t.square().sum()
    residual = (dx - vx[:, None] * t).square() + (dy - vy[:, None] * t).square()
    return vx, vy, residual.mean(1).sqrt()


@torch.no_grad()
def video_features(x: torch.Tensor) -> torch.Tensor:
    """The fixed feature space of the ``fd`` metric: float64 ``(N, 27 + C)`` from videos ``(N, F, C, H, W)``.

    Hand-made, no learned weights, the same for every caller; any F, C, H, W >= 1.
    Let ``e = mean_c x^2 + 1e-12`` be the per-pixel energy and ``w = e / sum_hw e``
    its distribution within each frame (uniform on an all-zero frame); pixel
    centres sit at ``(i + 0.5) / H`` and ``(j + 0.5) / W`` of the frame, and
    ``rms = sqrt(mean x^2)`` over the whole clip. The columns, in order:

    * ``pos_x, pos_y`` (2): where the object is: the energy centroid of each
      frame, averaged over frames, in tenths of the frame (``GEOMETRY_UNIT``).
    * ``vel_x, vel_y`` (2): how it moves: the slope of the least-squares line
      through the per-frame centroids, as the displacement over the whole clip,
      in tenths of the frame (0 when F = 1).
    * ``jitter`` (1): RMS distance of the centroid track from that line, in
      hundredths of the frame (``JITTER_UNIT``): jumpy or non-uniform motion.
    * ``size_x, size_y`` (2): object extent: the energy-weighted standard
      deviation of x and of y about the frame's centroid, averaged over frames,
      in tenths of the frame.
    * ``colour_c`` (C): the object's colour: the energy-weighted mean of channel
      c, ``sum_hw w x_c``, averaged over frames (latent units).
    * ``rms`` (1): overall amplitude (latent units).
    * ``sharpness`` (1): ``10 sqrt(sum of squared forward differences along x
      and along y / (F C H W)) / rms``: blurry samples score low.
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
      ``FEATURE_SEED = 0``.

    The units are chosen so that on the toy world every feature spreads by
    order 1 across clips and visible defects (noise, blur, frozen motion,
    flicker, faded colour) move features by order 1. D = 31 for the toy world
    (C = 4) and D = 43 for Wan latents (C = 16): few enough that 256 samples
    estimate the covariance well. Computed in float64 on the CPU, in chunks of
    at most 2^24 video elements (a sample's features do not depend on the batch).
    """
    if x.ndim != 5 or min(x.shape) < 1:
        raise ValueError(f"video_features expects non-empty videos (N, F, C, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("video_features got non-finite values")
    chunk = max(1, _CHUNK_ELEMENTS // x[0].numel())
    return torch.cat([_features(x[i:i + chunk].detach().to("cpu", torch.float64))
                      for i in range(0, len(x), chunk)])


def _features(x: torch.Tensor) -> torch.Tensor:
    """:func:`video_features` of a float64 CPU batch."""
    N, F, C, H, W = x.shape
    energy = x.square().mean(2) + _EPS  # (N, F, H, W)
    weights = energy / energy.sum((-2, -1), keepdim=True)
    cx, cy, sx, sy = _centroid_track(weights)
    vx, vy, jitter = _motion(cx, cy)
    geometry = torch.stack([cx.mean(1) / GEOMETRY_UNIT, cy.mean(1) / GEOMETRY_UNIT, vx / GEOMETRY_UNIT,
                            vy / GEOMETRY_UNIT, jitter / JITTER_UNIT, sx.mean(1) / GEOMETRY_UNIT,
                            sy.mean(1) / GEOMETRY_UNIT], 1)
    colour = (weights[:, :, None] * x).sum((-2, -1)).mean(1)  # (N, C)
    rms = x.square().mean((1, 2, 3, 4)).sqrt()
    grad_sq = x.diff(dim=-1).square().sum((1, 2, 3, 4)) + x.diff(dim=-2).square().sum((1, 2, 3, 4))
    sharpness = (grad_sq / x[0].numel()).sqrt()
    change = x.diff(dim=1).square().sum((1, 2, 3, 4)).div(x[0].numel()).sqrt()
    flicker = x.square().mean((2, 3, 4)).sqrt().std(1, correction=0)  # of the per-frame RMS
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.reshape(N * F, C, H, W), TEXTURE_GRID)
    pooled = pooled.reshape(N, F, C * TEXTURE_GRID**2).mean(1)
    texture = pooled @ _projection(C * TEXTURE_GRID**2)
    ratios = torch.stack([sharpness, change, flicker], 1) * (RATIO_SCALE / (rms[:, None] + _EPS))
    return torch.cat([geometry, colour, rms[:, None], ratios, texture], 1)


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


def eval_json(steps: list[int], metrics: Mapping[str, Mapping[str, list[float | None]]]) -> dict:
    """The ``eval.json`` dict ``{"steps": [...], "models": {NAME: {METRIC: [one value per step]}}}``.

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
    return {"steps": steps, "models": models}


def _validated(result: Mapping) -> dict:
    if not isinstance(result, Mapping) or set(result) != {"steps", "models"}:
        raise ValueError(f"an eval result is a dict with keys 'steps' and 'models', got {result!r:.200}")
    return eval_json(result["steps"], result["models"])


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

FIGSIZE = (11.0, 4.4)
"""Size of eval.png in inches; at PLOT_DPI that is 1650 x 660 pixels."""
PLOT_DPI = 150
PLOT_TITLE = "quality against sampling steps (lower is better)"

_STYLES = {  # one look per model, the same in both panels
    "teacher": dict(label="teacher (flow matching)", color="#6e6e6e", linestyle="--", marker="s"),
    "student": dict(label="student (AnyFlow)", color="#c0392b", linestyle="-", marker="o", linewidth=2.4),
    "student_stage1": dict(label="student, stage 1 only", color="#eba59e", linestyle="-", marker="o"),
    "consistency": dict(label="consistency baseline", color="#2471a3", linestyle="-", marker="^"),
}
_EXTRA_COLOURS = ("#27ae60", "#8e44ad", "#d68910", "#17a589")
_PANELS = {
    "ode_error": ("ODE error", "mean squared distance to the\nteacher's accurate ODE solution"),
    "fd": ("Fréchet distance to held-out data", "FD in the fixed video features"),
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
        if metric not in per_metric:
            continue
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
    """Draw ``eval.png``: ode_error and fd against sampling steps, one line per model (Agg backend)."""
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
