"""Tiny Wan encoders and test videos, made in the test (no downloads): a tiny `AutoencoderKLWan`, a tiny
`UMT5EncoderModel` and a word-level tokenizer built with `tokenizers`, saved as local folders the way a
Wan2.1 diffusers checkpoint lays them out (`vae/`, `text_encoder/`, `tokenizer/`); videos written by PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ("a red green blue square circle moving left right up down slowly quickly on the background "
         "bright dark").split()
Z_DIM = 4  # the tiny DiT preset reads 4 latent channels (pipeline/flowmap/models.py SIZE_PRESETS["tiny"])
TEXT_DIM = 16  # ... and prompt embeddings of width 16


def make_encoders(root: Path, seed: int = 0) -> dict[str, str]:
    """Save the tiny VAE, text encoder and tokenizer under `root`; returns their folders by key."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mean = (torch.randn(Z_DIM, generator=gen) * 0.3).tolist()
    std = (torch.rand(Z_DIM, generator=gen) * 1.5 + 0.5).tolist()
    vae = AutoencoderKLWan(base_dim=3, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    vae.save_pretrained(root / "vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(root / "tokenizer")
    config = UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return {k: str(root / k) for k in ("vae", "text_encoder", "tokenizer")}


def moving_square(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (frames, height, width, 3): a coloured square moving over a smooth background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     np.full_like(xx, 60 + 40 * (seed % 4))], -1).astype(np.uint8)
    out = np.repeat(base[None], frames, 0)
    side, color = max(4, height // 4), rng.integers(0, 256, 3)
    for f in range(frames):
        y, x = (2 * f + seed) % (height - side), (3 * f + 2 * seed) % (width - side)
        out[f, y:y + side, x:x + side] = color
    return out


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str = "libx264rgb") -> Path:
    """Write uint8 (F, H, W, 3) frames with PyAV (libx264rgb at crf 0: lossless RGB)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
        if codec.startswith("libx264"):
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
