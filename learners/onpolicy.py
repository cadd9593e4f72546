"""One learner rank's on-policy stage (stage 2 or the consistency baseline), run by the session's
train function (`learners.session.run_onpolicy`), and the pieces the session shares.

Each rank (one data-parallel rank of W) builds the student and the critic as DeepSpeed
engines (`learners.deepspeed_setup.wrap`), then for every step i:

1. takes its slice refs of step i from the ReplayBuffer (rollout: x_old, x_crit; target: y);
2. regenerates the step's draws (`steps.stage2_draws`) and keeps its rows (`slice_rows`);
3. recomputes the rollout x_theta from the same noise, N and k *with* gradient and minimises
   the decoupled DMD loss `mean((x_theta - y)^2)` plus the co-training stage-1 loss on its
   rows of the step's real-data batch (the r != t rescaling is over the global batch:
   `all_reduce` sums its statistics over ranks); DeepSpeed averages the gradients, so the
   update is the reference's on the global batch;
4. updates the student EMA (rank 0 holds it), then trains the critic by flow matching on
   the buffered x_crit with the critic draws;
5. publishes version i + 1 to the WeightStore: under ZeRO-3 every rank joins the gather,
   rank 0 sends the state dicts (the full ones, or with LoRA (`lora_rank` > 0) the adapters
   only: the actors hold the frozen base weights themselves) and the step's figures (losses
   averaged over ranks).

With LoRA both networks train adapters only (`deepspeed_setup.wrap` adds them, initialised
like the reference's); the stage's result is merged into plain weights (`result`).

Co-training data: no learner holds the train split. The step's draws address rows by their
global index in the split (exactly as the reference does), and they are functions of
(seed, stage, step), so the rows rank r needs at each step are known in advance; its shard of
the Ray Data row stream (learners/feed.py, docs/streaming.md) brings exactly those rows, step
by step (`data.at(stage, step)`), and `data.batch` serves them in the draws' order.
"""

from __future__ import annotations

import time
import ray
import torch
import torch.distributed as dist

from pipeline import steps, weightsync
from pipeline.config import Config
from pipeline.flowmap import lora, losses
from pipeline.flowmap.draws import slice_rows
from pipeline.flowmap.models import VelocityFn
from pipeline import metrics as M
from pipeline.guard import StepGuard
from pipeline.steps import draws_to



class Nets:
    """Builds the session's networks from their diffusers configs (a configured teacher folder may
    differ from the `model.size` preset, so the configs travel, not the size name)."""

    def __init__(self, teacher_config: dict, cfg: Config):
        self.cfg = cfg
        self.teacher_config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
        self.student_config = steps.student_config(cfg, self.teacher_config)

    def teacher(self, state: dict | None = None) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return self._load(WanTransformer3DModel(**self.teacher_config), state)

    def student(self, state: dict | None = None) -> torch.nn.Module:
        """AnyFlow, or AnyFlow-FAR with model.causal (`steps.build_student`)."""
        return steps.build_student(self.cfg, self.student_config, state)

    @staticmethod
    def _load(model: torch.nn.Module, state: dict | None) -> torch.nn.Module:
        if state is not None:
            model.load_state_dict(state)
        return model


