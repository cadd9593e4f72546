"""The learners of the on-policy stage: the Ray Train `TorchTrainer` train function.

Each worker (one data-parallel rank of W) builds the student and the critic as DeepSpeed
engines (`learners.deepspeed_setup.wrap`), then for every step i:

1. takes its slice refs of step i from the ReplayBuffer (rollout: x_old, x_crit; target: y);
2. regenerates the step's draws (`reference.stage2_draws`) and keeps its rows (`slice_rows`);
3. recomputes the rollout x_theta from the same noise, N and k *with* gradient and minimises
   the decoupled DMD loss `mean((x_theta - y)^2)` plus the co-training stage-1 loss on its
   rows of the step's real-data batch (the r != t rescaling is over the global batch:
   `all_reduce` sums its statistics over ranks); DeepSpeed averages the gradients, so the
   update is the reference's on the global batch;
4. updates the student EMA (rank 0 holds it), then trains the critic by flow matching on
   the buffered x_crit with the critic draws;
5. publishes version i + 1 to the WeightStore: under ZeRO-3 every rank joins the gather,
   rank 0 sends the full state dicts and the step's figures (losses averaged over ranks).

Co-training data: every learner holds the *whole* train split, not a shard of it. The step's
draws address rows by their global index in the split (exactly as the reference does), so
rank r's rows of the co-training batch can be any rows of the split; holding it all keeps
the Ray stage identical to the reference. A shard per learner (Ray Data `streaming_split`)
would sample differently; that is the choice for datasets too large to hold per learner.
The split is read once through Ray Data (`read_train_split`: `read_parquet` in shard order,
materialized in the object store) before the pools are placed, and each learner converts
every block with `batch_to_tensors`. Reading on each learner instead cost 5-20 s per learner
on 2 cores, and Ray Data's file-listing task takes a whole CPU, which a cluster full of
actors does not have (the read then waits forever).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from actors import trajectory as T
from actors.rollout import draws_to
from pipeline import reference
from pipeline.config import Config
from pipeline.data.schema import LatentDataset, batch_to_tensors, read_meta, shard_paths
from pipeline.flowmap import losses
from pipeline.flowmap.draws import slice_rows
from pipeline.flowmap.models import StudentFn, VelocityFn
from pipeline import metrics as M



@dataclass
class LearnerSetup:
    """Everything a learner worker needs (passed through `train_loop_config`)."""

    cfg: Config
    stage: str
    data_dir: str
    null_embed: torch.Tensor
    student_config: dict
    critic_config: dict
    init_refs: list
    """[student state ref, critic state ref] of version 0"""
    store: object
    buffer: object
    train_split: object
    """the train split as a materialized Ray Data dataset (`read_train_split`)"""
    threads: int = 1
    use_gpu: bool = False


def read_train_split(data_dir: str) -> "ray.data.MaterializedDataset":
    """The train split as a Ray Data dataset, read once and held in the object store, rows in the
    order of `read_split` (shards by name, rows in order). Called by the driver before any pool
    is placed: Ray Data's file-listing task needs one free CPU."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        paths = [str(p) for p in shard_paths(data_dir, "train")]
        return ray.data.read_parquet(paths).materialize()
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before


def train_split_of(ds, data_dir: str, null_embed: torch.Tensor) -> reference.TrainData:
    """Every row of the dataset as tensors (`batch_to_tensors` checks them against dataset.json)."""
    meta = read_meta(data_dir)
    parts = [batch_to_tensors(b, meta["latent_shape"], meta["embed_shape"], where=f"{data_dir}/train")
             for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    split = LatentDataset.concat(parts)
    return reference.TrainData(split.latents, split.prompt_embeds, null_embed.reshape(1, *null_embed.shape[-2:]))


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class OnDevice:
    """`reference.TrainData` whose batches land on the learner's device (the split stays on CPU)."""

    def __init__(self, data: reference.TrainData, device: torch.device):
        self.data, self.device = data, device
        self.latents, self.latent_shape = data.latents, data.latent_shape
        self.null_embed = data.null_embed.to(device)

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None):
        x, cond = self.data.batch(index.cpu(), None if drop is None else drop.cpu())
        return x.to(self.device), cond.to(self.device)


