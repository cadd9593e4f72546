"""The training stages on Ray: one learner group for the whole run, a rollout fleet per on-policy stage.

    driver (this module)                              Ray cluster
      Hub (actors/hub.py) <--------------------------> learner group: Ray Train TorchTrainer,
      trainer.fit() in a background thread             DeepSpeed per rank (learners/session.py),
                                                       each rank's rows of each step streamed from
                                                       the Parquet shards (Ray Data, learners/feed.py)
      per stage, in order:
        teacher, stage1: log the learners' figures from the Hub; save the result when it arrives
        stage2, consistency: launch the fleet (pipeline/onpolicy.py), open the stage on the Hub,
          wait for the learners' first version, drive the rollouts, save the result, stop the fleet

The driver never holds a trajectory tensor; it holds networks only to save them and to hand
them to the next stage's actors. Ray Train checkpoints go to `<run_dir>/ray_train/learners`;
a new run with the same run name resumes from the newest (learners/session.py).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
import torch

from pipeline import metrics as M
from pipeline.config import Config, RayConfig
from pipeline.driver import POLL_S, FitThread, threads_for, wait
from pipeline.steps import Log

SUPERVISED = ("teacher", "stage1")
ONPOLICY = ("stage2", "consistency")


class ClusterTooSmall(RuntimeError):
    """The configured pools ask for more CPUs or GPUs than the Ray cluster has."""


_OWN_RAY = False
"""whether `init_ray` started the local Ray this process is connected to"""


def init_ray(cfg: Config) -> None:
    """Join `ray.address`, else $RAY_ADDRESS (set by `ray job submit`), else start a local Ray bound
    to 127.0.0.1 (never silently join some other cluster running on this machine)."""
    global _OWN_RAY
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # the dashboard (on 127.0.0.1 only) serves Ray's State API, which Ray Train's placement-group
        # cleaner polls every second; without it every poll logs a warning to this console
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1", configure_logging=False)
        _OWN_RAY = True
        if ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
    else:
        ray.init(address=address)


def release_ray() -> None:
    """Stop the local Ray that `init_ray` started, once the training stages are done: evaluation runs
    in the driver and gets the cores back (toy evaluation on 2 cores: 134 to 140 s with the idle Ray
    up, 127 s without). A Ray this process joined or found running is left alone."""
    global _OWN_RAY
    if _OWN_RAY and ray.is_initialized():
        ray.shutdown()
    _OWN_RAY = False


def check_resources(rc: RayConfig, onpolicy: bool = True) -> None:
    """Fail now, naming what was asked and what exists, if the pools cannot all be placed."""
    pools = {"learner": (rc.learners, rc.learner_cpus, rc.learner_gpus)}
    if onpolicy and rc.colocate:
        pools = {"rollout+scorer actor": (rc.rollout_actors, rc.rollout_cpus, rc.rollout_gpus), **pools}
    elif onpolicy:
        pools = {"rollout actor": (rc.rollout_actors, rc.rollout_cpus, rc.rollout_gpus),
                 "scorer": (rc.scorer_actors, rc.scorer_cpus, rc.scorer_gpus), **pools}
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
            f"the training stages ask for {asked}: "
            f"{'; '.join(problems)}; the cluster has {have.get('CPU', 0.0):g} CPUs and {have.get('GPU', 0.0):g} "
            f"GPUs (largest node: {node_cpu:g} CPUs, {node_gpu:g} GPUs). Lower ray.*_cpus, ray.*_gpus or the "
            f"pool sizes (ray.rollout_actors, ray.scorer_actors, ray.learners), or join a bigger cluster (ray.address)")


class Rewind(Exception):
    """The learner group restarted (Ray Train restored it from a checkpoint) and goes on from `start`."""

    def __init__(self, start: int, generation: int):
        super().__init__(f"the learners restarted at step {start} (generation {generation})")
        self.start, self.generation = start, generation


class Watch:
    """What the driver checks while it waits: the learners' failure (raised) and, in an on-policy
    stage, a restarted learner group (`Rewind`). Quacks like the FitThread it wraps."""

    def __init__(self, fit: FitThread, hub=None, stage: str | None = None, generation: int = 0):
        self.fit, self.hub, self.stage, self.generation = fit, hub, stage, generation
        self._last = 0.0

    @property
    def error(self):
        return self.fit.error

    def is_alive(self) -> bool:
        return self.fit.is_alive()

    def check(self) -> None:
        self.fit.check()
        now = time.monotonic()
        if self.hub is None or now - self._last < POLL_S:
            return
        self._last = now
        got = ray.get(self.hub.begun.remote(self.stage))
        if got is not None and got[1] != self.generation:
            raise Rewind(*got)


def storage_of(cfg: Config) -> Path:
    """Where Ray Train keeps the learners' checkpoints (`<storage>/learners`)."""
    return (cfg.run_dir / "ray_train").resolve()


