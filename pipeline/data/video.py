"""Videos and captions -> the tensors of one dataset row (pure: imports neither Ray nor MLflow).

1. `read_manifest`: the clips to prepare, `(sample_id, path, caption)`, from a folder (a caption
   in a `.txt` beside each video) or a manifest file (`.csv` with columns `path,caption`, or
   `.jsonl` with those keys); ids are positions in the sorted manifest, so a run is repeatable.
2. `decode_clip`: PyAV decodes the first F frames at a target fps (the source frame nearest each
   time k / fps), scaled to cover the target size and centre-cropped; uint8 (F, H, W, 3).
3. `to_pixels`: uint8 frames -> float (B, 3, F, H, W) in [-1, 1], as Wan's video processor
   (`VaeImageProcessor.normalize`: 2 x / 255 - 1).
4. `Encoder`: diffusers' `AutoencoderKLWan` (posterior mode, normalised with the VAE's
   `latents_mean` / `latents_std`: the inverse of what `WanPipeline` applies before decoding)
   and transformers' `UMT5EncoderModel` + tokenizer, padded to `max_tokens` (512) with zeros
   past each prompt's true length, as `WanPipeline.encode_prompt` does; local folders only.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


class ManifestError(ValueError):
    """The video folder or manifest is missing or malformed (bad input: exit status 2)."""


class ClipError(ValueError):
    """One clip cannot be used (does not decode, too short, empty caption); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Clip:
    sample_id: int
    path: str
    caption: str


# --------------------------------------------------------------------------- 1. the manifest


def read_manifest(videos: str | Path) -> list[Clip]:
    """The clips of a folder (videos with a `.txt` caption beside each; a missing `.txt` gives an
    empty caption, skipped later with its reason) or of a `.csv` / `.jsonl` manifest."""
    src = Path(videos)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        if not files:
            raise ManifestError(f"{src}: no videos ({', '.join(VIDEO_EXTS)}) in this folder")
        pairs = [(str(p), _read_caption(p.with_suffix(".txt"))) for p in files]
    elif src.is_file() and src.suffix.lower() in (".csv", ".jsonl"):
        pairs = _read_csv(src) if src.suffix.lower() == ".csv" else _read_jsonl(src)
        pairs = [(str((src.parent / p) if not Path(p).is_absolute() else Path(p)), c) for p, c in pairs]
        if not pairs:
            raise ManifestError(f"{src}: the manifest lists no videos")
    else:
        raise ManifestError(f"{src}: not a folder of videos nor a .csv / .jsonl manifest")
    return [Clip(i, p, c) for i, (p, c) in enumerate(pairs)]


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ManifestError(f"{path}: the header must name the columns path,caption (got {reader.fieldnames})")
        return [(row["path"] or "", row["caption"] or "") for row in reader]


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}, line {n}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ManifestError(f'{path}, line {n}: expected an object with "path" and "caption"')
        pairs.append((row["path"], str(row.get("caption") or "")))
    return pairs


# --------------------------------------------------------------------------- 2. decoding


def decode_clip(path: str, frames: int, height: int, width: int, fps: float) -> np.ndarray:
    """The clip's first `frames` frames at `fps` (for time k / fps the source frame nearest to it),
    scaled to cover height x width and centre-cropped: uint8 (frames, height, width, 3).
    Raises ClipError when the file does not decode or holds fewer frames."""
    import av

    out: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            prev, prev_t, t0 = None, 0.0, None
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n / float(stream.average_rate or fps)
                t0 = t if t0 is None else t0
                t -= t0
                while len(out) < frames and t >= len(out) / fps - 1e-6:
                    tk = len(out) / fps
                    pick = frame if prev is None or abs(t - tk) <= abs(prev_t - tk) else prev
                    out.append(_cover_crop(pick, height, width))
                if len(out) == frames:
                    break
                prev, prev_t = frame, t
    except ClipError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ClipError(f"does not decode ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    if len(out) < frames:
        raise ClipError(f"too short: {len(out)} frames at {fps:g} fps, {frames} needed")
    return np.stack(out)


def _cover_crop(frame, height: int, width: int) -> np.ndarray:
    """The frame scaled (keeping its aspect) to cover height x width, then centre-cropped; RGB uint8."""
    scale = max(height / frame.height, width / frame.width)
    sh, sw = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (sh - height) // 2, (sw - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float32 (B, 3, F, H, W) in [-1, 1] (2 x / 255 - 1, as Wan's processor)."""
    x = torch.as_tensor(frames).to(torch.float32) / 255.0
    return (2.0 * x - 1.0).permute(0, 4, 1, 2, 3).contiguous()


# --------------------------------------------------------------------------- 3. encoding


def vae_factors(vae_config: dict) -> tuple[int, int]:
    """(temporal, spatial) downsampling of an AutoencoderKLWan config (Wan2.1: 4, 8)."""
    temporal = 2 ** sum(bool(t) for t in vae_config.get("temperal_downsample", [False, True, True]))
    spatial = 2 ** (len(vae_config.get("dim_mult", [1, 2, 4, 4])) - 1)
    return temporal, spatial


def latent_shape(vae_config: dict, frames: int, height: int, width: int) -> list[int]:
    """[F', C, H', W'] of a clip's latents; ValueError naming the key when the clip does not fit."""
    temporal, spatial = vae_factors(vae_config)
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames: {frames} is not {temporal}k + 1 (the VAE would silently drop the "
                         f"trailing frames); use e.g. {((max(frames, 2) - 1) // temporal) * temporal + 1}")
    for key, size in (("height", height), ("width", width)):
        if size < spatial or size % spatial:
            raise ValueError(f"{key}: {size} is not a positive multiple of the VAE's spatial factor {spatial}")
    return [(frames - 1) // temporal + 1, int(vae_config.get("z_dim", 16)), height // spatial, width // spatial]


class Encoder:
    """The Wan VAE and the UMT5 text encoder from local diffusers-style folders, on one device."""

    def __init__(self, vae_dir: str | None, text_encoder_dir: str, tokenizer_dir: str, *, max_tokens: int = 512,
                 device: str = "cpu", text_dtype: str = "float32"):
        """`vae_dir` None: the text side only (for the null prompt)."""
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device, self.max_tokens = torch.device(device), max_tokens
        self.text_encoder = UMT5EncoderModel.from_pretrained(text_encoder_dir, local_files_only=True,
                                                             torch_dtype=getattr(torch, text_dtype))
        self.text_encoder.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.vae = None
        if vae_dir is None:
            return
        self.vae = AutoencoderKLWan.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch.float32)
        self.vae.to(self.device).eval()
        z = self.vae.config.z_dim
        self.mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @torch.no_grad()
    def latents(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) -> normalised posterior mode (B, F', C, H', W'), float32 on the CPU."""
        z = self.vae.encode(to_pixels(frames).to(self.device)).latent_dist.mode().float().cpu()
        return ((z - self.mean) / self.std).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def prompt_embeds(self, captions: list[str]) -> torch.Tensor:
        """Captions -> float32 (B, max_tokens, D): the encoder's output up to each prompt's true length,
        zeros after (WanPipeline's `_get_t5_prompt_embeds` with max_sequence_length=max_tokens)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = self.tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=self.max_tokens,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.text_encoder(tok.input_ids.to(self.device), mask).last_hidden_state.float().cpu()
        keep = (torch.arange(self.max_tokens)[None, :] < mask.gt(0).sum(1).cpu()[:, None]).unsqueeze(-1)
        return torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype))
