"""RolloutScorer: the rollout and scorer roles colocated in one actor (`ray.colocate=true`).

For small models the two roles need not be two processes: one actor holds the student, the
frozen teacher and the critic snapshot, and makes a step's rollouts and their DMD targets in
one call. Nothing passes between roles through the object store, and on a machine with few
cores the fleet is one busy process instead of two that preempt the learners. The work and its
results are exactly those of `RolloutWorker.rollout` followed by `Scorer.score` (the same
classes run inside), so a colocated fleet trains the same steps as a split one.

Each role still follows the WeightStore itself (student and critic versions are pulled before
each call). A plain class; `ray.remote` is applied where it is launched; launch its call with
`.options(num_returns=2 * W + 2)`.
"""

from __future__ import annotations

import torch

from actors.rollout import RolloutWorker
from actors.scorer import Scorer
from pipeline.config import Config


class RolloutScorer:
    def __init__(self, cfg: Config, store, student_config: dict, teacher_config: dict, teacher_state: dict,
                 prompt_embeds: torch.Tensor, null_embed: torch.Tensor, latent_shape: tuple[int, ...],
                 threads: int = 1, gpus: float = 0.0, stage: str = "stage2", base_state: dict | None = None):
        self.roller = RolloutWorker(cfg, store, student_config, prompt_embeds, null_embed, latent_shape, threads,
                                    gpus, stage, base_state)
        # one actor: a restart is reported once, by the rollout role
        self.scorer = Scorer(cfg, store, teacher_config, teacher_state, prompt_embeds, null_embed, latent_shape,
                             threads, gpus, stage, reports_restart=False)

    def rollout_and_score(self, step: int, stage: str, num_learners: int) -> list:
        """W rollout slices, W target slices, then the rollout and the score metadata."""
        *slices, rollout_meta = self.roller.rollout(step, stage, num_learners)
        *targets, score_meta = self.scorer.score(step, stage, *slices)
        return [*slices, *targets, rollout_meta, score_meta]
