"""The toy world: synthetic videos of moving coloured shapes, used directly as latents.

Each clip shows one shape (square, circle, triangle or bar) of one colour (red,
green, blue or yellow) on an empty background, either moving (left, right, up,
down) or standing still, with the prompt saying which: ``"red square moving
left"``, ``"blue bar standing still"``.  Clips are written in the Parquet
schema of :mod:`pipeline.data.schema`, so the rest of the pipeline treats them
like VAE latents of real video.

The frame is a torus: a shape that leaves one border comes back in at the
opposite one, and its position is uniform over the whole frame.  So the
world's distribution does not change under a shift in space (wrapped) or in
time (constant velocity), and everything the prompt fixes (colour, shape,
direction and speed of motion) is relative: a Wan DiT, whose only notion of
position is its relative 3D RoPE, can learn it.  (Version 1 centred every
object at mid-clip, an absolute placement in space and time that the teacher
could not learn; DESIGN.md, "The toy world".)

What a clip is (all of it deterministic in ``(cfg.seed, sample_id)``):

* Colour, shape and motion are drawn uniformly from the vocabulary.  Jitter per
  clip: half-size ``0.2 * min(H, W)`` +-15 %, the position at mid-clip uniform
  over the frame, and the distance travelled over the clip ``cfg.travel`` of
  the frame +-20 % (linear motion, constant speed; zero for "still").
  Randomness comes from a counter-based hash of ``(seed, sample_id,
  attribute)``, so a clip does not depend on which other clips are generated
  with it.
* Each colour is a fixed vector in channel space: channels 0-2 are the colour's
  R, G, B, channel 3 its luma (0.3 R + 0.59 G + 0.11 B), further channels fixed
  pseudo-random features; each channel is then centred and scaled to unit RMS
  over the four colours.  A pixel is ``SHAPE_GAIN * alpha * colour``, where
  ``alpha`` in [0, 1] is the shape's coverage with a soft (smoothstep, 1.5 px
  wide) edge, measured with wrapped (nearest-image) distances; the background
  is exactly 0.
* Normalisation: colours are centred over the vocabulary, so the latents have
  mean ~0 per channel; ``SHAPE_GAIN`` is fixed so that the toy16 world
  (``TOY16``) has std ~1 overall (1.01; the default world 0.96).  Sizes are fractions of the
  frame, so other frame sizes come out close to that too.

Prompt embeddings: each vocabulary word has a fixed vector (standard normal
entries, from a generator seeded with ``cfg.embed_seed``); a prompt of n words
embeds to an (L, D) tensor whose first n rows are its words' vectors and the
rest zeros, like T5's padding.  The null (negative) prompt is the empty string,
which embeds to all padding: an (L, D) tensor of zeros.

The held-out split uses sample ids ``num_train .. num_train + num_heldout - 1``
(train uses ``0 .. num_train - 1``): same vocabulary, disjoint clips.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import schema

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle", "bar")
MOTIONS = ("left", "right", "up", "down", "still")
DEFAULT_MOTIONS = ("right", "down", "still")
"""the default world's motions (ToyWorldConfig.motions); `TOY16` keeps all five"""

TOY_WORLD_VERSION = 2
"""Bumped whenever rendering changes, so cached datasets are rebuilt (and teachers made for an older
world are refused). 1: objects centred at mid-clip; 2: the torus (uniform positions, wrap-around)."""

SHAPE_GAIN = 2.83
"""Scale of a fully covered pixel; gives the toy worlds std ~1 (see module docstring)."""

EDGE_WIDTH = 1.5
"""Width in pixels of the soft edge of a shape."""

_RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0)}
_DIRECTION = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
              "still": (0.0, 0.0)}  # (dx, dy) in image coordinates: y grows downwards
_MAX_PROMPT_WORDS = 4


