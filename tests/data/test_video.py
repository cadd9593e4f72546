"""Decoding (PyAV) and encoding (tiny Wan VAE and UMT5) of one clip, without Ray."""

import numpy as np
import pytest
import torch

from pipeline.data import video
from tests.data.tiny_encoders import make_encoders, moving_square, write_video


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return make_encoders(tmp_path_factory.mktemp("wan"))


def test_decode_takes_the_frames_nearest_each_time_at_the_target_fps(tmp_path):
    clip = moving_square(20, 32, 32, seed=3)
    write_video(tmp_path / "v.mp4", clip, fps=16)  # lossless: decoded frames equal the written ones
    assert np.array_equal(video.decode_clip(str(tmp_path / "v.mp4"), 9, 32, 32, fps=16), clip[:9])
    assert np.array_equal(video.decode_clip(str(tmp_path / "v.mp4"), 9, 32, 32, fps=8), clip[0:18:2])
    with pytest.raises(video.ClipError, match="too short: 10 frames at 8 fps, 13 needed"):
        video.decode_clip(str(tmp_path / "v.mp4"), 13, 32, 32, fps=8)


def test_decode_scales_to_cover_and_crops_the_centre(tmp_path):
    # 48 x 96: red | green | blue in columns of 24, 48, 24; to 32 x 32 it is scaled to 32 x 64 and the
    # centre 32 columns are the green half
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:, :24, 0], frame[:, 24:72, 1], frame[:, 72:, 2] = 200, 200, 200
    write_video(tmp_path / "wide.mp4", np.repeat(frame[None], 5, 0), fps=8)
    out = video.decode_clip(str(tmp_path / "wide.mp4"), 5, 32, 32, fps=8)
    assert out.shape == (5, 32, 32, 3)
    assert np.abs(out.astype(int) - [0, 200, 0]).max() <= 2
    full = video.decode_clip(str(tmp_path / "wide.mp4"), 5, 32, 64, fps=8)
    assert np.abs(full[:, :, :14].astype(int) - [200, 0, 0]).max() <= 2
    assert np.abs(full[:, :, 50:].astype(int) - [0, 0, 200]).max() <= 2


def test_a_file_that_is_no_video_is_a_clip_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(video.ClipError, match="does not decode"):
        video.decode_clip(str(tmp_path / "x.mp4"), 5, 32, 32, fps=8)


def test_frames_must_be_4k_plus_1_and_sizes_multiples_of_the_spatial_factor():
    conf = {"temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4], "z_dim": 16}
    assert video.latent_shape(conf, 81, 480, 832) == [21, 16, 60, 104]
    with pytest.raises(ValueError, match="frames: 80 is not 4k \\+ 1 .* use e.g. 77"):
        video.latent_shape(conf, 80, 480, 832)
    with pytest.raises(ValueError, match="height: 484 is not a positive multiple of the VAE's spatial factor 8"):
        video.latent_shape(conf, 81, 484, 832)


def test_pixels_match_wans_video_processor():
    from diffusers.video_processor import VideoProcessor

    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 16, 24, 3), dtype=np.uint8)
    ref = VideoProcessor(vae_scale_factor=8).preprocess_video(list(frames.astype(np.float32) / 255.0))
    torch.testing.assert_close(video.to_pixels(frames), ref, rtol=0, atol=1e-6)


def test_prompt_embeds_equal_wan_pipelines_encode_prompt_at_512_tokens(encoders):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc = video.Encoder(None, encoders["text_encoder"], encoders["tokenizer"])
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(encoders["tokenizer"]),
                       text_encoder=UMT5EncoderModel.from_pretrained(encoders["text_encoder"]), vae=None,
                       scheduler=None)
    prompts = ["a red square moving  left ", "", "bright green circle moving up quickly on the dark background"]
    with torch.no_grad():  # as the pipeline's __call__ runs it
        ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    ours = enc.prompt_embeds(prompts)
    assert ours.shape == (3, 512, 16)
    assert torch.equal(ours, ref)
    lengths = (ours.abs().sum(-1) > 0).sum(1).tolist()
    assert lengths == [6, 1, 11]  # words + </s>; zeros after


def test_latents_are_the_normalised_posterior_mode(encoders, tmp_path):
    from diffusers import AutoencoderKLWan

    clip = moving_square(9, 32, 32, seed=1)
    enc = video.Encoder(encoders["vae"], encoders["text_encoder"], encoders["tokenizer"])
    ours = enc.latents(clip[None])  # (1, F', C, H', W')
    vae = AutoencoderKLWan.from_pretrained(encoders["vae"])
    with torch.no_grad():
        mode = vae.encode(video.to_pixels(clip[None])).latent_dist.mode()  # (1, C, F', H', W')
    # WanPipeline's decode path: latents / (1 / std) + mean is what the VAE decodes
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    assert ours.shape == (1, 3, 4, 4, 4)
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4) / inv_std + mean, mode, rtol=1e-5, atol=1e-6)