class OnPolicyLearner:
    """One rank's student and critic engines and its step."""

    def __init__(self, s: LearnerSetup, data: reference.TrainData, rank: int, world: int, device: torch.device):
        from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

        from learners import deepspeed_setup as ds

        self.s, self.data, self.rank, self.world = s, OnDevice(data, device), rank, world
        self.device = device
        self.c = getattr(s.cfg, s.stage)
        self.zero = s.cfg.ray.zero_stage
        student_state, critic_state = ray.get(list(s.init_refs))
        student = AnyFlowTransformer3DModel.from_config(s.student_config)
        student.load_state_dict(student_state)
        critic = WanTransformer3DModel.from_config(s.critic_config)
        critic.load_state_dict(critic_state)
        student, critic = student.to(device), critic.to(device)
        micro = self.c.batch_size // world
        self.student, self.ema = ds.wrap(student, self.c.optim, self.zero, micro, keep_ema=rank == 0)
        self.critic, _ = ds.wrap(critic, self.c.critic_optim, self.zero, micro, keep_ema=False)
        self.u_fn, self.c_fn = StudentFn(self.student), VelocityFn(self.critic)
        self.settings, self.calls = reference.stage1_settings(s.cfg), reference.grad_calls_of(self.c)
        self.rows = T.rank_rows(self.c.batch_size, world, rank)
        self._ds = ds

    def _take(self, step: int) -> tuple[dict, dict]:
        rollout_ref, target_ref = ray.get(self.s.buffer.take.remote(step, self.rank))
        return tuple(ray.get([rollout_ref, target_ref]))

    def step(self, step: int) -> dict:
        """One generator step and one critic step (ALGORITHM.md, stage 2, decoupled form)."""
        cfg, c, data, stage = self.s.cfg, self.c, self.data, self.s.stage
        t0 = time.perf_counter()
        # 1. this rank's slices of the step's rollout and target
        rollout, target = self._take(step)
        t1 = time.perf_counter()
        # 2. the step's draws, this rank's rows
        gen, crit, co = reference.stage2_draws(cfg, stage, step, len(data.latents), data.latent_shape)
        gen, crit, co = (draws_to(slice_rows(d, *self.rows), self.device) for d in (gen, crit, co))
        # 3. generator: differentiable rollout from the same noise, N, k; decoupled DMD + co-training
        x_theta = reference.rollout(self.u_fn, data, gen, cfg.model.shift, stage == "consistency", self.calls)
        loss_dmd = losses.dmd_loss(x_theta, target[T.Y].to(self.device), c.dmd_weight)
        loss, loss_co = loss_dmd, torch.zeros(())
        if c.cotrain_weight > 0:
            x, cond_co = data.batch(co.index, co.drop)
            loss_co, _ = losses.forward_flowmap_loss(self.u_fn, x, cond_co, data.null_embed, co.t, co.r, co.eps,
                                                     self.settings, all_reduce=_sum_over_ranks)
            loss = loss + c.cotrain_weight * loss_co
        self.student.backward(loss)
        self.student.step()
        norm = float(self.student.get_global_grad_norm() or 0.0)
        # 4. student EMA (rank 0), then the critic: flow matching on the buffered critic rollouts
        with self._ds.full_params(self.student, self.zero):
            if self.ema is not None:
                self.ema.update(self.student.module, step)
        _, cond_c = data.batch(crit.index)
        loss_critic = losses.flow_matching_loss(self.c_fn, rollout[T.X_CRIT].to(self.device), cond_c, crit.s, crit.eps)
        self.critic.backward(loss_critic)
        self.critic.step()
        # 5. the global figures (losses averaged over ranks)
        means = _sum_over_ranks(torch.stack([loss_dmd, loss_co, loss, loss_critic]).detach().float()) / self.world
        return {M.LOSS_DMD: float(means[0]), M.LOSS_COTRAIN: float(means[1]), M.LOSS_STUDENT: float(means[2]),
                M.LOSS_CRITIC: float(means[3]), M.GRAD_NORM_STUDENT: norm, M.WAIT_SECONDS: t1 - t0,
                M.LEARNER_SECONDS: time.perf_counter() - t1}

    def publish(self, version: int) -> float:
        """Version `version` to the WeightStore (every rank joins the gathers, rank 0 sends); its seconds."""
        t0 = time.perf_counter()
        with self._ds.full_params(self.student, self.zero):
            student = self._ds.state_dict_of(self.student) if self.rank == 0 else None
        with self._ds.full_params(self.critic, self.zero):
            critic = self._ds.state_dict_of(self.critic) if self.rank == 0 else None
        if self.rank == 0:
            ray.get(self.s.store.publish.remote(version, student, critic))
        return time.perf_counter() - t0

    def report(self, step: int, figures: dict) -> None:
        """The step's figures to the WeightStore, for the driver's log (rank 0; not waited for)."""
        if self.rank == 0:
            self.s.store.report.remote(step, figures)

    def finish(self) -> None:
        """The stage's result: rank 0 sends the student EMA and the critic."""
        with self._ds.full_params(self.critic, self.zero):
            critic = self._ds.state_dict_of(self.critic) if self.rank == 0 else None
        if self.rank == 0:
            ema = {k: v.detach().to("cpu", copy=True) for k, v in self.ema.state_dict().items()}
            ray.get(self.s.store.finish.remote(ema, critic))


def train_loop(config: dict) -> None:
    """The Ray Train worker function: build, then `steps` on-policy steps, then the result."""
    s: LearnerSetup = config["setup"]
    torch.set_num_threads(max(1, s.threads))
    rank, world = dist.get_rank(), dist.get_world_size()
    if s.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    data = train_split_of(s.train_split, s.data_dir, s.null_embed)
    learner = OnPolicyLearner(s, data, rank, world, device)
    last = time.perf_counter()
    for step in range(getattr(s.cfg, s.stage).steps):
        figures = learner.step(step)
        figures[M.SYNC_SECONDS] = learner.publish(step + 1)
        now = time.perf_counter()
        figures[M.STEP_SECONDS], last = now - last, now
        learner.report(step, figures)
    learner.finish()
