"""`pipeline.prepare` on the shared local Ray: tiny Wan encoders and PyAV videos made here; one prepared
dataset (stopped after its first chunk and started again) shared by the module's tests."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from pipeline import prepare
from pipeline.data import schema, video
from tests.data.tiny_encoders import make_encoders, moving_square, write_video

pytestmark = pytest.mark.ray

CAPTIONS = ["a red square moving left", "a blue circle moving up", "bright green square moving down slowly"]
GOOD = 9
FRAMES, SIZE, FPS = 13, 64, 8  # latents 4 x 4 x 8 x 8: what the tiny DiT of the smoke preset reads


class Stop(Exception):
    """Stands for a crash or a kill after the first committed chunk."""


def _videos(root):
    """9 usable clips (16 frames at 8 fps, 64 x 80, scaled and cropped to 64 x 64) and three unusable ones."""
    vids = root / "videos"
    vids.mkdir()
    clips = {}
    for i in range(GOOD):
        clips[f"clip{i}"] = moving_square(16, SIZE, 80, seed=i)
        write_video(vids / f"clip{i}.mp4", clips[f"clip{i}"], FPS)
        (vids / f"clip{i}.txt").write_text(CAPTIONS[i % 3])
    (vids / "broken.mp4").write_bytes(b"\x00 this is no video" * 20)
    (vids / "broken.txt").write_text("a red square")
    write_video(vids / "short.mp4", moving_square(10, SIZE, SIZE, seed=20), FPS)
    (vids / "short.txt").write_text("a blue square")
    write_video(vids / "uncaptioned.mp4", moving_square(16, SIZE, SIZE, seed=21), FPS)
    (vids / "uncaptioned.txt").write_text("  \n")
    return vids, clips


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    enc = make_encoders(root / "wan")
    vids, clips = _videos(root)
    cfg = prepare.load(None, [f"videos={vids}", f"output={root / 'data'}", f"vae={enc['vae']}",
                              f"text_encoder={enc['text_encoder']}", f"tokenizer={enc['tokenizer']}",
                              f"frames={FRAMES}", f"height={SIZE}", f"width={SIZE}", f"fps={FPS}", "heldout=3",
                              "shard_rows=4", "ray.encode_cpus=1", "ray.decode_cpus=0.5"])

    def stop(seen):
        raise Stop(seen)

    with pytest.raises(Stop):
        prepare.prepare(cfg, on_chunk=stop)
    staging = root / "data" / prepare.STAGING
    first = sorted(p.name for p in staging.glob("chunk-*"))
    # a kill in the middle of the next chunk: its rows half-written, no commit mark
    shutil.copy(staging / "chunk-00000.parquet", staging / "chunk-00001.parquet")
    (staging / "chunk-00002.parquet.tmp").write_bytes(b"PAR1 half")
    resumed = []
    out = prepare.prepare(cfg, on_chunk=resumed.append)
    return {"out": out, "cfg": cfg, "enc": enc, "clips": clips, "first": first, "resumed": resumed,
            "manifest": video.read_manifest(vids)}


def _rows(out):
    return {s: schema.read_split(out, s) for s in schema.SPLITS}


def test_a_run_stopped_after_a_chunk_and_started_again_has_every_clip_once(prepared):
    assert prepared["first"] == ["chunk-00000.json", "chunk-00000.parquet"]
    assert prepared["resumed"] == [4, 8]  # the 12 - 4 clips not staged by the first run
    summary = schema.validate_dataset(prepared["out"])  # also: ids unique across the splits
    rows = _rows(prepared["out"])
    ids = sorted(torch.cat([rows[s].sample_ids for s in schema.SPLITS]).tolist())
    usable = [c.sample_id for c in prepared["manifest"] if c.path.split("/")[-1].startswith("clip")]
    assert ids == usable and len(usable) == GOOD
    assert summary["splits"]["heldout"]["rows"] == 3 and summary["splits"]["train"]["rows"] == GOOD - 3
    assert summary["latent_shape"] == [4, 4, 8, 8] and summary["embed_shape"] == [512, 16]
    assert not (prepared["out"] / prepare.STAGING).exists()


def test_unusable_clips_are_skipped_and_listed_with_their_reasons(prepared):
    skipped = [json.loads(line) for line in (prepared["out"] / prepare.SKIPPED_FILE).read_text().splitlines()]
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in skipped}
    assert set(reasons) == {"broken.mp4", "short.mp4", "uncaptioned.mp4"}
    assert reasons["broken.mp4"].startswith("does not decode")
    assert reasons["short.mp4"] == "too short: 10 frames at 8 fps, 13 needed"
    assert reasons["uncaptioned.mp4"] == "empty caption"
    assert schema.read_meta(prepared["out"])["skipped"] == 3


def test_embeddings_equal_wan_pipelines_and_latents_the_normalised_posterior_mode(prepared):
    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusers.video_processor import VideoProcessor
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc = prepared["enc"]
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(enc["tokenizer"]), vae=None, scheduler=None,
                       text_encoder=UMT5EncoderModel.from_pretrained(enc["text_encoder"]))
    vae = AutoencoderKLWan.from_pretrained(enc["vae"])
    z = vae.config.z_dim
    mean, std = (torch.tensor(vae.config[k]).view(1, z, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    for split, data in _rows(prepared["out"]).items():
        with torch.no_grad():
            # one prompt per call, as the encoder actor ran them; another process and thread count than the
            # actor's, so equal up to float rounding (tests/data/test_video.py checks bitwise equality in-process)
            ref = torch.cat([pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=512,
                                                device="cpu")[0] for p in data.prompts])
            torch.testing.assert_close(data.prompt_embeds, ref, rtol=1e-5, atol=1e-6)
            assert torch.equal(data.prompt_embeds == 0, ref == 0), split  # zeros exactly past each prompt
            # the clip as written (lossless), its first 13 frames at 8 fps, through diffusers' own video processor
            frames = [prepared["clips"][src.split("/")[-1][:-4]][:FRAMES, :, 8:72] for src in data.sources]
            pixels = VideoProcessor(vae_scale_factor=8).preprocess_video(list(np.stack(frames) / 255.0))
            mode = vae.encode(pixels.float()).latent_dist.mode()
        torch.testing.assert_close(data.latents.permute(0, 2, 1, 3, 4), (mode - mean) / std, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        null, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    torch.testing.assert_close(schema.read_null_embed(prepared["out"]), null[0], rtol=1e-5, atol=1e-6)


def test_a_rows_latents_decode_to_its_clip_within_the_vaes_own_error(prepared):
    """The tiny VAE is untrained, so its error is large: `mse(decode(mode(encode(clip))), clip)`. Decoding a
    row (denormalised as WanPipeline does) must give that same video, hence that same error."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(prepared["enc"]["vae"])
    z = vae.config.z_dim
    mean, std = (torch.tensor(vae.config[k]).view(1, z, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    data = _rows(prepared["out"])["train"].slice(0, 2)
    frames = np.stack([prepared["clips"][s.split("/")[-1][:-4]][:FRAMES, :, 8:72] for s in data.sources])
    pixels = video.to_pixels(frames)
    with torch.no_grad():
        from_row = vae.decode(data.latents.permute(0, 2, 1, 3, 4) * std + mean).sample
        round_trip = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    vae_error = ((round_trip - pixels) ** 2).mean().item()
    row_error = ((from_row - pixels) ** 2).mean().item()
    assert abs(row_error - vae_error) <= 1e-4 * vae_error
    torch.testing.assert_close(from_row, round_trip, rtol=1e-4, atol=1e-4)


def test_pipeline_run_on_ray_trains_every_stage_on_the_prepared_dataset_and_says_what_ran(prepared, tmp_path,
                                                                                        capsys):
    """Every stage with `ray.backend=ray` on the prepared rows: the on-policy stages on the fleet inside a
    normal run, all in the first stage's Ray session, evaluated and exported."""
    from pipeline.config import load_config
    from pipeline.evaluate import read_eval
    from pipeline.metrics import LAG_MAX, read_metrics
    from pipeline.stages import run_stages
    from tests.ray.conftest import TINY

    keep = [o for o in TINY if not o.startswith("data.")]
    cfg = load_config(None, [*keep, f"data.path={prepared['out']}", f"run.output_dir={tmp_path}", "run.name=mine",
                             "run.track=false", "teacher.steps=3", "teacher.batch_size=4", "stage1.steps=2",
                             "stage1.batch_size=4", "stage2.steps=2", "consistency.steps=2",
                             "consistency.batch_size=4", "consistency.num_steps_choices=[1, 2]",
                             "eval.num_samples=4", "eval.steps=[1, 2]", "eval.ode_ref_steps=2",
                             "eval.video_prompts=0", "run.stages=[teacher, stage1, stage2, consistency, eval, export]"])
    run_dir = run_stages(cfg)
    records = read_metrics(run_dir / "metrics.jsonl")
    for stage in ("stage2", "consistency"):
        assert [r["step"] for r in records if r["stage"] == stage] == [0, 1], stage
        assert all(r[LAG_MAX] == 0 for r in records if r["stage"] == stage)
    assert set(read_eval(run_dir)["models"]) == {"teacher", "student_stage1", "student", "consistency", "data"}
    assert (run_dir / "student" / "model_index.json").is_file()
    _assert_console_tells_what_ran_on_ray(capsys.readouterr().out, ["teacher", "stage1", "stage2", "consistency"])


def _assert_console_tells_what_ran_on_ray(out: str, stages: list[str]) -> None:
    """Every stage trains in the first stage's Ray session: the first stage's line names the stages it ran
    and each one's seconds, and each later stage's line repeats its own (not "done in 0s" alone)."""
    times = ", ".join(rf"{s} (\d+)s" for s in stages)
    first = re.search(rf"^== {stages[0]} done in (\d+)s: one Ray session trained {', '.join(stages)} \(learner "
                      rf"start-up (\d+)s, {times}\)$", out, re.M)
    assert first, out
    total, startup, *each = map(int, first.groups())
    assert startup + sum(each) <= total + len(stages)  # parts of the first stage's time, each rounded to a second
    for stage, seconds in zip(stages[1:], each[1:]):
        assert re.search(rf"^== {stage} done in \d+s: trained in the Ray session above, in {seconds}s$", out, re.M), out
