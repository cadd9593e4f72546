"""fd of perfect but (partly) motionless toy clips against the held-out set (docs/toy-world.md).

    PYTHONPATH=$PWD python docs/toy_frozen_fd.py [TRAVEL]

A held-out-sized sample of the world (the data row's sample ids) is rendered again with every clip's
travel scaled by 0, 0.25, 0.5, 0.75 and 1 (colour, shape, size, position exact), and scored with the
pipeline's own `video_features`, `frechet_distance` and `motion_error`: how far a generator that is
perfect except for its motion can get on fd.
"""
import sys

import numpy as np
import torch

from pipeline import evaluate as ev
from pipeline.data import toy

torch.set_num_threads(1)
world = toy.ToyWorldConfig(travel=float(sys.argv[1]) if len(sys.argv) > 1 else 0.4)
held, _ = toy.render_videos(world, toy.split_ids(world, "heldout"))
held_feats = ev.video_features(held)
ids = world.num_train + world.num_heldout + np.arange(world.num_heldout)
params = toy._clip_params(world, ids)
prompts = toy._prompts(params)
print(f"travel {world.travel}")
for scale in (0.0, 0.25, 0.5, 0.75, 1.0):
    feats = ev.video_features(toy._render(world, {**params, "travel": params["travel"] * scale}))
    print(f"travel x{scale:<4}  fd {ev.frechet_distance(feats, held_feats):7.2f}  "
          f"motion_error {ev.motion_error(feats, prompts):.2f}")
