"""Where a toy teacher's fd comes from, and which way its samples move (docs/toy-world.md).

    PYTHONPATH=$PWD python docs/toy_teacher_parts.py RUN_DIR [STEPS]     # STEPS: e.g. 1,32 (default 32)

Loads RUN_DIR/teacher and RUN_DIR/config.yaml (a run with the `teacher` stage), samples it from eval's
own noise and held-out prompts (`eval.num_samples` of them, guided Euler as in `eval`), and prints for
each step count:

* the eight largest one-dimensional Frechet terms, ``(mean_a - mean_b)^2 + (std_a - std_b)^2``, of
  `pipeline.evaluate.video_features` against the held-out clips (fd is not their sum, since it also
  sees the features' covariance, but it moves with them);
* the motion confusion: the prompt's motion against the one `motion_class` reads from the sample,
  and of the moving prompts how many move along the right axis and, of those, in the right direction.
"""
import collections
import sys
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from pipeline import evaluate as ev
from pipeline import sampling
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split
from pipeline.flowmap import draws
from pipeline.stages import prepare_data

MOTIONS = ("left", "right", "up", "down", "still")
AXIS = {"left": "x", "right": "x", "up": "y", "down": "y", "still": "-"}

run = Path(sys.argv[1])
step_counts = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "32").split(",")]
cfg = load_config(str(run / "config.yaml"))
teacher = WanTransformer3DModel.from_pretrained(run / "teacher").eval()
data_dir = prepare_data(cfg)
held, null = read_split(data_dir, "heldout"), read_null_embed(data_dir)
n = min(cfg.eval.num_samples, len(held))
sample = sampling.samplers(cfg, {"teacher": teacher}, null[None] if null.ndim == 2 else null)["teacher"]
noise = torch.randn((n, *held.latents.shape[1:]), generator=draws.generator(cfg.run.seed, "eval", 0))
cond, prompts = held.prompt_embeds[:n], held.prompts[:n]
data = ev.video_features(held.latents[:n])
names = ev.feature_names(held.latents.shape[2])
wanted = ev.prompt_motions(prompts)
for num_steps in step_counts:
    x = sampling._batched(lambda z, c: sample(z, c, num_steps), noise, cond, cfg.eval.batch_size)
    feats = ev.video_features(x)
    terms = (feats.mean(0) - data.mean(0)) ** 2 + (feats.std(0) - data.std(0)) ** 2
    top = terms.argsort(descending=True)[:8]
    print(f"{num_steps} steps: fd {ev.frechet_distance(feats, data):.2f}, motion_error "
          f"{ev.motion_error(feats, prompts):.3f}; largest terms: "
          + ", ".join(f"{names[i]} {terms[i]:.2f}" for i in top))
    seen = ev.motion_class(feats[:, [names.index("vel_x"), names.index("vel_y")]] * ev.GEOMETRY_UNIT)
    pairs = collections.Counter(zip(wanted, seen))
    for want in MOTIONS:
        print(f"  prompt {want:5s} -> " + ", ".join(f"{got} {pairs[want, got]}" for got in MOTIONS if pairs[want, got]))
    moving = [(w, s) for w, s in zip(wanted, seen) if w != "still"]
    on_axis = [(w, s) for w, s in moving if AXIS[w] == AXIS[s]]
    print(f"  moving prompts {len(moving)}: on the right axis {len(on_axis)}, of those the right way "
          f"{sum(w == s for w, s in on_axis)}")
