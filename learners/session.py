"""The learner group of a run: one Ray Train `TorchTrainer` that trains every stage in turn.

    teacher (flow matching) -> stage1 (forward flow map) -> stage2 / consistency (on-policy)

Each worker is one data-parallel rank with DeepSpeed engines (`learners.deepspeed_setup`).
Starting the group (worker processes, the process group, DeepSpeed, the data) is paid once
per run, not per stage. Per stage:

* teacher, stage1 (`SupervisedLearner`): the reference's step (pipeline/steps.py) on this
  rank's rows of the global batch; DeepSpeed averages the gradients, stage 1's r != t
  rescaling sums its statistics over ranks, so the update is the reference's.
* stage2, consistency (`learners.onpolicy.OnPolicyLearner`): batches from the replay buffer
  the driver fills (pipeline/onpolicy.py), versions published to the stage's WeightStore.

Networks travel through the Hub (actors/hub.py): a stage starts from the networks it needs
(the teacher for stage 1; the stage-1 student and the teacher for on-policy stages), and
rank 0 hands the stage's result (EMA weights, critic) back for the driver to save.

Checkpoints (learners/checkpoint.py, safetensors + JSON) every `run.checkpoint_every` steps
and at each stage's end go to Ray Train (`ray.train.report`), which keeps the newest
`run.checkpoints_kept`. A group that Ray Train restarts after a worker failure
(`FailureConfig(max_failures=run.learner_restarts)`), or a new run with the same run name,
resumes from the newest one: the stages before the checkpoint's are done, its stage goes on
at its step (the step is also the data position: draws are functions of (seed, stage, step)).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from learners import checkpoint
from learners.feed import StreamedRows, stream_for
from learners.onpolicy import Nets, OnPolicyLearner, _sum_over_ranks, guarded_step
from pipeline import metrics as M
from pipeline import steps
from pipeline.config import Config
from pipeline.flowmap import losses
from pipeline.flowmap.draws import slice_rows
from pipeline.flowmap.models import VelocityFn, student_from_teacher
from pipeline.guard import StepGuard
from pipeline.steps import draws_to, rank_rows, stage1_settings, supervised_draws

TRAIN_STAGES = ("teacher", "stage1", "stage2", "consistency")
RESULT_NETS = {"teacher": "teacher", "stage1": "student_stage1", "stage2": "student", "consistency": "consistency"}
"""stage -> the name of the network it produces (its EMA)"""


FAULT_ENV = "ANYFLOW_FAULT_DRILL"
"""Fault drill: "STAGE:STEP:MARKER" makes learner rank 0 fail once, right after finishing step STEP
of STAGE, if the file MARKER does not exist yet (it is created then). For recovery drills and the
tests of learner restarts; unset in normal runs."""


def _fault_drill(stage: str, step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or rank != 0:
        return
    want_stage, want_step, marker = spec.split(":", 2)
    if want_stage == stage and int(want_step) == step and not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError(f"fault drill ({FAULT_ENV}={spec}): learner rank 0 fails after {stage} step {step}")


@dataclass
class SessionSetup:
    """Everything a learner worker needs (passed through `train_loop_config`)."""

    cfg: Config
    stages: list[str]
    """the training stages to run, in order"""
    data_dir: str
    null_embed: torch.Tensor
    teacher_config: dict
    hub: object
    threads: int = 1
    """torch threads in stages 0 and 1"""
    onpolicy_threads: int = 1
    """torch threads in the on-policy stages (the fleet runs beside the learners then)"""
    use_gpu: bool = False


class SupervisedLearner:
    """One rank's engine for stage 0 (teacher flow matching) or stage 1 (forward flow map)."""

    def __init__(self, s: SessionSetup, stage: str, data: StreamedRows, rank: int, world: int, device: torch.device):
        from learners import deepspeed_setup as ds

        self.s, self.stage, self.data, self.rank, self.world, self.device = s, stage, data, rank, world, device
        cfg = s.cfg
        self.c = getattr(cfg, stage)
        self.zero = cfg.ray.zero_stage
        nets = Nets(s.teacher_config, cfg)
        if stage == "teacher":
            torch.manual_seed(cfg.model.init_seed)  # the reference's initialisation (models.build_teacher)
            model = nets.teacher()
            self.fn = None
        else:
            teacher = nets.teacher(ray.get(ray.get(s.hub.net.remote("teacher"))[0]))
            model = steps.far_student_from(cfg, teacher) if cfg.model.causal else student_from_teacher(teacher)
        model = model.to(device)
        self.engine, self.ema = ds.wrap(model, self.c.optim, self.zero, self.c.batch_size // world,
                                        keep_ema=rank == 0)
        self.fn = VelocityFn(self.engine) if stage == "teacher" else steps.student_fn(cfg, self.engine)
        self.settings = stage1_settings(cfg)
        self.rows = rank_rows(self.c.batch_size, world, rank)
        self.guard = StepGuard(stage, cfg.run.max_bad_steps)
        self._ds = ds

    def trainables(self) -> dict:
        x = torch.zeros(1, *self.data.latent_shape, device=self.device)
        cond, t = self.data.null_embed[:1], torch.full((1,), 0.5, device=self.device)
        return {"student": checkpoint.Trainable(self.engine, self.ema, lambda: self.fn(x, t, t, cond))}

    def step(self, step: int) -> dict:
        cfg = self.s.cfg
        t0 = time.perf_counter()
        self.data.at(self.stage, step)  # this rank's rows of the step, from its stream (learners/feed.py)
        d = supervised_draws(cfg, self.stage, step, self.data.num_rows, self.data.latent_shape)
        d = draws_to(slice_rows(d, *self.rows), self.device)
        x, cond = self.data.batch(d.index, d.drop)
        if self.stage == "teacher":
            loss = losses.flow_matching_loss(self.fn, x, cond, d.t, d.eps)
            extra = torch.zeros(2)
        else:
            loss, figs = steps.student_loss(cfg, self.engine, x, cond, self.data.null_embed, d, self.stage, step,
                                            all_reduce=_sum_over_ranks)
            extra = torch.tensor([figs["loss_diag"], figs["loss_free"]], dtype=torch.float32)
        self.guard.check(loss, x=x, cond=cond)
        ok = guarded_step(self.engine, loss, self.guard)
        norm = float(self.engine.get_global_grad_norm() or 0.0)
        if ok:
            with self._ds.full_params(self.engine, self.zero):
                if self.ema is not None:
                    self.ema.update(self.engine.module, step)
        guard_figures = self.guard.record(step, ok)
        means = _sum_over_ranks(torch.cat([loss.detach().float().reshape(1).cpu(), extra])) / self.world
        if self.stage == "teacher":
            figures = {M.LOSS_TEACHER: float(means[0]), M.GRAD_NORM_TEACHER: norm}
        else:
            figures = {M.LOSS_STAGE1: float(means[0]), M.LOSS_STAGE1_DIAG: float(means[1]),
                       M.LOSS_STAGE1_FREE: float(means[2]), M.GRAD_NORM_STUDENT: norm}
            if "num_chunks" in figs:  # causal: the step's number of chunks, the same on every rank
                figures[M.FAR_NUM_CHUNKS] = figs["num_chunks"]
        figures[M.LEARNER_SECONDS] = time.perf_counter() - t0
        return {**figures, **guard_figures}

    def result(self) -> dict | None:
        if self.rank != 0:
            return None
        return {RESULT_NETS[self.stage]: {k: v.detach().to("cpu", copy=True) for k, v in self.ema.state_dict().items()}}