def make_trainer(cfg: Config, setup):
    """The Ray Train TorchTrainer of the learner group (DeepSpeed inside `learners.session.session_loop`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from learners.deepspeed_setup import dist_backend
    from learners.feed import DATASET, RankShards, StepPlan, row_bytes
    from learners.session import FAULT_ENV, session_loop
    from pipeline.data.schema import read_meta

    rc = cfg.ray
    use_gpu = rc.learner_gpus > 0
    resources = {"CPU": rc.learner_cpus, **({"GPU": rc.learner_gpus} if use_gpu else {})}
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    plan = StepPlan(cfg, setup.stages, storage_of(cfg) / "learners", row_bytes(setup.data_dir),
                    num_rows=read_meta(setup.data_dir)["num_rows"]["train"])
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return TorchTrainer(
        session_loop, train_loop_config={"setup": setup},
        # each rank's rows of every step, streamed (learners/feed.py); the plan is made again from the resume
        # point each time Ray Train starts the group
        datasets={DATASET: plan},
        dataset_config=RankShards(cfg, setup.data_dir, read_meta(setup.data_dir)["num_rows"]["train"], plan),
        torch_config=TorchConfig(backend=dist_backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=rc.learners, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="learners", storage_path=str(storage_of(cfg)),
                             failure_config=FailureConfig(max_failures=cfg.run.learner_restarts),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_kept),
                             worker_runtime_env={"env_vars": env}))


def check_checkpoint(cfg: Config) -> Path | None:
    """The newest learner checkpoint of the run, checked before any work (meta, every file's
    header and length); a bad one is an InputError naming it, never a silent fresh start."""
    from learners import checkpoint
    from pipeline.guard import InputError

    folder = checkpoint.newest(storage_of(cfg) / "learners")
    if folder is None:
        return None
    try:
        checkpoint.verify(folder)
    except checkpoint.CheckpointError as exc:
        raise InputError(f"{exc} (the run {cfg.run.name} would resume from it: repair or delete {folder}, "
                         f"or start a new run.name)") from None
    return folder


@dataclass
class SessionResult:
    nets: dict[str, torch.nn.Module] = field(default_factory=dict)
    """the networks the session produced, by name (teacher, student_stage1, student, consistency,
    critic_stage2, critic_consistency)"""
    stats: dict[str, dict] = field(default_factory=dict)
    """per on-policy stage: {"buffer": ReplayBuffer.stats(), "store": WeightStore.stats(), "hub": counters}"""
    seconds: dict[str, float] = field(default_factory=dict)
    """per stage, as the driver saw it: from the end of the stage before (the first stage: from its learners
    beginning it) to the stage's networks handed to `on_result`"""
    startup_seconds: float = 0.0
    """from the call to the learners beginning the first stage (Ray, the learner group's
    workers and DeepSpeed; for an on-policy first stage also its fleet)"""