def guarded_step(engine, loss: torch.Tensor, guard) -> bool:
    """Backward and step through DeepSpeed; True if the update was applied. DeepSpeed itself skips
    a step whose global gradient norm is not finite (weights, optimiser state and schedule are
    left alone, on every rank alike); the guard (pipeline/guard.py) counts it and, after
    run.max_bad_steps in a row, aborts the run. Call `guard.check(loss, ...)` first for the reason."""
    engine.backward(loss)
    engine.step()
    ok = bool(engine.was_step_applied())
    if not ok:
        guard.check_grad_norm(engine.get_global_grad_norm())
    return ok


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class OnPolicyLearner:
    """One rank's student and critic engines and its on-policy step."""

    def __init__(self, cfg: Config, stage: str, data, rank: int, world: int, device: torch.device,
                 store, buffer, nets: "Nets", student_state: dict, critic_state: dict):

        from learners import deepspeed_setup as ds

        self.cfg, self.stage, self.data, self.rank, self.world = cfg, stage, data, rank, world
        self.store, self.buffer, self.device = store, buffer, device
        self.c = getattr(cfg, stage)
        self.zero = cfg.ray.zero_stage
        student, critic = nets.student(student_state), nets.teacher(critic_state)
        student, critic = student.to(device), critic.to(device)
        micro = self.c.batch_size // world
        settings, gen = steps.lora_for(cfg, stage, "student")
        self.student, self.ema = ds.wrap(student, self.c.optim, self.zero, micro, keep_ema=rank == 0, lora=settings,
                                         lora_init=gen)
        settings, gen = steps.lora_for(cfg, stage, "critic")
        self.critic, _ = ds.wrap(critic, self.c.critic_optim, self.zero, micro, keep_ema=False, lora=settings,
                                 lora_init=gen)
        self.lora = settings is not None
        self.u_fn, self.c_fn = steps.student_fn(cfg, self.student), VelocityFn(self.critic)
        self.settings, self.calls = steps.stage1_settings(cfg), steps.grad_calls_of(self.c)
        self.rows = steps.rank_rows(self.c.batch_size, world, rank)
        self._publishing = None
        self._bucket_scratch = None
        """rank 0's reusable bucket (`weightsync.scratch_bucket`): every bucket of every sync is written
        into these mapped pages, then `ray.put` copies it into the object store"""
        self.guard = StepGuard(f"{stage} student", cfg.run.max_bad_steps)
        self.critic_guard = StepGuard(f"{stage} critic", cfg.run.max_bad_steps,
                                      (M.CRITIC_SKIPPED_STEPS, M.CRITIC_BAD_IN_A_ROW))
        self._ds = ds

    def trainables(self) -> dict:
        """The networks a checkpoint of this stage holds (learners.checkpoint)."""
        from learners.checkpoint import Trainable

        x = torch.zeros(1, *self.data.latent_shape, device=self.device)
        cond = self.data.null_embed[:1]
        t = torch.full((1,), 0.5, device=self.device)
        return {"student": Trainable(self.student, self.ema, lambda: self.u_fn(x, t, t, cond)),
                "critic": Trainable(self.critic, None, lambda: self.c_fn(x, t, t, cond))}

    def _take(self, step: int) -> steps.Trajectory:
        """This rank's trajectory record of `step`: its rollout part joined with its target part."""
        rollout_ref, target_ref = ray.get(self.buffer.take.remote(step, self.rank))
        rollout, target = ray.get([rollout_ref, target_ref])
        return rollout.joined(target)

    def step(self, step: int) -> dict:
        """One generator step and one critic step (ALGORITHM.md, stage 2, decoupled form).

        The forward passes that need only this rank's current weights and the step's draws (the
        differentiable rollout and the co-training loss) run before the buffer is asked for the
        step's target, so at a small policy lag they overlap the rollout side's work on the same
        step instead of waiting for it; one backward of the summed loss follows, as in the reference."""
        cfg, c, data, stage = self.cfg, self.c, self.data, self.stage
        t0 = time.perf_counter()
        # 1. the step's draws, this rank's rows
        data.at(stage, step)  # this rank's rows of the step, from its stream (learners/feed.py)
        gen, crit, co = steps.stage2_draws(cfg, stage, step, data.num_rows, data.latent_shape)
        gen, crit, co = (draws_to(slice_rows(d, *self.rows), self.device) for d in (gen, crit, co))
        # 2. generator forward: differentiable rollout from the step's noise, N, k; co-training loss
        x_theta = steps.student_rollout(cfg, self.student, data, gen, stage == "consistency", self.calls)
        loss_co = torch.zeros(())
        if c.cotrain_weight > 0:
            x, cond_co = data.batch(co.index, co.drop)
            loss_co, _ = steps.student_loss(cfg, self.student, x, cond_co, data.null_embed, co, stage, step,
                                            all_reduce=_sum_over_ranks)
        # 3. this rank's slices of the step's rollout and target (waits for the rollout side)
        t_wait = time.perf_counter()
        traj = self._take(step)
        t1 = time.perf_counter()
        # 4. decoupled DMD against the buffered target, plus co-training; one backward
        x_old, y = traj.x_old.to(self.device), traj.y.to(self.device)
        drift = torch.stack([((x_theta.detach() - x_old) ** 2).sum(), ((x_old - y) ** 2).sum()])
        loss_dmd = losses.dmd_loss(x_theta, losses.offpolicy_target(y, x_old, x_theta, cfg.ray.lag_target),
                                   c.dmd_weight)
        loss = loss_dmd + c.cotrain_weight * loss_co if c.cotrain_weight > 0 else loss_dmd
        self.guard.check(loss, y=traj.y)
        ok = guarded_step(self.student, loss, self.guard)
        norm = float(self.student.get_global_grad_norm() or 0.0)
        # 5. student EMA (rank 0), then the critic: flow matching on the buffered critic rollouts
        if ok:
            with self._ds.full_params(self.student, self.zero):
                if self.ema is not None:
                    self.ema.update(self.student.module, step)
        guard_figures = self.guard.record(step, ok)
        _, cond_c = data.batch(crit.index)
        x_crit = traj.x_crit.to(self.device)
        loss_critic = losses.flow_matching_loss(self.c_fn, x_crit, cond_c, crit.s, crit.eps)
        self.critic_guard.check(loss_critic, x_crit=x_crit)
        ok_critic = guarded_step(self.critic, loss_critic, self.critic_guard)
        guard_figures.update(self.critic_guard.record(step, ok_critic))
        # 6. the global figures (losses averaged over ranks)
        sums = _sum_over_ranks(torch.cat([torch.stack([loss_dmd, loss_co, loss, loss_critic]).detach(), drift]).float())
        means, drift = sums[:4] / self.world, sums[4:]
        return {M.LOSS_DMD: float(means[0]), M.LOSS_COTRAIN: float(means[1]), M.LOSS_STUDENT: float(means[2]),
                M.LOSS_CRITIC: float(means[3]), M.GRAD_NORM_STUDENT: norm,
                M.POLICY_DRIFT: float((drift[0] / drift[1].clamp_min(1e-30)).sqrt()), M.WAIT_SECONDS: t1 - t_wait,
                M.LEARNER_SECONDS: time.perf_counter() - t0 - (t1 - t_wait), **guard_figures}

    def _synced(self, engine) -> weightsync.Packed | None:
        """What a version carries of `engine`, packed into byte buckets that are put in the object store
        one by one as they fill (rank 0; None elsewhere): its adapters with LoRA, else its whole state.
        Packing is the one copy the learner makes (on a GPU, into a device bucket, then one
        device-to-host copy per bucket), and `ray.put` writes each bucket once into shared memory (no
        pickled tensor); the buckets are written into one reusable scratch bucket, so after the first sync
        no fresh memory is faulted in. A collective under ZeRO-3 (only the trained parameters are gathered)."""
        with self._ds.full_params(engine, self.zero):
            if self.rank != 0:
                return None
            if self._bucket_scratch is None:
                self._bucket_scratch = weightsync.scratch_bucket()
            return weightsync.pack(self._synced_state(engine), sink=ray.put, scratch=self._bucket_scratch)

    def publish(self, version: int, rewind: bool = False) -> float:
        """Version `version` to the WeightStore (every rank joins the gathers, rank 0 sends); the seconds
        the learner spent. Rank 0 puts the packed buckets itself (`_synced`) and hands the store the
        small index with their refs, so no process holds a second copy; the store's call is not waited for (the driver waits on the store for the version it needs), but
        the previous publish's outcome is checked here, so an error still surfaces."""
        t0 = time.perf_counter()
        if self.rank == 0 and self.cfg.ray.max_policy_lag == 0:
            # strictly on-policy nobody reads the held version again: free it before writing the next
            # (the followers let go after their tasks), so host memory holds one version, not two
            if self._publishing is not None:
                ray.get(self._publishing)
                self._publishing = None
            ray.get(self.store.release.remote())
        student, critic = self._synced(self.student), self._synced(self.critic)
        if self.rank == 0:
            if self._publishing is not None:
                ray.get(self._publishing)
            self._publishing = self.store.publish.remote(version, student, critic, rewind=rewind)
            if rewind:
                ray.get(self._publishing)
        return time.perf_counter() - t0

    def open_broadcast(self, host: str, port: int, world_size: int) -> None:
        """Rank 0: host the NCCL weight-sync group (`weightsync.NcclBroadcast`) the followers join."""
        if self.rank == 0:
            self._group = weightsync.NcclBroadcast(host, port, 0, world_size, self.device)

    def layouts(self) -> list[weightsync.Packed] | None:
        """[student, critic] index and bucket sizes of a broadcast, what the receivers are handed first
        (rank 0; None elsewhere; every rank joins, a gather under ZeRO-3)."""
        out = []
        for engine in (self.student, self.critic):
            with self._ds.full_params(engine, self.zero):
                out.append(weightsync.Packed(*weightsync.plan(self._synced_state(engine))))
        return out if self.rank == 0 else None

    def broadcast(self) -> float:
        """Send the student's, then the critic's buckets to the group (every rank joins the gathers under
        ZeRO-3, rank 0 sends from the gathered weights, one bucket at a time); the seconds spent."""
        t0 = time.perf_counter()
        for engine in (self.student, self.critic):
            with self._ds.full_params(engine, self.zero):
                if self.rank == 0:
                    weightsync.pack(self._synced_state(engine), to_numpy=False, sink=self._group.send)
        return time.perf_counter() - t0

    def _synced_state(self, engine) -> dict:
        return lora.adapter_parameters(engine.module) if self.lora else engine.module.state_dict()

    def report(self, step: int, figures: dict) -> None:
        """The step's figures to the WeightStore, for the driver's log (rank 0; not waited for)."""
        if self.rank == 0:
            self.store.report.remote(step, figures)

    def result(self) -> tuple[dict, dict] | None:
        """(student EMA, critic) state dicts on rank 0 (every rank joins the gather), None elsewhere:
        plain diffusers state dicts, with LoRA the adapters merged into the base weights."""
        if self._publishing is not None:
            ray.get(self._publishing)
        with self._ds.full_params(self.critic, self.zero, frozen=True):
            critic = lora.merged_state_dict(self.critic.module) if self.rank == 0 else None
        if self.rank != 0:
            return None
        return lora.merged_state_dict(self.ema.model), critic
