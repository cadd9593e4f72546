"""RolloutWorker: a student snapshot that turns a step's draws into detached rollouts.

For step `i` it regenerates the step's draws exactly as the reference does
(`steps.stage2_draws`), runs Flow Map Backward Simulation without gradient for the
generator draws and for the critic draws (`steps.rollout`), and returns one slice per
learner rank plus a small metadata dict (launch with `.options(num_returns=W + 1)`):

    rollout(i, stage, W) -> (slice_0, ..., slice_{W-1}, meta)
    slice_r = steps.Trajectory(x_old, x_crit: rows of rank r; step, N, k, student version)

`meta` also carries what the rollout measured: its seconds, the bytes it made, its torch threads
and its network calls (`nfe`: student calls of the generator rollout, `nfe_critic`: of the
critic's rollout; each call is batched over the step's rows, so these are calls per trajectory).

Before each rollout it loads the newest student version from the WeightStore if it is newer
than the one it holds; the driver has already waited until that version is within the lag
bound. With LoRA (the stage's `lora_rank` > 0) a version holds the adapters only: the actor
builds the same adapters on its own copy of the frozen base weights (the stage's initial
student, `base_state`) and loads just the adapters. A plain class; `ray.remote` is applied
where it is launched.
"""

from __future__ import annotations

import time

import ray
import torch

from pipeline import steps, weightsync
from pipeline.config import Config
from pipeline.flowmap import lora
from pipeline.steps import PromptRows, draws_to


class CallCounter:
    """A model function that counts its calls (each call is batched over a step's rows, so the count
    is also the number of network evaluations per trajectory)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _was_reconstructed() -> bool:
    """True in an actor that Ray restarted after it died (its constructor runs again)."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor (unit tests build the class directly)
        return False


def device_for(gpus: float) -> torch.device:
    if gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError("this actor was given GPUs but torch sees no CUDA device")
    return torch.device("cuda" if gpus > 0 else "cpu")


def adapted(cfg: Config, stage: str, network: str, model: torch.nn.Module, base_state: dict | None) -> torch.nn.Module:
    """`model` as the actor keeps it: with the stage's LoRA, `base_state` loaded and the adapters added
    (their weights come with every version); without LoRA unchanged (a version carries everything)."""
    if steps.lora_of(getattr(cfg, stage)) is None:
        return model
    if base_state is None:
        raise ValueError(f"{stage} trains LoRA adapters: the {network} actor needs the base weights (base_state)")
    model.load_state_dict(base_state)
    return steps.with_adapters(cfg, stage, network, model)