def _module(cfg: Config, like_name: str, teacher_config: dict, state: dict) -> torch.nn.Module:
    from learners.onpolicy import Nets

    nets = Nets(teacher_config, cfg)
    model = nets.teacher(state) if like_name == "teacher" or like_name.startswith("critic_") else nets.student(state)
    return model.eval().requires_grad_(False)


def train_session(cfg: Config, stages: list[str], nets: dict[str, torch.nn.Module], data_dir: str | Path,
                  log: Log, on_result: Callable[[str, torch.nn.Module], None] | None = None,
                  fresh: bool = False) -> SessionResult:
    """Train `stages` (in order) on Ray; `nets` holds the networks they start from that exist already
    (a loaded teacher, a finished stage-1 student). `on_result(name, module)` is called as each
    network is finished (the stages save it there). `fresh`: forget earlier checkpoints of this run."""
    from actors.hub import Hub
    from learners.session import SessionSetup
    from pipeline import onpolicy
    from pipeline.data.rows import read_prompt_embeds
    from pipeline.data.schema import read_meta, read_null_embed
    from pipeline.flowmap import models

    t_call = time.perf_counter()
    unknown = [s for s in stages if s not in SUPERVISED + ONPOLICY]
    if unknown:
        raise ValueError(f"not training stages: {unknown}")
    init_ray(cfg)
    check_resources(cfg.ray, onpolicy=any(s in ONPOLICY for s in stages))
    for stage in stages:
        b = getattr(cfg, stage).batch_size
        if b % cfg.ray.learners:
            raise ValueError(f"{stage}.batch_size={b} does not split over ray.learners={cfg.ray.learners}")
    if fresh:
        shutil.rmtree(storage_of(cfg), ignore_errors=True)
    check_checkpoint(cfg)
    teacher_config = dict(nets["teacher"].config) if "teacher" in nets else models.arch_config(cfg.model.size)
    data_dir = str(Path(data_dir).resolve())
    null_embed = read_null_embed(data_dir)
    meta = read_meta(data_dir)
    # the learners stream their rows (learners/feed.py); the driver reads the prompt table the rollout and
    # scorer actors hold (every row's prompt embedding, no latent) only for an on-policy stage
    prompts = read_prompt_embeds(data_dir) if any(s in ONPOLICY for s in stages) else None
    fleet_null, latent_shape = null_embed.reshape(1, *null_embed.shape[-2:]), tuple(meta["latent_shape"])
    hub = ray.remote(Hub).options(num_cpus=0).remote()
    for name, net in nets.items():
        ray.get(hub.put_net.remote(name, {k: v.detach().cpu() for k, v in net.state_dict().items()}))
    setup = SessionSetup(cfg, list(stages), data_dir, null_embed, teacher_config, hub,
                         threads=cfg.ray.learner_threads or threads_for(cfg.ray.learner_cpus),
                         onpolicy_threads=cfg.ray.learner_onpolicy_threads or threads_for(cfg.ray.learner_cpus),
                         use_gpu=cfg.ray.learner_gpus > 0)
    fit = FitThread(make_trainer(cfg, setup))
    fit.start()
    out = SessionResult(nets=dict(nets))
    last = None  # when the stage before ended (perf_counter)
    try:
        for stage in stages:
            if stage in SUPERVISED:
                began = _follow(cfg, stage, hub, fit, log)
            else:
                fleet = onpolicy.launch_fleet(cfg, stage, _need(out.nets, "student_stage1"), _need(out.nets, "teacher"),
                                              prompts, fleet_null, latent_shape)
                try:
                    ray.get(hub.open_stage.remote(stage, fleet.store, fleet.buffer))
                    start, generation = _begun(stage, hub, fit)
                    began = time.perf_counter()
                    step_log = onpolicy.StepLog(stage, getattr(cfg, stage).steps, fleet.store, log, start)
                    while True:
                        watch = Watch(fit, hub, stage, generation)
                        try:
                            wait(fleet.store.wait_for.remote(start), watch)
                            onpolicy.drive(cfg, stage, fleet, watch, log, start, step_log)
                            break
                        except Rewind as rw:  # a restored learner group: its rollouts again from rw.start
                            start, generation = rw.start, rw.generation
                            ray.get(fleet.buffer.reset.remote())
                            ray.get(hub.count.remote(M.LEARNER_RESTARTS))
                            print(f"[{stage}] {rw}: rollouts resume from there", flush=True)
                    _result(stage, hub, fit)  # the learners are done before the fleet goes
                    out.stats[stage] = {"buffer": ray.get(fleet.buffer.stats.remote()),
                                        "store": ray.get(fleet.store.stats.remote()),
                                        "hub": ray.get(hub.counters.remote())}
                finally:
                    fleet.kill()
            refs = _result(stage, hub, fit)
            for name, ref in refs.items():
                module = _module(cfg, name, teacher_config, ray.get(ref[0]))
                out.nets[name] = module
                if on_result:
                    on_result(name, module)
            now = time.perf_counter()
            if last is None:
                out.startup_seconds = began - t_call
            out.seconds[stage], last = now - (began if last is None else last), now
        fit.join()
        if fit.error is not None:
            fit.check()
        return out
    finally:
        ray.kill(hub)  # learners still waiting on it (the driver failed) then fail and return
        if fit.is_alive():
            fit.join(timeout=60)


