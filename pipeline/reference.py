"""The whole algorithm in one process: the correctness oracle of the Ray pipeline.

Stage 0 trains the teacher by flow matching, stage 1 the student by forward flow-map
training, stage 2 runs on-policy distillation (Flow Map Backward Simulation, DMD against
the teacher and a critic, co-training, EMA). `consistency` is the baseline: the stage-1
student trained on with consistency rollouts and endpoint-only co-training, sampled with
re-noising. Every random draw comes from `pipeline.flowmap.draws` as a function of
(seed, stage, step), so the Ray pipeline can reproduce any step exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline import metrics as M
from pipeline.config import Config, OptimConfig, Stage2Config
from pipeline.data.schema import LatentDataset
from pipeline.flowmap import draws, lora, losses, models
from pipeline.flowmap.models import StudentFn, VelocityFn
from pipeline.flowmap.optim import EMA, clip_grads, optimizer_from
from pipeline.flowmap.schedule import PairFractions
from pipeline.flowmap.simulate import GradCalls, backward_simulate, consistency_backward_simulate
from pipeline.guard import StepGuard

Log = Callable[[str, int, dict], None]
"""log(stage, step, figures): where the stages report per-step figures."""

ENDPOINT_ONLY = PairFractions(diffusion=0.5, endpoint=0.5)
"""the consistency baseline's co-training pairs: no free r, only r = t and r = 0"""


@dataclass
class TrainData:
    """The train split in memory, plus the null-prompt embedding."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    null_embed: torch.Tensor

    @classmethod
    def from_dataset(cls, ds: LatentDataset, null_embed: torch.Tensor) -> "TrainData":
        return cls(ds.latents, ds.prompt_embeds, null_embed[None])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None):
        x, cond = self.latents[index], self.prompt_embeds[index]
        if drop is not None:
            cond = losses.drop_prompts(cond, self.null_embed, drop)
        return x, cond


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
        # 1. draws: rows, t logit-normal and shifted (the teacher's own training shift), noise, prompt dropout
        d = draws.data_draws(cfg.run.seed, "teacher", step, c.batch_size, len(data.latents), data.latent_shape,
                             c.train_shift(cfg.model.shift), cfg.data.cond_dropout, None, c.t_mean)
        x, cond = data.batch(d.index, d.drop)
        # 2. flow matching loss and update
        loss = losses.flow_matching_loss(v_fn, x, cond, d.t, d.eps)
        norm = trainee.apply(loss, step, x=x, cond=cond)
        _timed(log, "teacher", step, {M.LOSS_TEACHER: loss.item(), M.GRAD_NORM_TEACHER: norm,
                                      **trainee.guard.figures()}, t0)
    return trainee.ema.model


# ----------------------------------------------------------------------------- stage 1


def stage1_settings(cfg: Config) -> losses.Stage1Settings:
    return losses.Stage1Settings(guidance=cfg.stage1.guidance, fd_step=cfg.stage1.fd_step, shift=cfg.model.shift)


def stage1_fractions(cfg: Config) -> PairFractions:
    return PairFractions(cfg.stage1.diffusion_fraction, cfg.stage1.endpoint_fraction)


def train_stage1(cfg: Config, teacher: torch.nn.Module, data: TrainData, log: Log) -> torch.nn.Module:
    """Forward flow-map training of the converted student on data; returns its EMA weights."""
    c = cfg.stage1
    trainee = Trainee(models.student_from_teacher(teacher), c.optim, _guard(cfg, "stage1"))
    u_fn, settings = StudentFn(trainee.model), stage1_settings(cfg)
    for step in range(c.steps):
        t0 = time.perf_counter()
        # 1. draws: rows, (t, r) pairs partitioned by index, noise, prompt dropout
        d = draws.data_draws(cfg.run.seed, "stage1", step, c.batch_size, len(data.latents), data.latent_shape,
                             cfg.model.shift, cfg.data.cond_dropout, stage1_fractions(cfg))
        x, cond = data.batch(d.index, d.drop)
        # 2. MeanFlow target with guidance fusion, weighting, rescaling; update
        loss, figs = losses.forward_flowmap_loss(u_fn, x, cond, data.null_embed, d.t, d.r, d.eps, settings)
        norm = trainee.apply(loss, step, x=x, cond=cond)
        _timed(log, "stage1", step, {M.LOSS_STAGE1: loss.item(), M.LOSS_STAGE1_DIAG: figs["loss_diag"],
                                     M.LOSS_STAGE1_FREE: figs["loss_free"], M.GRAD_NORM_STUDENT: norm,
                                     **trainee.guard.figures()}, t0)
    return trainee.ema.model


# ----------------------------------------------------------------------------- stage 2


def rollout(u_fn, data: TrainData, r: draws.RolloutDraws, shift_k: float, consistency: bool,
            grad_calls: GradCalls):
    """The on-policy sample of a rollout draw: backward simulation (or the consistency rollout)."""
    _, cond = data.batch(r.index)
    if consistency:
        return consistency_backward_simulate(u_fn, r.noise, cond, r.num_steps, r.k, shift_k, r.renoise,
                                             grad=grad_calls.shortcut_out)
    return backward_simulate(u_fn, r.noise, cond, r.num_steps, r.k, shift_k, grad_calls)


def stage2_draws(cfg: Config, stage: str, step: int, num_rows: int, latent_shape):
    """(generator rollouts, critic rollouts, co-training batch) of one stage-2 step."""
    c: Stage2Config = getattr(cfg, stage)
    consistency = stage == "consistency"
    common = dict(seed=cfg.run.seed, stage=stage, step=step, batch=c.batch_size, num_rows=num_rows,
                  latent_shape=latent_shape, shift_k=cfg.model.shift, num_steps_choices=c.num_steps_choices,
                  min_s=c.dmd_min_s, max_s=c.dmd_max_s, consistency=consistency)
    gen = draws.rollout_draws(**common, stream=1)
    crit = draws.rollout_draws(**common, logit_normal_s=True, stream=2)
    fractions = ENDPOINT_ONLY if consistency else stage1_fractions(cfg)
    co = draws.data_draws(cfg.run.seed, stage, step, c.batch_size, num_rows, latent_shape, cfg.model.shift,
                          cfg.data.cond_dropout, fractions)
    return gen, crit, co


def grad_calls_of(c: Stage2Config) -> GradCalls:
    return GradCalls(**{name: name in c.grad_calls for name in ("shortcut_in", "real_step", "shortcut_out")})


def lora_of(c: Stage2Config) -> lora.LoraSettings | None:
    """The stage's LoRA settings, or None when it trains every parameter (`lora_rank` 0)."""
    if c.lora_rank == 0:
        return None
    return lora.LoraSettings(c.lora_rank, c.lora_alpha or float(c.lora_rank), tuple(c.lora_targets))


