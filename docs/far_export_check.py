"""The exported FAR student of a `--config toy-far` run, sampled through diffusers' AnyFlowFARPipeline
alone (none of this project's samplers), at 1 to 32 steps: fd and motion_error on held-out prompts and
how close each step count lands to the 32-step sample from the same noise (docs/far.md).

    PYTHONPATH=$PWD python docs/far_export_check.py runs/toy-far [num_prompts]
"""

import sys

import torch
from diffusers import AnyFlowFARPipeline

from pipeline.config import load_config
from pipeline.data import toy
from pipeline.evaluate import frechet_distance, motion_error, video_features


def main(run_dir: str, num_prompts: int = 64) -> None:
    world = load_config(f"{run_dir}/config.yaml").data.toy
    pipe = AnyFlowFARPipeline.from_pretrained(f"{run_dir}/student", tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    ids = toy.split_ids(world, "heldout")[:num_prompts]
    data, prompts = toy.render_videos(world, ids)
    cond = toy.embed_prompts(prompts, world)
    reference = video_features(toy.render_videos(world, ids + 10_000)[0])  # other clips of the same world
    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(0))  # (B, F, C, H, W)
    samples = {}
    for n in (1, 2, 4, 8, 16, 32):
        with torch.no_grad():  # the pipeline takes (B, C, F, H, W) latents and pixel-space sizes (VAE: 8x, 4x in time)
            x = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=n,
                     guidance_scale=1.0, output_type="latent", height=8 * world.height, width=8 * world.width,
                     num_frames=4 * world.frames - 3).frames.permute(0, 2, 1, 3, 4)
        samples[n] = x
        feats = video_features(x)
        print(f"{n:2d} steps: fd {frechet_distance(feats, reference):.3f}  "
              f"motion_error {motion_error(feats, prompts):.3f}", flush=True)
    for n in (1, 2, 4, 8, 16):
        print(f"{n:2d} steps: rms to the 32-step sample {float((samples[n] - samples[32]).pow(2).mean().sqrt()):.4f}")
    print(f"data floor ({num_prompts} clips against {num_prompts} others): "
          f"{frechet_distance(video_features(data), reference):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