def _need(nets: dict, name: str) -> torch.nn.Module:
    if name not in nets:
        raise RuntimeError(f"the on-policy stage needs the {name} network: train its stage first")
    return nets[name]


def _poll(call: Callable[[], object], fit: FitThread, what: str):
    """Poll `call()` until it returns something; raise if the learners fail or stop without it."""
    while True:
        stopped = not fit.is_alive()
        got = call()
        if got is not None:
            return got
        fit.check()
        if stopped:
            raise RuntimeError(f"the learners stopped without {what}")
        time.sleep(POLL_S)


def _begun(stage: str, hub, fit: FitThread) -> tuple[int, int]:
    return _poll(lambda: ray.get(hub.begun.remote(stage)), fit, f"starting {stage}")


def _result(stage: str, hub, fit: FitThread) -> dict:
    return _poll(lambda: ray.get(hub.result.remote(stage)), fit, f"the result of {stage}")


def _follow(cfg: Config, stage: str, hub, fit: FitThread, log: Log) -> float:
    """Log a supervised stage's figures, in step order, until its result is there; returns when the
    driver saw the learners begin the stage (perf_counter)."""
    start, _ = _begun(stage, hub, fit)
    began = time.perf_counter()
    nxt = start
    while True:
        done = ray.get(hub.result.remote(stage)) is not None
        figures = ray.get(hub.figures_since.remote(stage, nxt))
        while nxt in figures:
            log(stage, nxt, figures[nxt])
            nxt += 1
        if done:
            return began
        fit.check()
        if not fit.is_alive():
            _result(stage, hub, fit)  # one last look, else a clear error
            continue
        time.sleep(POLL_S)


@dataclass
class Result:
    student: torch.nn.Module
    """the student EMA"""
    critic: torch.nn.Module
    buffer_stats: dict
    """ReplayBuffer.stats(): peak depth, bytes per trajectory, types of everything it held"""
    store_stats: dict
    """WeightStore.stats(): last version, bytes per version"""


def run(cfg: Config, stage: str, student: torch.nn.Module, teacher: torch.nn.Module,
        data_dir: str | Path, log: Log) -> Result:
    """One on-policy stage on Ray from a given stage-1 student and teacher, with the buffer's and
    store's statistics (the tests' and the benchmark's entry; runs use `train_session`).
    Always starts fresh: earlier checkpoints of the run name are forgotten."""
    out = train_session(cfg, [stage], {"student_stage1": student, "teacher": teacher}, data_dir, log, fresh=True)
    stats = out.stats[stage]
    student_key = "student" if stage == "stage2" else "consistency"
    return Result(out.nets[student_key], out.nets[f"critic_{stage}"], stats["buffer"], stats["store"])