@dataclass
class ToyWorldConfig:
    """Size and randomness of the toy world."""

    frames: int = 4
    """Frames per clip (F)."""
    channels: int = 4
    """Latent channels (C); each colour is a fixed C-dim vector (>= 2 keeps colours distinct)."""
    height: int = 12
    """Frame height in latent pixels (H)."""
    width: int = 12
    """Frame width in latent pixels (W)."""
    num_train: int = 2048
    """Clips in the train split (sample ids 0 .. num_train - 1)."""
    num_heldout: int = 256
    """Clips in the held-out split (sample ids after the train ones)."""
    seed: int = 0
    """Seed of every per-clip random choice (attributes and jitter)."""
    embed_len: int = 8
    """Tokens per prompt embedding (L); prompts are zero-padded to this length."""
    embed_dim: int = 32
    """Width of a token embedding (D)."""
    embed_seed: int = 0
    """Seed of the word -> vector table (kept apart from ``seed`` so every toy dataset
    shares one text encoder)."""
    shard_rows: int = 512
    """Most rows per Parquet shard."""
    travel: float = 0.4
    """Distance a moving shape travels over the clip, as a fraction of the frame (+-20 % per clip), in
    (0, 0.83): at most one frame, so a frame-to-frame step stays far below the half frame beyond which a
    wrapped displacement is ambiguous. The default 0.4 keeps even the first-to-last displacement below it."""
    motions: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MOTIONS))
    """Motions the clips are drawn from, each equally often (a subset of left, right, up, down, still);
    the prompt vocabulary and its embeddings stay the whole world's. The default is right, down and still
    (the prompt picks the axis, the world fixes the direction on it); all five draw exactly the clips of a
    world without this key."""
    bar_length: float = 1.2
    """Half-length of a bar in units of the shape's half-size r (its half-height is 0.55 r; r is 0.2 of
    min(H, W), +-15 % per clip), in (0.55, 2.5). The default 1.2 draws a bar 48 % of the frame wide;
    1.6 draws the clips of a world without this key: 64 %, which on a small torus (12 pixels) leaves a gap
    of 4 pixels that distilled students fill (a stripe around the torus: docs/toy-world.md, "Sixth round")."""

    def __post_init__(self) -> None:
        if isinstance(self.travel, bool) or not isinstance(self.travel, (int, float)) \
                or not 0 < self.travel * 1.2 < 1:
            raise ValueError(f"ToyWorldConfig.travel must be a number in (0, 0.83) (at most 1 frame with "
                             f"the +20 % jitter), got {self.travel!r}")
        self.travel = float(self.travel)
        if (not isinstance(self.motions, (list, tuple)) or not self.motions
                or any(m not in MOTIONS for m in self.motions) or len(set(self.motions)) != len(self.motions)):
            raise ValueError(f"ToyWorldConfig.motions must be distinct names from {list(MOTIONS)}, got "
                             f"{self.motions!r}")
        self.motions = list(self.motions)
        if isinstance(self.bar_length, bool) or not isinstance(self.bar_length, (int, float)) \
                or not 0.55 < self.bar_length < 2.5:
            raise ValueError(f"ToyWorldConfig.bar_length must be a number in (0.55, 2.5) (longer than the bar "
                             f"is high, shorter than the frame), got {self.bar_length!r}")
        self.bar_length = float(self.bar_length)
        for f in dataclasses.fields(self):
            if f.name in ("travel", "motions", "bar_length"):
                continue
            value = getattr(self, f.name)
            low = 0 if f.name in ("seed", "embed_seed") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ToyWorldConfig.{f.name} must be an int >= {low}, got {value!r}")
        if self.embed_len < _MAX_PROMPT_WORDS:
            raise ValueError(f"ToyWorldConfig.embed_len must be >= {_MAX_PROMPT_WORDS} "
                             f"(the longest toy prompt), got {self.embed_len}")


# --------------------------------------------------------------------------- vocabulary and prompts


TOY16 = {"frames": 8, "height": 16, "width": 16, "motions": MOTIONS, "bar_length": 1.6}
"""ToyWorldConfig fields of the toy16 world, the default until 2026-12-08: 8 frames of 16x16, all five motions,
bars of 1.6 r (`ToyWorldConfig(**TOY16)`). The `toy` shipped teacher and `--config toy16` are made for it."""


