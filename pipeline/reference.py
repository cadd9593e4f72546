"""The whole algorithm in one process: the correctness oracle of the Ray pipeline.

Stage 0 trains the teacher by flow matching, stage 1 the student by forward flow-map
training, stage 2 runs on-policy distillation (Flow Map Backward Simulation, DMD against
the teacher and a critic, co-training, EMA). `consistency` is the baseline: the stage-1
student trained on with consistency rollouts and endpoint-only co-training, sampled with
re-noising. Every random draw comes from `pipeline.flowmap.draws` as a function of
(seed, stage, step), so the Ray pipeline can reproduce any step exactly.

This module is the loop only: what a step is (its draws, rollouts, settings, LoRA choices) is
`pipeline/steps.py`, which the Ray roles (actors/, learners/) are built from too.
"""

from __future__ import annotations

import copy
import time

import torch

from pipeline import metrics as M
from pipeline.config import Config, OptimConfig, Stage2Config
from pipeline.flowmap import lora, losses, models
from pipeline.flowmap.models import VelocityFn
from pipeline.flowmap.optim import EMA, clip_grads, optimizer_from
from pipeline.guard import StepGuard
from pipeline.steps import (Log, TrainData, far_student_from, grad_calls_of, lora_of, prepared, stage2_draws,
                            student_loss, student_rollout, supervised_draws, with_adapters)