def _device(s: SessionSetup) -> torch.device:
    if s.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


@dataclass
class Resume:
    stage: str
    step: int
    folder: Path


def resume_point(s: SessionSetup, scratch: Path) -> Resume | None:
    """The newest Ray Train checkpoint of this run, if its stage is one this session trains."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    folder = Path(ckpt.to_directory(str(scratch / "resume")))
    meta = checkpoint.read_meta(folder)
    if meta["stage"] not in s.stages:
        return None
    return Resume(meta["stage"], int(meta["step"]), folder)


class Checkpointer:
    """Every `run.checkpoint_every` steps and at a stage's end: the stage's trainables to Ray Train."""

    def __init__(self, s: SessionSetup, rank: int, scratch: Path):
        self.every, self.zero, self.rank, self.scratch = s.cfg.run.checkpoint_every, s.cfg.ray.zero_stage, rank, scratch

    def maybe(self, stage: str, done: int, total: int, trainables: dict, version: int | None = None) -> None:
        if done != total and (self.every <= 0 or done % self.every):
            return
        folder = self.scratch / f"{stage}-{done:07d}"
        saved = checkpoint.save(folder, trainables, {"stage": stage, "step": done, "version": version,
                                                     "data_position": done, "world_size": dist.get_world_size()},
                                self.zero, self.rank)
        from ray.train import Checkpoint

        ray.train.report({"stage": stage, "step": done},
                         checkpoint=Checkpoint.from_directory(str(saved)) if saved else None)
        if saved:
            import shutil

            shutil.rmtree(saved, ignore_errors=True)


def _stages_to_run(s: SessionSetup, resume: Resume | None) -> list[tuple[str, Resume | None]]:
    if resume is None:
        return [(stage, None) for stage in s.stages]
    at = s.stages.index(resume.stage)
    return [(resume.stage, resume)] + [(stage, None) for stage in s.stages[at + 1:]]


def _resume(s: SessionSetup, learner, resume: Resume | None, rank: int) -> int:
    """The step the stage starts at: 0, or that of the checkpoint loaded into `learner`'s engines."""
    if resume is None:
        return 0
    return int(checkpoint.load(resume.folder, learner.trainables(), s.cfg.ray.zero_stage, rank)["step"])


