"""The on-policy stage (stage 2, or the consistency baseline) on Ray.

Who sends what to whom (refs travel, tensors stay in the object store):

    driver (this module): creates every actor, owns every rollout ref, never reads a tensor
      for step i:
        1. store.wait_for(i - max_policy_lag)    <-- THE LAG BOUND: the rollouts of step i start
                                                     only once the learners published i - L
        2. buffer.wait_room()                    <-- pacing: wait while full, never drop
        3. RolloutWorker[i % R].rollout(i)  ->  W slices {x_old, x_crit} + meta    (refs)
        4. Scorer[i % S].score(i, *slices)  ->  W slices {y} + meta                (refs)
           (ray.colocate: RolloutScorer[i % R] does 3 and 4 in one call, actors/colocated.py)
        5. buffer.put(i, [[rollout_r, target_r] per rank r], meta refs)           (refs only)
        6. log the steps whose learner figures arrived (lag, depth, times, losses)

    ReplayBuffer --take(i, r)--> learner rank r   (Ray Train TorchTrainer + DeepSpeed ZeRO,
                                                   trainer.fit() in a background thread)
    learner rank 0 --publish(i + 1, student, critic), report(i, figures)--> WeightStore
    WeightStore --latest()--> RolloutWorker (student) and Scorer (critic) before each call
    (with LoRA a version holds the adapters only; the actors keep the frozen base weights)

Every rollout of step i is made by a student version v >= i - L (step 1 and the actors'
pull of the newest version), and the learner trains step i with version i: the policy lag
i - v is at most L. With L = 0 every step is the reference's (pipeline/reference.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch

from actors.buffer import ReplayBuffer
from actors.colocated import RolloutScorer
from actors.rollout import RolloutWorker
from actors.scorer import Scorer
from actors.weights import WeightStore
from pipeline import metrics as M
from pipeline.config import Config
from pipeline.driver import FitThread, threads_for, wait
from pipeline.steps import Log

POLL_S = 0.5


@dataclass
class Fleet:
    """The long-lived actors of the stage (the driver holds their handles)."""

    store: ray.actor.ActorHandle
    buffer: ray.actor.ActorHandle
    rollouts: list
    scorers: list
    pinned: list = field(default_factory=list)
    """refs of the actors' constructor arguments (prompt table, teacher weights, with LoRA the base
    student): held while the fleet lives, because Ray needs them again to restart an actor that died"""

    def kill(self) -> None:
        for actor in [*self.rollouts, *self.scorers, self.buffer, self.store]:
            ray.kill(actor, no_restart=True)


def fleet_name(cfg: Config, stage: str) -> str:
    """Prefix of the fleet's actor names (`<prefix>-rollout-<j>`, `<prefix>-scorer-<j>`), as the
    dashboard and `ray.get_actor` show them."""
    return f"anyflow-{cfg.run.name}-{stage}"


def launch_fleet(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module, prompt_embeds: torch.Tensor,
                 null_embed: torch.Tensor, latent_shape: tuple[int, ...]) -> Fleet:
    """The weight store (empty: the learners publish the first version), the buffer, the rollout and
    scorer pools."""
    rc = cfg.ray
    prefix = fleet_name(cfg, stage)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()  # the newest version only (see WeightStore)
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(rc.buffer_capacity, rc.learners)
    embeds, teacher_state = ray.put(prompt_embeds), ray.put(teacher.state_dict())
    # with LoRA the rollout actors keep the frozen base student and receive only adapters
    base_state = ray.put(student.state_dict()) if getattr(cfg, stage).lora_rank else None
    # a rollout or scorer actor that dies is made again by Ray (its constructor pulls the newest
    # weights) and the call it was running is retried: no step is lost, the restart is counted
    restart = dict(max_restarts=rc.actor_restarts, max_task_retries=rc.actor_restarts)
    pinned = [ref for ref in (embeds, teacher_state, base_state) if ref is not None]
    if rc.colocate:  # both roles in one actor per slot: no scorer pool
        both = [ray.remote(RolloutScorer).options(
            num_cpus=rc.rollout_cpus, num_gpus=rc.rollout_gpus, name=f"{prefix}-rollout-{j}", **restart).remote(
            cfg, store, dict(student.config), dict(teacher.config), teacher_state, embeds, null_embed, latent_shape,
            threads_for(rc.rollout_cpus), rc.rollout_gpus, stage, base_state) for j in range(rc.rollout_actors)]
        return Fleet(store, buffer, both, [], pinned=pinned)
    rollouts = [ray.remote(RolloutWorker).options(
        num_cpus=rc.rollout_cpus, num_gpus=rc.rollout_gpus, name=f"{prefix}-rollout-{j}", **restart).remote(
        cfg, store, dict(student.config), embeds, null_embed, latent_shape, threads_for(rc.rollout_cpus),
        rc.rollout_gpus, stage, base_state) for j in range(rc.rollout_actors)]
    scorers = [ray.remote(Scorer).options(
        num_cpus=rc.scorer_cpus, num_gpus=rc.scorer_gpus, name=f"{prefix}-scorer-{j}", **restart).remote(
        cfg, store, dict(teacher.config), teacher_state, embeds, null_embed, latent_shape,
        threads_for(rc.scorer_cpus), rc.scorer_gpus, stage) for j in range(rc.scorer_actors)]
    return Fleet(store, buffer, rollouts, scorers, pinned=pinned)


class StepLog:
    """Joins, per step, the rollout/scorer metadata, the buffer depth and the learner figures.

    Policy lag of a sample = the version the learner trains it with (step i: version i) minus
    the student version that made it. Mean and max are over the step's samples; one rollout
    actor makes a step's whole batch with one version, so today they are equal.
    """

    def __init__(self, stage: str, steps: int, store, log: Log, start: int = 0):
        self.stage, self.steps, self.store, self.log = stage, steps, store, log
        self.pending: dict[int, tuple] = {}
        self.next = start
        self.actor_restarts = 0

    def add(self, step: int, rollout_meta: ray.ObjectRef, score_meta: ray.ObjectRef, depth: int) -> None:
        if step >= self.next:  # after a rewind, steps logged already are not logged again
            self.pending[step] = (rollout_meta, score_meta, depth)

    def flush(self) -> None:
        """Log every step, in order, whose learner figures have arrived."""
        if self.next >= self.steps:
            return
        learned = ray.get(self.store.figures_since.remote(self.next))
        while self.next in learned and self.next in self.pending:
            i = self.next
            rmeta_ref, smeta_ref, depth = self.pending.pop(i)
            rmeta, smeta = ray.get([rmeta_ref, smeta_ref])  # small dicts, no tensors
            lag = i - rmeta["student_version"]  # the learner trains step i with version i
            self.actor_restarts += rmeta.get("restarted", 0) + smeta.get("score_restarted", 0)
            self.log(self.stage, i, {
                **learned[i], M.LAG_MEAN: float(lag), M.LAG_MAX: float(lag), M.CRITIC_LAG: i - smeta["critic_version"],
                M.BUFFER_DEPTH: depth, M.ACTOR_RESTARTS: self.actor_restarts, M.ROLLOUT_SECONDS: rmeta["rollout_seconds"],
                M.PULL_SECONDS: rmeta["pull_seconds"], M.SCORE_SECONDS: smeta["score_seconds"],
                M.ROLLOUT_NUM_STEPS: rmeta["num_steps"], M.ROLLOUT_K: rmeta["k"],
                **{k: v for k, v in smeta.items() if k.startswith(M.DMD_PREFIX)}})
            self.next += 1


def drive(cfg: Config, stage: str, fleet: Fleet, fit: FitThread, log: Log, start: int = 0,
          steps: StepLog | None = None) -> None:
    """The driver loop from step `start`: paced submission of every step's rollout and scoring, refs
    into the buffer, the learners' figures logged as they arrive (through `steps`, which outlives a
    rewind so no step is logged twice)."""
    c, rc = getattr(cfg, stage), cfg.ray
    world = rc.learners
    steps = steps or StepLog(stage, c.steps, fleet.store, log, start)
    for i in range(start, c.steps):
        # 1. the lag bound: the newest published version must be >= i - max_policy_lag
        wait(fleet.store.wait_for.remote(i - rc.max_policy_lag), fit)
        # 2. pacing: wait for room in the buffer (rollouts are never dropped)
        wait(fleet.buffer.wait_room.remote(), fit)
        # 3-4. rollout, then scoring, each returning one slice per learner rank plus metadata
        actor = fleet.rollouts[i % len(fleet.rollouts)]
        if fleet.scorers:
            *slices, rollout_meta = actor.rollout.options(num_returns=world + 1).remote(i, stage, world)
            *targets, score_meta = fleet.scorers[i % len(fleet.scorers)].score.options(
                num_returns=world + 1).remote(i, stage, *slices)
        else:  # colocated: both in one call
            *refs, rollout_meta, score_meta = actor.rollout_and_score.options(
                num_returns=2 * world + 2).remote(i, stage, world)
            slices, targets = refs[:world], refs[world:]
        # 5. refs (wrapped in lists, so they stay refs) and metadata into the buffer
        depth = wait(fleet.buffer.put.remote(i, [[s, t] for s, t in zip(slices, targets)],
                                              {"step": i, "rows": c.batch_size}, [rollout_meta, score_meta]), fit)
        steps.add(i, rollout_meta, score_meta, depth)
        # 6. log what the learners have finished
        steps.flush()
    while steps.next < c.steps:
        fit.check()
        if not fit.is_alive() and fit.error is None:
            steps.flush()
            if steps.next < c.steps:
                raise RuntimeError(f"the learners stopped after step {steps.next - 1} of {c.steps}")
            break
        time.sleep(POLL_S / 5)
        steps.flush()