def lora_for(cfg: Config, stage: str, network: str) -> tuple[lora.LoraSettings | None, torch.Generator | None]:
    """(settings, generator of the adapters' initialisation) of `network` (student or critic) in `stage`,
    or (None, None) without LoRA. The initialisation is a function of (seed, stage, network), so every
    process that builds the adapters (reference, learners, actors) builds the same ones."""
    settings = lora_of(getattr(cfg, stage))
    if settings is None:
        return None, None
    return settings, lora.init_generator(cfg.run.seed, stage, network)


def with_adapters(cfg: Config, stage: str, network: str, model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the stage's LoRA adapters added (`lora_for`), or unchanged without LoRA."""
    settings, gen = lora_for(cfg, stage, network)
    return model if settings is None else lora.add_adapters(model, settings, gen)


def train_stage2(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module,
                 data: TrainData, log: Log) -> tuple[torch.nn.Module, torch.nn.Module]:
    """On-policy distillation (`stage2`) or the consistency baseline (`consistency`).

    Returns (student EMA, critic); with LoRA (`lora_rank` > 0) both train adapters only and come back
    merged into plain diffusers models.
    """
    c: Stage2Config = getattr(cfg, stage)
    consistency = stage == "consistency"
    gen_t = Trainee(with_adapters(cfg, stage, "student", copy.deepcopy(student)), c.optim, _guard(cfg, stage))
    critic_t = Trainee(with_adapters(cfg, stage, "critic", copy.deepcopy(teacher)), c.critic_optim,
                       _guard(cfg, stage, critic=True))
    teacher = teacher.eval().requires_grad_(False)
    u_fn, t_fn, c_fn = StudentFn(gen_t.model), VelocityFn(teacher), VelocityFn(critic_t.model)
    settings, calls = stage1_settings(cfg), grad_calls_of(c)
    dmd = losses.DMDSettings(c.real_guidance, c.dmd_min_s, c.dmd_max_s, c.dmd_weight)
    for step in range(c.steps):
        t0 = time.perf_counter()
        gen, crit, co = stage2_draws(cfg, stage, step, len(data.latents), data.latent_shape)
        # 1. the critic's rollouts, by the student as it is at the start of the step
        with torch.no_grad():
            x_crit = rollout(u_fn, data, crit, cfg.model.shift, consistency, calls)
        # 2. generator: backward simulation with gradient, DMD against teacher and critic
        x_hat = rollout(u_fn, data, gen, cfg.model.shift, consistency, calls)
        _, cond = data.batch(gen.index)
        loss_dmd, figs = losses.dmd_generator_loss(x_hat, t_fn, c_fn, cond, data.null_embed, gen.s, gen.eps, dmd)
        # 3. co-training: the stage-1 loss on a real-data batch
        loss = loss_dmd
        loss_co = torch.zeros(())
        x = cond_co = None
        if c.cotrain_weight > 0:
            x, cond_co = data.batch(co.index, co.drop)
            loss_co, _ = losses.forward_flowmap_loss(u_fn, x, cond_co, data.null_embed, co.t, co.r, co.eps, settings)
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