class WeightFollower:
    """Mixin of the rollout and scorer actors: one network kept at the WeightStore's newest version
    (`slot` 0: the student, 1: the critic; the whole state, or only its adapters if it has LoRA
    adapters), and whether Ray restarted the actor (reported by the role when `reports_restart`:
    an actor that holds two roles reports its restart through one of them only).

    A version arrives as byte buckets (`pipeline.weightsync.Packed`) whose `ray.get` is a view of
    shared memory: on the CPU the whole-state weights *become* those views (no copy; the follower
    never writes its weights, and it keeps the version's object alive until the next load releases
    it), on a GPU they are copied in; adapters are always copied in."""

    def _follow(self, model: torch.nn.Module, slot: int, reports_restart: bool = True) -> None:
        self._followed, self._slot = model, slot
        self._adapters_only = lora.has_adapters(model)
        self.version = -1
        self._aliased: list[str] = []
        self._reconstructed = reports_restart and _was_reconstructed()

    def pull(self) -> float:
        """Load the newest version if it is not the one we hold; returns the seconds spent."""
        t0 = time.perf_counter()
        version, held = ray.get(self.store.latest.remote())
        if version != self.version:  # newer, or older after a learner restart rewound the store
            version, packed = self._fetch(version, held)
            if self._adapters_only:
                lora.load_adapter_state_dict(self._followed, weightsync.unpack(packed))
            else:
                self._aliased = weightsync.load_into(self._followed, packed)
            self.version = version
        return time.perf_counter() - t0

    def release(self) -> None:
        """Let go of the version's shared memory after a task when no later task will use it (policy lag 0:
        the next task needs a newer version), so the store's copy is freed before the learner writes the
        next one. Only weights that are views of the buckets (CPU, whole state) hold it; copies into a GPU
        and adapters are the actor's own. The next `pull` loads again."""
        if self._aliased:
            weightsync.release(self._followed, self._aliased)
            self._aliased, self.version = [], -1

    def _release_if_on_policy(self) -> None:
        if self.cfg.ray.max_policy_lag == 0:
            self.release()

    def _fetch(self, version: int, held: list) -> tuple[int, weightsync.Packed]:
        """(version, its packed state for our slot, buckets resolved); if the learner that published it
        died (its objects are lost), the version its restarted group republishes."""
        while True:
            try:
                return version, held[self._slot].with_buckets(ray.get(held[self._slot].buckets))
            except ray.exceptions.ObjectLostError:
                version, held = ray.get(self.store.latest_after.remote(held))

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the NCCL weight-sync group of learner rank 0 (`weightsync.NcclBroadcast`, GPUs only)."""
        self._group = weightsync.NcclBroadcast(host, port, rank, world_size, self._device_of())

    def receive_broadcast(self, version: int, layouts: list) -> None:
        """Take part in the broadcast of version `version` (layouts of [student, critic], in the sender's
        order) and load our network's buckets as they arrive; the other network's bytes are dropped."""
        targets = [None, None]
        if self._adapters_only:
            targets[self._slot] = lora.adapter_parameters(self._followed)
        else:
            targets[self._slot] = self._followed.state_dict(keep_vars=True)
        self._group.recv(layouts, targets)
        self.version = version

    def _device_of(self) -> torch.device:
        return next(self._followed.parameters()).device

    def _restarted(self) -> int:
        """1 on the first call after Ray restarted this actor (it died and was made again), else 0."""
        was, self._reconstructed = self._reconstructed, False
        return int(was)


class RolloutWorker(WeightFollower):
    def __init__(self, cfg: Config, store, student_config: dict, prompt_embeds: torch.Tensor,
                 null_embed: torch.Tensor, latent_shape: tuple[int, ...], threads: int = 1, gpus: float = 0.0,
                 stage: str = "stage2", base_state: dict | None = None):
        torch.set_num_threads(max(1, threads))
        self.cfg, self.store, self.latent_shape = cfg, store, tuple(latent_shape)
        self.device = device_for(gpus)
        student = adapted(cfg, stage, "student", steps.build_student(cfg, student_config), base_state)
        self.student = student.to(self.device).eval().requires_grad_(False)
        self.calls = 0  # student forward calls (a causal student's cache writes included)
        self.student.register_forward_pre_hook(self._count)
        self.prompts = PromptRows(prompt_embeds.to(self.device), null_embed.to(self.device))
        self.num_rows = len(prompt_embeds)
        self._follow(self.student, slot=0)

    def _count(self, *_):
        self.calls += 1

    @torch.no_grad()
    def rollout(self, step: int, stage: str, num_learners: int) -> list:
        """The step's generator and critic rollouts, sliced per learner rank, then the metadata."""
        t0 = time.perf_counter()
        pull_s = self.pull()
        c = getattr(self.cfg, stage)
        consistency, calls = stage == "consistency", steps.grad_calls_of(c)
        # 1. the step's draws, identical to the reference's
        gen, crit, _ = steps.stage2_draws(self.cfg, stage, step, self.num_rows, self.latent_shape)
        # 2. backward simulation without gradient: generator rollouts, then the critic's
        self.calls = 0
        x_old = steps.student_rollout(self.cfg, self.student, self.prompts, draws_to(gen, self.device), consistency,
                                      calls)
        nfe = self.calls
        x_crit = steps.student_rollout(self.cfg, self.student, self.prompts, draws_to(crit, self.device), consistency,
                                       calls)
        # 3. one compact slice per learner rank, tagged with the student version that made it
        meta = {"step": step, "num_steps": gen.num_steps, "k": gen.k, "student_version": self.version,
                "created": time.time(), "rollout_seconds": time.perf_counter() - t0, "pull_seconds": pull_s,
                "rows": x_old.shape[0], "bytes": steps.nbytes(x_old, x_crit),
                "nfe": nfe, "nfe_critic": self.calls - nfe, "threads": torch.get_num_threads(),
                "restarted": self._restarted()}
        olds, crits = steps.split_rows(x_old, num_learners), steps.split_rows(x_crit, num_learners)
        version = meta["student_version"]
        self._release_if_on_policy()
        return [steps.Trajectory(stage, step, steps.rank_rows(x_old.shape[0], num_learners, r), gen.num_steps, gen.k,
                                 version, x_old=o, x_crit=k)
                for r, (o, k) in enumerate(zip(olds, crits))] + [meta]