class Trainee:
    """A model with its optimiser, warm-up schedule, EMA and bad-step guard."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, guard: StepGuard | None = None):
        self.model = lora.mark_trainable(model)  # every parameter, or only the LoRA adapters if it has any
        self.cfg = optim
        self.opt, self.sched = optimizer_from(model.parameters(), optim)
        self.ema = EMA(model, optim.ema, optim.ema_start)
        self.guard = guard or StepGuard("training")
        self.step = 0

    def apply(self, loss: torch.Tensor, step: int, **batch: torch.Tensor | None) -> float:
        """Step `step`: backward, clip, optimiser and schedule step, EMA; returns the pre-clip
        gradient norm (NaN if the step was skipped before backward).

        A bad step (non-finite `batch` tensor or loss: no backward; non-finite gradient norm:
        no update) is skipped and counted by the guard (`self.guard.figures()`), which raises
        TooManyBadSteps after run.max_bad_steps in a row.
        """
        norm = float("nan")
        ok = self.guard.check(loss, **batch)
        if ok:
            loss.backward()
            _zero_unused_grads(self.model)
            norm = clip_grads(self.model, self.cfg.grad_clip)
            ok = self.guard.check_grad_norm(norm)
            if ok:
                self.opt.step()
                self.sched.step()
                self.ema.update(self.model, step)
        self.opt.zero_grad(set_to_none=True)
        self.step = step + 1
        self.guard.record(step, ok)
        return norm


def _zero_unused_grads(model: torch.nn.Module) -> None:
    """A zero gradient for every trainable parameter the loss did not reach (a causal student's
    far_patch_embedding in a step without compressed context), as DeepSpeed has it: AdamW then decays its
    moments and counts the step for it too, instead of skipping it (its bias correction would otherwise
    differ from the learners', by up to sqrt(2) lr in the next update)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _guard(cfg: Config, stage: str, critic: bool = False) -> StepGuard:
    if critic:
        return StepGuard(f"{stage} critic", cfg.run.max_bad_steps, (M.CRITIC_SKIPPED_STEPS, M.CRITIC_BAD_IN_A_ROW))
    return StepGuard(stage if stage == "teacher" else f"{stage} student", cfg.run.max_bad_steps)


def _timed(log: Log, stage: str, step: int, figures: dict, t0: float) -> None:
    figures[M.STEP_SECONDS] = time.perf_counter() - t0
    log(stage, step, figures)


# ----------------------------------------------------------------------------- stage 0


def train_teacher(cfg: Config, data: TrainData, log: Log) -> torch.nn.Module:
    """Flow matching of a freshly initialised Wan teacher; returns its EMA weights."""
    c = cfg.teacher
    trainee = Trainee(models.build_teacher(cfg.model.size, seed=cfg.model.init_seed), c.optim, _guard(cfg, "teacher"))
    v_fn = VelocityFn(trainee.model)
    for step in range(c.steps):
        t0 = time.perf_counter()
        # 1. draws: rows, t logit-normal and shifted, noise, prompt dropout
        d = supervised_draws(cfg, "teacher", step, len(data.latents), data.latent_shape)
        x, cond = data.batch(d.index, d.drop)
        # 2. flow matching loss and update
        loss = losses.flow_matching_loss(v_fn, x, cond, d.t, d.eps)
        norm = trainee.apply(loss, step, x=x, cond=cond)
        _timed(log, "teacher", step, {M.LOSS_TEACHER: loss.item(), M.GRAD_NORM_TEACHER: norm,
                                      **trainee.guard.figures()}, t0)
    return trainee.ema.model


# ----------------------------------------------------------------------------- stage 1


def train_stage1(cfg: Config, teacher: torch.nn.Module, data: TrainData, log: Log) -> torch.nn.Module:
    """Forward flow-map training of the converted student on data; returns its EMA weights. With
    model.causal the student is the FAR model converted from the teacher, trained teacher-forced."""
    c = cfg.stage1
    student = far_student_from(cfg, teacher) if cfg.model.causal else models.student_from_teacher(teacher)
    trainee = Trainee(student, c.optim, _guard(cfg, "stage1"))
    for step in range(c.steps):
        t0 = time.perf_counter()
        # 1. draws: rows, (t, r) pairs partitioned by index, noise, prompt dropout (causal: number of chunks)
        d = supervised_draws(cfg, "stage1", step, len(data.latents), data.latent_shape)
        x, cond = data.batch(d.index, d.drop)
        # 2. MeanFlow target with guidance fusion, weighting, rescaling; update
        loss, figs = student_loss(cfg, trainee.model, x, cond, data.null_embed, d, "stage1", step)
        norm = trainee.apply(loss, step, x=x, cond=cond)
        extra = {M.FAR_NUM_CHUNKS: figs["num_chunks"]} if "num_chunks" in figs else {}
        _timed(log, "stage1", step, {M.LOSS_STAGE1: loss.item(), M.LOSS_STAGE1_DIAG: figs["loss_diag"],
                                     M.LOSS_STAGE1_FREE: figs["loss_free"], M.GRAD_NORM_STUDENT: norm, **extra,
                                     **trainee.guard.figures()}, t0)
    return trainee.ema.model


# ----------------------------------------------------------------------------- stage 2


def train_stage2(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module,
                 data: TrainData, log: Log) -> tuple[torch.nn.Module, torch.nn.Module]:
    """On-policy distillation (`stage2`) or the consistency baseline (`consistency`).

    Returns (student EMA, critic); with LoRA (`lora_rank` > 0) both train adapters only and come back
    merged into plain diffusers models.
    """
    c: Stage2Config = getattr(cfg, stage)
    consistency = stage == "consistency"
    gen_t = Trainee(with_adapters(cfg, stage, "student", prepared(cfg, copy.deepcopy(student))), c.optim,
                    _guard(cfg, stage))
    critic_t = Trainee(with_adapters(cfg, stage, "critic", copy.deepcopy(teacher)), c.critic_optim,
                       _guard(cfg, stage, critic=True))
    teacher = teacher.eval().requires_grad_(False)
    t_fn, c_fn = VelocityFn(teacher), VelocityFn(critic_t.model)
    calls = grad_calls_of(c)
    dmd = losses.DMDSettings(c.real_guidance, c.dmd_min_s, c.dmd_max_s, c.dmd_weight)
    for step in range(c.steps):
        t0 = time.perf_counter()
        gen, crit, co = stage2_draws(cfg, stage, step, len(data.latents), data.latent_shape)
        # 1. the critic's rollouts, by the student as it is at the start of the step
        with torch.no_grad():
            x_crit = student_rollout(cfg, gen_t.model, data, crit, consistency, calls)
        # 2. generator: backward simulation with gradient, DMD against teacher and critic
        x_hat = student_rollout(cfg, gen_t.model, data, gen, consistency, calls)
        _, cond = data.batch(gen.index)
        loss_dmd, figs = losses.dmd_generator_loss(x_hat, t_fn, c_fn, cond, data.null_embed, gen.s, gen.eps, dmd)
        # 3. co-training: the stage-1 loss on a real-data batch
        loss = loss_dmd
        loss_co = torch.zeros(())
        x = cond_co = None
        if c.cotrain_weight > 0:
            x, cond_co = data.batch(co.index, co.drop)
            loss_co, _ = student_loss(cfg, gen_t.model, x, cond_co, data.null_embed, co, stage, step)
            loss = loss + c.cotrain_weight * loss_co
        norm = gen_t.apply(loss, step, rollout=x_hat, cond=cond, x=x, cond_co=cond_co)
        # 4. critic: flow matching on the (detached) rollouts of step 1
        _, cond_c = data.batch(crit.index)
        loss_critic = losses.flow_matching_loss(c_fn, x_crit, cond_c, crit.s, crit.eps)
        critic_t.apply(loss_critic, step, rollout=x_crit, cond=cond_c)
        _timed(log, stage, step, {M.LOSS_DMD: loss_dmd.item(), M.LOSS_COTRAIN: loss_co.item(),
                                  M.LOSS_STUDENT: loss.item(), M.LOSS_CRITIC: loss_critic.item(),
                                  M.GRAD_NORM_STUDENT: norm, M.ROLLOUT_NUM_STEPS: gen.num_steps,
                                  M.ROLLOUT_K: gen.k, **{M.DMD_PREFIX + k: v for k, v in figs.items()},
                                  **gen_t.guard.figures(), **critic_t.guard.figures()}, t0)
    if lora_of(c) is None:
        return gen_t.ema.model, critic_t.model
    return lora.merged(gen_t.ema.model).eval(), lora.merged(critic_t.model).eval()
