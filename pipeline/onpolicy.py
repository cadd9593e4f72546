"""The on-policy stage (stage 2, or the consistency baseline) on Ray.

Who sends what to whom (refs travel, tensors stay in the object store):

    driver (this module): creates every actor, owns every rollout ref, never reads a tensor
      for step i:
        1. store.wait_for(i - max_policy_lag)    <-- THE LAG BOUND: the rollouts of step i start
                                                     only once the learners published i - L
        2. buffer.wait_room()                    <-- pacing: wait while full, never drop
        3. RolloutWorker[i % R].rollout(i)  ->  W slices {x_old, x_crit} + meta    (refs)
        4. Scorer[i % S].score(i, *slices)  ->  W slices {y} + meta                (refs)
        5. buffer.put(i, [[rollout_r, target_r] per rank r], meta refs)           (refs only)
        6. log the steps whose learner figures arrived (lag, depth, times, losses)

    ReplayBuffer --take(i, r)--> learner rank r   (Ray Train TorchTrainer + DeepSpeed ZeRO,
                                                   trainer.fit() in a background thread)
    learner rank 0 --publish(i + 1, student, critic), report(i, figures)--> WeightStore
    WeightStore --latest()--> RolloutWorker (student) and Scorer (critic) before each call

Every rollout of step i is made by a student version v >= i - L (step 1 and the actors'
pull of the newest version), and the learner trains step i with version i: the policy lag
i - v is at most L. With L = 0 every step is the reference's (pipeline/reference.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.buffer import ReplayBuffer
from actors.rollout import RolloutWorker
from actors.scorer import Scorer
from actors.weights import WeightStore
from learners.onpolicy import LearnerSetup, read_train_split, train_loop, train_split_of
from pipeline import metrics as M
from pipeline.config import Config, RayConfig
from pipeline.data.schema import read_null_embed
from pipeline.reference import Log

POLL_S = 0.5


class ClusterTooSmall(RuntimeError):
    """The configured pools ask for more CPUs or GPUs than the Ray cluster has."""


def check_resources(rc: RayConfig) -> None:
    """Fail now, naming what was asked and what exists, if the pools cannot all be placed."""
    pools = {"rollout actor": (rc.rollout_actors, rc.rollout_cpus, rc.rollout_gpus),
             "scorer": (rc.scorer_actors, rc.scorer_cpus, rc.scorer_gpus),
             "learner": (rc.learners, rc.learner_cpus, rc.learner_gpus)}
    need_cpu = sum(n * c for n, c, _ in pools.values())
    need_gpu = sum(n * g for n, _, g in pools.values())
    have = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    node_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    problems = []
    if need_cpu > have.get("CPU", 0.0) + 1e-9:
        problems.append(f"{need_cpu:g} CPUs in all")
    if need_gpu > have.get("GPU", 0.0) + 1e-9:
        problems.append(f"{need_gpu:g} GPUs in all")
    for name, (_, c, g) in pools.items():
        if c > node_cpu + 1e-9 or g > node_gpu + 1e-9:
            problems.append(f"{c:g} CPUs + {g:g} GPUs in one {name}, more than any node has")
    if problems:
        asked = " + ".join(f"{n} {name}{'s' if n > 1 else ''} x ({c:g} CPU, {g:g} GPU)"
                           for name, (n, c, g) in pools.items())
        raise ClusterTooSmall(
            f"the on-policy stage asks for {asked}: "
            f"{'; '.join(problems)}; the cluster has {have.get('CPU', 0.0):g} CPUs and {have.get('GPU', 0.0):g} "
            f"GPUs (largest node: {node_cpu:g} CPUs, {node_gpu:g} GPUs). Lower ray.*_cpus, ray.*_gpus or the "
            f"pool sizes (ray.rollout_actors, ray.scorer_actors, ray.learners), or join a bigger cluster (ray.address)")


@dataclass
class Fleet:
    """The long-lived actors of the stage (the driver holds their handles)."""

    store: ray.actor.ActorHandle
    buffer: ray.actor.ActorHandle
    rollouts: list
    scorers: list

    def kill(self) -> None:
        for actor in [*self.rollouts, *self.scorers, self.buffer, self.store]:
            ray.kill(actor, no_restart=True)


def _threads(cpus: float) -> int:
    return max(1, int(round(cpus)))


def launch_fleet(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module, prompt_embeds: torch.Tensor,
                 null_embed: torch.Tensor, latent_shape: tuple[int, ...]) -> Fleet:
    """The weight store (holding version 0), the buffer, the rollout and scorer pools."""
    rc = cfg.ray
    store = ray.remote(WeightStore).options(num_cpus=0).remote(keep=rc.max_policy_lag + 2)
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(rc.buffer_capacity, rc.learners)
    ray.get(store.publish.remote(0, student.state_dict(), teacher.state_dict()))
    embeds, teacher_state = ray.put(prompt_embeds), ray.put(teacher.state_dict())
    rollouts = [ray.remote(RolloutWorker).options(num_cpus=rc.rollout_cpus, num_gpus=rc.rollout_gpus).remote(
        cfg, store, dict(student.config), embeds, null_embed, latent_shape, _threads(rc.rollout_cpus),
        rc.rollout_gpus) for _ in range(rc.rollout_actors)]
    scorers = [ray.remote(Scorer).options(num_cpus=rc.scorer_cpus, num_gpus=rc.scorer_gpus).remote(
        cfg, store, dict(teacher.config), teacher_state, embeds, null_embed, latent_shape,
        _threads(rc.scorer_cpus), rc.scorer_gpus) for _ in range(rc.scorer_actors)]
    return Fleet(store, buffer, rollouts, scorers)


class _FitThread(threading.Thread):
    """`trainer.fit()` in the background; its error, if any, is re-raised by the driver loop."""

    def __init__(self, trainer):
        super().__init__(name="onpolicy-learners", daemon=True)
        self.trainer, self.error = trainer, None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the learners failed: {self.error}") from self.error


def make_trainer(cfg: Config, stage: str, setup: LearnerSetup):
    """The Ray Train TorchTrainer of the learner pool (DeepSpeed inside `train_loop`)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from learners.deepspeed_setup import dist_backend

    rc = cfg.ray
    use_gpu = rc.learner_gpus > 0
    resources = {"CPU": rc.learner_cpus, **({"GPU": rc.learner_gpus} if use_gpu else {})}
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        train_loop, train_loop_config={"setup": setup},
        torch_config=TorchConfig(backend=dist_backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=rc.learners, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{cfg.run.name}-{stage}", storage_path=str((cfg.run_dir / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=0), worker_runtime_env={"env_vars": env}))


def _wait(ref: ray.ObjectRef, fit: _FitThread):
    """`ray.get(ref)`, but raise at once if the learners fail meanwhile."""
    while True:
        ready, _ = ray.wait([ref], timeout=POLL_S)
        if ready:
            return ray.get(ref)
        fit.check()


class StepLog:
    """Joins, per step, the rollout/scorer metadata, the buffer depth and the learner figures.

    Policy lag of a sample = the version the learner trains it with (step i: version i) minus
    the student version that made it. Mean and max are over the step's samples; one rollout
    actor makes a step's whole batch with one version, so today they are equal.
    """

    def __init__(self, stage: str, steps: int, store, log: Log):
        self.stage, self.steps, self.store, self.log = stage, steps, store, log
        self.pending: dict[int, tuple] = {}
        self.next = 0

    def add(self, step: int, rollout_meta: ray.ObjectRef, score_meta: ray.ObjectRef, depth: int) -> None:
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
            self.log(self.stage, i, {
                **learned[i], M.LAG_MEAN: float(lag), M.LAG_MAX: float(lag), M.CRITIC_LAG: i - smeta["critic_version"],
                M.BUFFER_DEPTH: depth, M.ROLLOUT_SECONDS: rmeta["rollout_seconds"],
                M.PULL_SECONDS: rmeta["pull_seconds"], M.SCORE_SECONDS: smeta["score_seconds"],
                M.ROLLOUT_NUM_STEPS: rmeta["num_steps"], M.ROLLOUT_K: rmeta["k"],
                **{k: v for k, v in smeta.items() if k.startswith(M.DMD_PREFIX)}})
            self.next += 1


def drive(cfg: Config, stage: str, fleet: Fleet, fit: _FitThread, log: Log) -> None:
    """The driver loop: paced submission of every step's rollout and scoring, refs into the buffer."""
    c, rc = getattr(cfg, stage), cfg.ray
    world = rc.learners
    steps = StepLog(stage, c.steps, fleet.store, log)
    for i in range(c.steps):
        # 1. the lag bound: the newest published version must be >= i - max_policy_lag
        _wait(fleet.store.wait_for.remote(i - rc.max_policy_lag), fit)
        # 2. pacing: wait for room in the buffer (rollouts are never dropped)
        _wait(fleet.buffer.wait_room.remote(), fit)
        # 3-4. rollout, then scoring, each returning one slice per learner rank plus metadata
        *slices, rollout_meta = fleet.rollouts[i % len(fleet.rollouts)].rollout.options(
            num_returns=world + 1).remote(i, stage, world)
        *targets, score_meta = fleet.scorers[i % len(fleet.scorers)].score.options(
            num_returns=world + 1).remote(i, stage, *slices)
        # 5. refs (wrapped in lists, so they stay refs) and metadata into the buffer
        depth = _wait(fleet.buffer.put.remote(i, [[s, t] for s, t in zip(slices, targets)],
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


def read_data(data_dir: str | Path):
    """(train split as a materialized Ray Data dataset, its prompt embeddings, null embedding (1, L, D),
    latent shape). Read before the pools are placed: Ray Data's file listing needs a free CPU."""
    data_dir = str(Path(data_dir).resolve())
    ds = read_train_split(data_dir)
    split = train_split_of(ds, data_dir, read_null_embed(data_dir))
    return ds, split.prompt_embeds, split.null_embed, split.latent_shape


@dataclass
class Result:
    student: torch.nn.Module
    """the student EMA"""
    critic: torch.nn.Module
    buffer_stats: dict
    """ReplayBuffer.stats(): peak depth, bytes per trajectory, types of everything it held"""
    store_stats: dict
    """WeightStore.stats(): last version, bytes per version"""


def train_stage2(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module,
                 data_dir: str | Path, log: Log) -> tuple[torch.nn.Module, torch.nn.Module]:
    """On-policy distillation (`stage2`) or the consistency baseline on Ray; returns (student EMA, critic)
    like `reference.train_stage2`."""
    result = run(cfg, stage, student, teacher, data_dir, log)
    return result.student, result.critic


def run(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module,
        data_dir: str | Path, log: Log) -> Result:
    """The stage on Ray, with the buffer's and store's statistics. Joins the running Ray
    (or `ray.address`, or starts a local one); fails at once if the cluster is too small."""
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None)
    check_resources(cfg.ray)
    c = getattr(cfg, stage)
    if c.batch_size % cfg.ray.learners:
        raise ValueError(f"{stage}.batch_size={c.batch_size} does not split over ray.learners={cfg.ray.learners}")
    train_split, prompt_embeds, null_embed, latent_shape = read_data(data_dir)
    fleet = launch_fleet(cfg, student, teacher, prompt_embeds, null_embed, latent_shape)
    fit = None
    try:
        _, init_refs = ray.get(fleet.store.latest.remote())
        setup = LearnerSetup(cfg, stage, str(Path(data_dir).resolve()), null_embed, dict(student.config),
                             dict(teacher.config), init_refs, fleet.store, fleet.buffer, train_split,
                             threads=_threads(cfg.ray.learner_cpus), use_gpu=cfg.ray.learner_gpus > 0)
        fit = _FitThread(make_trainer(cfg, stage, setup))
        fit.start()
        drive(cfg, stage, fleet, fit, log)
        fit.join()
        fit.check()
        ema_state, critic_state = ray.get(ray.get(fleet.store.result.remote()))
        buffer_stats, store_stats = ray.get([fleet.buffer.stats.remote(), fleet.store.stats.remote()])
        return Result(_loaded(student, ema_state), _loaded(teacher, critic_state), buffer_stats, store_stats)
    finally:
        fleet.kill()
        if fit is not None:
            fit.join(timeout=60)


def _loaded(like: torch.nn.Module, state: dict) -> torch.nn.Module:
    model = type(like).from_config(like.config)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
