"""Scorer: the frozen teacher and a critic snapshot; adds the DMD target to a step's rollouts.

    score(i, stage, slice_0, ..., slice_{W-1}) -> (target_0, ..., target_{W-1}, meta)
    target_r = steps.Trajectory(y: rows of rank r of y = x_old - grad; critic version)

The rollout slices arrive as top-level arguments, so Ray resolves them here (the only place
besides the learners that reads trajectory bytes). The DMD noise level and noise are the
step's generator draws (`steps.stage2_draws`), so the target is the reference's. The
critic is pulled from the WeightStore (newest version) before scoring; its version tags the
target. With LoRA the critic is the teacher's weights plus adapters, and a version carries
the adapters only. The metadata also carries the scorer's seconds, bytes, torch threads and
network calls (`teacher_calls`, `critic_calls`: batched calls per step). Launch with
`.options(num_returns=W + 1)`; a plain class, `ray.remote` applied where it is launched.
"""

from __future__ import annotations

import time

import torch
from diffusers import WanTransformer3DModel

from actors.rollout import CallCounter, WeightFollower, adapted, device_for
from pipeline import metrics as M
from pipeline import steps
from pipeline.config import Config
from pipeline.flowmap import losses
from pipeline.flowmap.models import VelocityFn
from pipeline.steps import PromptRows, draws_to


class Scorer(WeightFollower):
    def __init__(self, cfg: Config, store, teacher_config: dict, teacher_state: dict, prompt_embeds: torch.Tensor,
                 null_embed: torch.Tensor, latent_shape: tuple[int, ...], threads: int = 1, gpus: float = 0.0,
                 stage: str = "stage2", reports_restart: bool = True):
        torch.set_num_threads(max(1, threads))
        self.cfg, self.store, self.latent_shape = cfg, store, tuple(latent_shape)
        self.device = device_for(gpus)
        self.teacher = self._frozen(WanTransformer3DModel.from_config(teacher_config))
        self.teacher.load_state_dict(teacher_state)
        # the critic starts as the teacher: with LoRA its base weights are the teacher's
        critic = adapted(cfg, stage, "critic", WanTransformer3DModel.from_config(teacher_config), teacher_state)
        self.critic = self._frozen(critic)
        self.prompts = PromptRows(prompt_embeds.to(self.device), null_embed.to(self.device))
        self.num_rows = len(prompt_embeds)
        self._follow(self.critic, slot=1, reports_restart=reports_restart)

    def _frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, step: int, stage: str, *rollout_slices: dict) -> list:
        """The DMD targets of the step's generator rollouts, sliced per learner rank, then the metadata."""
        t0 = time.perf_counter()
        pull_s = self.pull()
        c = getattr(self.cfg, stage)
        # 1. the step's generator draws (prompts, DMD noise level and noise), identical to the reference's
        gen, _, _ = steps.stage2_draws(self.cfg, stage, step, self.num_rows, self.latent_shape)
        gen = draws_to(gen, self.device)
        x_old = torch.cat([s.x_old for s in rollout_slices]).to(self.device)
        _, cond = self.prompts.batch(gen.index)
        # 2. y = x_old - grad against the teacher (guided) and the critic snapshot
        t_fn, c_fn = CallCounter(VelocityFn(self.teacher)), CallCounter(VelocityFn(self.critic))
        y, figs = losses.dmd_target(t_fn, c_fn, x_old, cond, self.prompts.null_embed, gen.s, gen.eps, c.real_guidance)
        meta = {"step": step, "critic_version": self.version, "score_seconds": time.perf_counter() - t0,
                "score_pull_seconds": pull_s, "bytes": steps.nbytes(y), "teacher_calls": t_fn.calls,
                "critic_calls": c_fn.calls, "score_threads": torch.get_num_threads(), "score_restarted": self._restarted(),
                **{M.DMD_PREFIX + k: v for k, v in figs.items()}}
        self._release_if_on_policy()
        # the target parts: this step's rows of each rank, tagged with the critic version
        return [steps.Trajectory(stage, step, part.rows, part.num_steps, part.k, part.student_version,
                                 critic_version=meta["critic_version"], y=y_r)
                for part, y_r in zip(rollout_slices, steps.split_rows(y, len(rollout_slices)))] + [meta]