def prompt_for(colour: str, shape: str, motion: str) -> str:
    """The caption of a clip, e.g. ``"red square moving left"`` or ``"red bar standing still"``."""
    return f"{colour} {shape} {'standing still' if motion == 'still' else 'moving ' + motion}"


def vocabulary() -> dict:
    """The toy world's vocabulary: colours, shapes, motions and the sorted word list."""
    words = {w for c in COLOURS for s in SHAPES for m in MOTIONS for w in prompt_for(c, s, m).split()}
    return {"colours": list(COLOURS), "shapes": list(SHAPES), "motions": list(MOTIONS),
            "words": sorted(words)}


def parse_prompt(text: str) -> tuple[int, int, int]:
    """(colour, shape, motion) indices of a toy prompt; ValueError if it is not one."""
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            for m, motion in enumerate(MOTIONS):
                if prompt_for(colour, shape, motion) == " ".join(text.lower().split()):
                    return c, s, m
    raise ValueError(f"not a toy-world prompt: {text!r} (expected e.g. 'red square moving left')")


def _embed_table(cfg: ToyWorldConfig) -> tuple[dict[str, int], torch.Tensor]:
    """Word -> token id (from 1), and the (V + 1, D) table whose row 0 (padding) is zero."""
    words = vocabulary()["words"]
    gen = torch.Generator().manual_seed(cfg.embed_seed)
    table = torch.randn(len(words) + 1, cfg.embed_dim, generator=gen)
    table[0] = 0.0
    return {w: i + 1 for i, w in enumerate(words)}, table


def embed_prompts(texts: list[str], cfg: ToyWorldConfig) -> torch.Tensor:
    """Embed prompts to float32 (N, L, D): word vectors, then zero padding up to L.

    Words are split on whitespace, case-insensitively; an unknown word or more
    than L words is a ValueError.  ``""`` embeds to all zeros (the null prompt).
    """
    ids_of, table = _embed_table(cfg)
    ids = torch.zeros(len(texts), cfg.embed_len, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text.lower().split()
        if len(words) > cfg.embed_len:
            raise ValueError(f"prompt {text!r} has {len(words)} words, embed_len is {cfg.embed_len}")
        unknown = [w for w in words if w not in ids_of]
        if unknown:
            raise ValueError(f"prompt {text!r}: words {unknown} not in the toy vocabulary "
                             f"{sorted(ids_of)}")
        ids[row, :len(words)] = torch.tensor([ids_of[w] for w in words], dtype=torch.long)
    return table[ids]


def embed_prompt(text: str, cfg: ToyWorldConfig) -> torch.Tensor:
    """Embed one prompt to float32 (L, D); see :func:`embed_prompts`."""
    return embed_prompts([text], cfg)[0]


def null_embed(cfg: ToyWorldConfig) -> torch.Tensor:
    """The null / negative prompt embedding: the empty string, i.e. zeros (L, D)."""
    return embed_prompt("", cfg)


def colour_table(channels: int) -> torch.Tensor:
    """Fixed (len(COLOURS), channels) colour vectors, each channel centred, unit RMS."""
    rgb = torch.tensor([_RGB[c] for c in COLOURS], dtype=torch.float64)
    luma = rgb @ torch.tensor([0.3, 0.59, 0.11], dtype=torch.float64)
    extra = torch.rand(len(COLOURS), max(channels - 4, 0), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1234))
    features = torch.cat([rgb, luma[:, None], extra], dim=1)[:, :channels]
    features = features - features.mean(0)
    return (features / features.square().mean(0).sqrt()).float()


# --------------------------------------------------------------------------- rendering


