"""What travels through the object store in the on-policy stage: keys and per-learner slicing.

A step's rollout is made for the whole global batch by one rollout actor and one scorer,
then cut into one slice per learner rank *before* it is put in the object store (rank r
gets rows [r*B/W, (r+1)*B/W)), so each learner fetches only its own rows:

    rollout slice (RolloutWorker.rollout): {X_OLD, X_CRIT, META}
    target slice  (Scorer.score):          {Y, META}

The noise, N, k and DMD draws are not stored: every party regenerates them from
(seed, stage, step) with `reference.stage2_draws` (pipeline/flowmap/draws.py).
"""

from __future__ import annotations

import torch

X_OLD = "x_old"
"""the detached generator rollout made by student version META["student_version"]"""
X_CRIT = "x_crit"
"""the detached critic rollout (its own N, k and noise)"""
Y = "y"
"""the DMD target y = x_old - grad (teacher + critic version META["critic_version"])"""
META = "meta"
"""small dict: step, num_steps, k, versions, creation time, seconds"""


def rank_rows(batch: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank` among `world` equal data-parallel slices of `batch` rows."""
    if batch % world:
        raise ValueError(f"a batch of {batch} rows does not split evenly over {world} learners")
    per = batch // world
    return rank * per, (rank + 1) * per


def split_rows(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """`x` cut into `world` row slices, each a compact copy (a pickled view would carry all rows)."""
    return [x[slice(*rank_rows(x.shape[0], world, r))].detach().cpu().clone() for r in range(world)]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