def run_supervised(s: SessionSetup, stage: str, data: StreamedRows, rank: int, world: int, device, resume,
                   ckpt: Checkpointer) -> None:
    learner = SupervisedLearner(s, stage, data, rank, world, device)
    start = _resume(s, learner, resume, rank)
    if rank == 0:
        ray.get(s.hub.begin.remote(stage, start))
    steps = getattr(s.cfg, stage).steps
    last = time.perf_counter()
    for step in range(start, steps):
        figures = learner.step(step)
        now = time.perf_counter()
        figures[M.STEP_SECONDS], last = now - last, now
        if rank == 0:
            s.hub.report.remote(stage, step, figures)
        ckpt.maybe(stage, step + 1, steps, learner.trainables())
        _fault_drill(stage, step, rank)
    result = learner.result()
    if rank == 0:
        ray.get(s.hub.finish.remote(stage, result))


def run_onpolicy(s: SessionSetup, stage: str, data: StreamedRows, rank: int, world: int, device, resume,
                 ckpt: Checkpointer) -> None:
    store, buffer = ray.get(s.hub.stage_handles.remote(stage))
    student_state, critic_state = ray.get([ray.get(s.hub.net.remote(n))[0] for n in ("student_stage1", "teacher")])
    learner = OnPolicyLearner(s.cfg, stage, data, rank, world, device, store, buffer, Nets(s.teacher_config, s.cfg),
                              student_state, critic_state)
    del student_state, critic_state
    start = _resume(s, learner, resume, rank)
    if rank == 0:  # a restarted group: forget what the failed one left half-taken
        ray.get(buffer.reset.remote())
    learner.publish(start, rewind=True)  # version `start`: what the first rollouts are made with
    if rank == 0:
        ray.get(s.hub.begin.remote(stage, start))
    steps = getattr(s.cfg, stage).steps
    last = time.perf_counter()
    for step in range(start, steps):
        figures = learner.step(step)
        figures[M.SYNC_SECONDS] = learner.publish(step + 1)
        now = time.perf_counter()
        figures[M.STEP_SECONDS], last = now - last, now
        learner.report(step, figures)
        ckpt.maybe(stage, step + 1, steps, learner.trainables(), version=step + 1)
        _fault_drill(stage, step, rank)
    result = learner.result()
    if rank == 0:
        ema, critic = result
        ray.get(s.hub.finish.remote(stage, {RESULT_NETS[stage]: ema, f"critic_{stage}": critic}))


def session_loop(config: dict) -> None:
    """The Ray Train worker function: every training stage of the session, in order."""
    s: SessionSetup = config["setup"]
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(s)
    data = stream_for(s, rank, device, s.stages)  # rows step by step, never the split (docs/streaming.md)
    with tempfile.TemporaryDirectory(prefix=f"anyflow-learner{rank}-") as tmp:
        scratch = Path(tmp)
        resume = resume_point(s, scratch)
        ckpt = Checkpointer(s, rank, scratch)
        for stage, res in _stages_to_run(s, resume):
            supervised = stage in ("teacher", "stage1")
            torch.set_num_threads(max(1, s.threads if supervised else s.onpolicy_threads))
            run = run_supervised if supervised else run_onpolicy
            run(s, stage, data, rank, world, device, res, ckpt)