def _uniform(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) floats, a pure function of (seed, id, stream) (splitmix64 hash)."""
    def mix(x: np.ndarray) -> np.ndarray:
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    key = np.array([(seed * 0x100000001B3 + stream) & (2**64 - 1)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix(mix(key) ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _clip_params(cfg: ToyWorldConfig, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-clip attribute indices and jitter, each an array over ``ids``."""
    u = [_uniform(cfg.seed, ids, stream) for stream in range(7)]
    return {
        "colour": (u[0] * len(COLOURS)).astype(np.int64),
        "shape": (u[1] * len(SHAPES)).astype(np.int64),
        "motion": np.array([MOTIONS.index(m) for m in cfg.motions])[(u[2] * len(cfg.motions)).astype(np.int64)],
        "size": 0.2 * (1.0 + 0.3 * (u[3] - 0.5)),       # half-size, fraction of min(H, W)
        "travel": cfg.travel * (1.0 + 0.4 * (u[4] - 0.5)),  # distance over the clip, fraction of frame
        "x": u[5],                                      # mid-clip centre, fraction of width (torus)
        "y": u[6],                                      # mid-clip centre, fraction of height (torus)
    }


def _box_sdf(dx: np.ndarray, dy: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    qx, qy = np.abs(dx) - hx, np.abs(dy) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, bar_length: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape of half-size r at the origin (a bar's
    half-length is `bar_length` r)."""
    if shape == "square":
        return _box_sdf(dx, dy, r, r)
    if shape == "bar":  # horizontal
        return _box_sdf(dx, dy, bar_length * r, 0.55 * r)
    if shape == "circle":
        return np.hypot(dx, dy) - 1.1 * r
    # upward equilateral triangle, centroid at the origin, inradius 0.75 r (edge distances)
    s, c = np.float32(3**0.5 / 2), np.float32(0.5)
    return np.maximum(np.maximum(dy, s * dx - c * dy), -s * dx - c * dy) - 0.75 * r


def _wrap(d: np.ndarray, size: int) -> np.ndarray:
    """Offsets on a torus of circumference ``size``: the nearest image, in [-size / 2, size / 2)."""
    half = np.float32(size / 2)
    return np.mod(d + half, np.float32(size)) - half


def _coverage(cfg: ToyWorldConfig, p: dict[str, np.ndarray]) -> np.ndarray:
    """Soft coverage alpha in [0, 1] of each clip's shape, float32 (N, F, H, W).

    numpy rather than torch: single-threaded elementwise code is fastest on a
    small, busy CPU, where torch's thread pool can be many times slower.
    """
    F, H, W = cfg.frames, cfg.height, cfg.width
    f32 = np.float32
    t = (np.arange(F) / max(F - 1, 1) - (0.5 if F > 1 else 0.0)).astype(f32)
    direction = np.array([_DIRECTION[m] for m in MOTIONS], dtype=f32)[p["motion"]]  # (N, 2)
    travel = p["travel"].astype(f32)[:, None] * t  # (N, F)
    cx = (p["x"].astype(f32)[:, None] + direction[:, :1] * travel) * f32(W)
    cy = (p["y"].astype(f32)[:, None] + direction[:, 1:] * travel) * f32(H)
    dx = _wrap((np.arange(W, dtype=f32) + f32(0.5)) - cx[:, :, None, None], W)  # (N, F, 1, W)
    dy = _wrap((np.arange(H, dtype=f32) + f32(0.5))[:, None] - cy[:, :, None, None], H)  # (N, F, H, 1)
    radius = (p["size"] * min(H, W)).astype(f32)[:, None, None, None]
    sdf = np.empty((len(p["shape"]), F, H, W), dtype=f32)
    for k, shape in enumerate(SHAPES):
        rows = np.flatnonzero(p["shape"] == k)
        sdf[rows] = _shape_sdf(shape, dx[rows], dy[rows], radius[rows], cfg.bar_length)
    edge = np.clip(f32(0.5) - sdf / f32(EDGE_WIDTH), 0, 1)
    return edge * edge * (f32(3) - f32(2) * edge)  # smoothstep


def render_videos(cfg: ToyWorldConfig, sample_ids: np.ndarray | list[int]) -> tuple[torch.Tensor, list[str]]:
    """Render clips: float32 latents (N, F, C, H, W) and their N prompts."""
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    params = _clip_params(cfg, ids)
    return _render(cfg, params), _prompts(params)


def _render(cfg: ToyWorldConfig, params: dict[str, np.ndarray]) -> torch.Tensor:
    colours = colour_table(cfg.channels).numpy()[params["colour"]] * np.float32(SHAPE_GAIN)
    alpha = _coverage(cfg, params)  # (N, F, H, W)
    return torch.from_numpy(alpha[:, :, None] * colours[:, None, :, None, None])


def _prompts(params: dict[str, np.ndarray]) -> list[str]:
    return [prompt_for(COLOURS[c], SHAPES[s], MOTIONS[m])
            for c, s, m in zip(params["colour"], params["shape"], params["motion"])]


def render_video(cfg: ToyWorldConfig, sample_id: int, prompt: str | None = None) -> tuple[torch.Tensor, str]:
    """One clip (F, C, H, W) and its prompt.

    With ``prompt`` (a toy prompt, e.g. ``"red square moving left"``) the
    colour, shape and motion are the prompt's and only the jitter comes from
    ``(cfg.seed, sample_id)``.
    """
    params = _clip_params(cfg, np.array([sample_id], dtype=np.int64))
    if prompt is not None:
        for key, index in zip(("colour", "shape", "motion"), parse_prompt(prompt)):
            params[key] = np.array([index], dtype=np.int64)
    return _render(cfg, params)[0], _prompts(params)[0]


# --------------------------------------------------------------------------- the dataset


def split_ids(cfg: ToyWorldConfig, split: str) -> np.ndarray:
    """The sample ids of a split: train first, held-out after it (disjoint)."""
    if split == "train":
        return np.arange(cfg.num_train, dtype=np.int64)
    if split == "heldout":
        return np.arange(cfg.num_train, cfg.num_train + cfg.num_heldout, dtype=np.int64)
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")


def iter_split(cfg: ToyWorldConfig, split: str) -> Iterator[schema.LatentDataset]:
    """The rows of a split, rendered in chunks of ``cfg.shard_rows`` clips."""
    ids = split_ids(cfg, split)
    for start in range(0, len(ids), cfg.shard_rows):
        chunk = ids[start:start + cfg.shard_rows]
        latents, prompts = render_videos(cfg, chunk)
        yield schema.LatentDataset(latents, embed_prompts(prompts, cfg), prompts,
                                   torch.from_numpy(chunk), ["toy"] * len(chunk))


def toy_meta(cfg: ToyWorldConfig) -> dict:
    """The dataset.json keys the toy world supplies (generator, vocabulary)."""
    return {"generator": {"name": "toy", "seed": cfg.seed, "version": TOY_WORLD_VERSION,
                          "config": dataclasses.asdict(cfg)},
            "vocabulary": vocabulary()}


def _is_current(folder: Path, cfg: ToyWorldConfig) -> bool:
    """True if ``folder`` holds a valid toy dataset made with ``cfg`` by this code version."""
    try:
        meta = schema.read_meta(folder)
        wanted = json.loads(json.dumps(toy_meta(cfg)["generator"]))
        if meta["generator"] != wanted:
            return False
        schema.validate_dataset(folder)
    except schema.DatasetError:
        return False
    return True


def make_toy_dataset(folder: str | Path, cfg: ToyWorldConfig | None = None) -> Path:
    """Write the toy dataset for ``cfg`` to ``folder`` (schema of :mod:`pipeline.data.schema`).

    Does nothing if ``folder`` already holds a valid dataset of the same config
    and toy-world version; otherwise (other config, damaged or partial files)
    replaces the dataset files there.  Returns the folder.  Not safe for several
    processes writing one folder at once: call it from one place (the driver).
    """
    cfg = cfg or ToyWorldConfig()
    folder = Path(folder)
    if _is_current(folder, cfg):
        return folder
    return schema.write_dataset(folder, iter_split(cfg, "train"), iter_split(cfg, "heldout"),
                                null_embed(cfg), toy_meta(cfg), null_prompt="",
                                shard_rows=cfg.shard_rows)
