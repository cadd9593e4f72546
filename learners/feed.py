"""Streaming ingestion: each learner rank gets, step by step, exactly the rows of the train split it trains on.

No learner holds the split. A step's draws are functions of (seed, stage, step) (pipeline/flowmap/draws.py)
and address rows by global index, so the rows rank r of W needs at step i are known before any data
is read (`steps.step_rows`: its slice of the step's batch; in the on-policy stages the co-training rows with
latents, the generator and critic rollouts' rows with their prompt embeddings only). The learner group
therefore takes its data as a Ray Data pipeline, sharded across the ranks by Ray Train:

    driver:      TorchTrainer(datasets={"rows": StepPlan(...)}, dataset_config=RankShards(...))
    StepPlan     (called by Ray Train each time it starts the worker group, so a restored group or a
                 run started again gets a plan that begins at the checkpoint it resumes from):
                 ray.data.from_items([(stage, step, every rank's rows of it) for every step of the
                 session from the resume point]) (`plan_items`)
    RankShards   (a ray.train.DataConfig): rank r's shard = plan.map_batches(read_plan_rows, rank=r):
                 for each step, the rows rank r needs, read from the Parquet shards by (shard, row
                 group, offset) (`pipeline.data.rows`), one output row per step; in plan order
                 (preserve_order), read tasks capped at `data.stream_prefetch` in flight, 0 CPUs each
                 (the cluster's CPUs belong to the pools; the reads are I/O); Ray Data's scheduling
                 loop, which runs in the learner's process, sleeps while it can only wait (`IdleBackoff`)
    learner r:   ray.train.get_dataset_shard("rows").iter_batches(batch_size=1, prefetch_batches=...)
                 -> `StreamedRows.at(stage, step)` before each step; `batch(index, drop)` serves the
                 step's rows and refuses any row it was not sent.

Exactness: the rows served are those `steps.step_rows` names, which are the rows of the very draws the
reference makes (the same generator, the same indices); `batch` gathers them in the order the draws ask
for, so every tensor a learner trains on equals the reference's. A record of another step than the one
asked for is an error (records before the resume step are skipped: a plan made from an older checkpoint).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pyarrow as pa
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.train import DataConfig

from pipeline import steps
from pipeline.config import Config
from pipeline.data.rows import read_plan_rows
from pipeline.flowmap import losses

SUPERVISED = ("teacher", "stage1")
"""stages whose step reads one batch of data rows (the on-policy stages read up to three: co-training
rows with latents, generator and critic rollout rows with prompt embeddings)"""

DATASET = "rows"
"""the name of the row stream among the trainer's datasets"""

def plan_items(cfg: Config, stages: list[str], start: tuple[str, int] | None,
               num_rows: int | None = None) -> list[dict]:
    """Every (stage, step) the session trains, in order, from `start` (the resumed stage and step) on; with
    `num_rows` (the train split's rows) also the rows every learner rank reads at that step (`data_rows`,
    `prompt_rows`: one list of global indices per rank, `steps.step_rows`). The plan carries them so that a
    read task needs no draw, hence not `pipeline.steps` and the model code it imports (about 10 s of CPU
    per fresh worker process against 2 s for `pipeline.data.rows`)."""
    at = 0 if start is None else stages.index(start[0])
    world = cfg.ray.learners
    items = []
    for stage in stages[at:]:
        first = start[1] if start is not None and stage == start[0] else 0
        batch = getattr(cfg, stage).batch_size
        for i in range(first, getattr(cfg, stage).steps):
            item = {"stage": stage, "step": i}
            if num_rows is not None:
                rows = [steps.step_rows(cfg, stage, i, num_rows, steps.rank_rows(batch, world, r))
                        for r in range(world)]
                item["data_rows"], item["prompt_rows"] = [d for d, _ in rows], [p for _, p in rows]
            items.append(item)
    return items


def resume_start(storage: str | None, stages: list[str]) -> tuple[str, int] | None:
    """(stage, step) of the newest checkpoint under `storage` (Ray Train's folder of the learners' run), if
    its stage is one the session trains (the rule of `learners.session.resume_point`), else None."""
    from learners import checkpoint

    if storage is None:
        return None
    folder = checkpoint.newest(storage)
    if folder is None:
        return None
    meta = checkpoint.read_meta(folder)
    return (meta["stage"], int(meta["step"])) if meta["stage"] in stages else None


class StepPlan:
    """The trainer's `datasets` entry: called by Ray Train at every start of the worker group, it returns the
    plan dataset from the step the group resumes at."""

    def __init__(self, cfg: Config, stages: list[str], storage: str | None = None, row_bytes: int = 0,
                 start: tuple[str, int] | None = None, num_rows: int = 0):
        self.cfg, self.stages, self.storage = cfg, list(stages), None if storage is None else str(storage)
        self.row_bytes, self.start, self.num_rows = row_bytes, start, num_rows

    def step_bytes(self) -> int:
        """The most bytes of rows one rank reads for one step of the session's stages."""
        world = self.cfg.ray.learners
        return max(getattr(self.cfg, s).batch_size // world * (1 if s in SUPERVISED else 3) * self.row_bytes
                   for s in self.stages)

    def steps_per_block(self) -> int:
        """Steps one read task reads: as many as fit in `data.stream_block_mb` MiB of one rank's rows (at
        least one). Small rows (the toy world) then cost one Ray task per many steps; real rows one per step."""
        return max(1, int(self.cfg.data.stream_block_mb * 2**20 // max(self.step_bytes(), 1)))

    def read_ahead_bytes(self) -> int:
        """The object-store budget of one rank's stream: `data.stream_prefetch` + 2 blocks. Without it Ray
        Data reads ahead up to its own share of the object store (a slow learner: the whole plan of a
        60-step test was read after 20 steps); with it, a few steps (6 in that test)."""
        return (self.cfg.data.stream_prefetch + 2) * self.steps_per_block() * max(self.step_bytes(), 1)

    def __call__(self):
        import ray

        if self.num_rows <= 0:
            raise ValueError("StepPlan needs num_rows (the train split's rows) to plan each rank's rows")
        start = self.start if self.start is not None else resume_start(self.storage, self.stages)
        items = plan_items(self.cfg, self.stages, start, self.num_rows)
        if not items:  # every step done: an empty plan still needs a schema
            empty = [[] for _ in range(self.cfg.ray.learners)]
            items = [{"stage": "", "step": -1, "data_rows": empty, "prompt_rows": empty}]
        return ray.data.from_items(items, override_num_blocks=-(-len(items) // self.steps_per_block()))


def row_bytes(data_dir: str) -> int:
    """Bytes of one train row's latents and prompt embedding (float32), from dataset.json."""
    from pipeline.data.schema import read_meta

    meta = read_meta(data_dir)
    return 4 * (int(np.prod(meta["latent_shape"])) + int(np.prod(meta["embed_shape"])))


class IdleBackoff(ExecutionCallback):
    """Sleeps Ray Data's scheduling loop while it can only wait for the learner.

    The streaming executor runs in the learner's own process (a thread of `iter_batches`). Its loop blocks in
    `ray.wait` on the read tasks in flight, but once the read-ahead budget is full a task's next output is
    ready and may not be taken (output backpressure), so `ray.wait` returns at once and the loop spins,
    holding the GIL about a third of the time. py-spy on a stage-1 learner (default run, Ray 2.60): that
    thread ran in 98 % of the samples beside the training thread, whose small-op steps then took 2.5-3x as
    long until the plan was read (the stage ran at 0.6-0.8 it/s against 2.9 in one process).

    After a loop step in which some operator is in output backpressure or has no task in flight, this
    callback sleeps `IDLE_SLEEP_S`: the loop then polls about 50 times a second while the learner trains.
    The added latency (at most `IDLE_SLEEP_S` before a freed budget is used) is hidden by the read-ahead of
    `data.stream_prefetch` blocks. Registered through `DataContext.custom_execution_callback_classes`; the
    callback interface and the operator state it reads are Ray Data internals (Ray 2.60); where they are
    missing it sleeps after every step."""

    IDLE_SLEEP_S = 0.02

    def __init__(self):
        self.idle_steps = 0

    @staticmethod
    def _busy(executor) -> bool:
        """Whether the loop's next `ray.wait` will block: some task in flight and no output held back."""
        try:
            ops = list(executor._topology)
            return any(op.get_active_tasks() for op in ops) and \
                not any(op._in_task_output_backpressure for op in ops)
        except AttributeError:
            return False

    def on_execution_step(self, executor) -> None:
        if self._busy(executor):
            return
        self.idle_steps += 1
        time.sleep(self.IDLE_SLEEP_S)


def rank_stream(plan, cfg: Config, data_dir: str, rank: int, prefetch: int, budget: int | None = None):
    """Rank `rank`'s shard of the plan: its rows of every step, in plan order, read ahead within `budget`
    bytes of the object store (`StepPlan.read_ahead_bytes`) when given."""
    # a function of pipeline.data.rows: what a read task's fresh worker process imports is the data code only
    fn = functools.partial(read_plan_rows, data_dir=data_dir, rank=rank)
    shard = plan.map_batches(fn, batch_size=1, batch_format="pyarrow", num_cpus=0, concurrency=max(1, prefetch))
    options = shard.context.execution_options
    options.preserve_order = True  # steps in plan order
    if budget is not None:
        options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    shard.context.enable_progress_bars = False
    if IdleBackoff not in shard.context.custom_execution_callback_classes:
        shard.context.custom_execution_callback_classes = [*shard.context.custom_execution_callback_classes,
                                                           IdleBackoff]
    return shard


class RankShards(DataConfig):
    """A `ray.train.DataConfig` that shards the step plan by rank: rank r gets the plan with its own rows
    read in (`rank_stream`), not a slice of the plan (each rank trains every step, on its rows of it)."""

    def __init__(self, cfg: Config, data_dir: str, num_rows: int, plan: StepPlan | None = None):
        super().__init__(datasets_to_split=[])  # no streaming_split: the plan is not cut, it is mapped per rank
        self.cfg, self.data_dir, self.num_rows = cfg, str(data_dir), num_rows
        self.budget = None if plan is None else plan.read_ahead_bytes()

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for r in range(world_size):
                shard = rank_stream(ds, self.cfg, self.data_dir, r, self.cfg.data.stream_prefetch, self.budget)
                out[r][name] = shard.iterator()
        return out


class StreamedRows:
    """A learner rank's data: the rows of one step at a time, from its shard of the row stream.

    The interface the learners and `steps.rollout` use (`batch`, `latent_shape`, `null_embed`, `num_rows`);
    `at(stage, step)` moves to a step. Batches land on `device`."""

    def __init__(self, records, latent_shape, embed_shape, num_rows: int, null_embed: torch.Tensor,
                 device: torch.device, stage_order: list[str], reopen=None):
        self._records = iter(records)
        self._reopen = reopen
        self.reopened = 0
        self.latent_shape, self.embed_shape = tuple(latent_shape), tuple(embed_shape)
        self.num_rows, self.device = num_rows, device
        self._null_cpu = null_embed.reshape(1, *self.embed_shape)
        self.null_embed = self._null_cpu.to(device)
        self.order = {s: i for i, s in enumerate(stage_order)}
        self.key: tuple[str, int] | None = None
        self._pos: dict[int, int] = {}
        self._latents = self._embeds = None
        self._with_latents = 0
        self.held_rows = self.max_held_rows = self.skipped = 0

    @classmethod
    def from_shard(cls, shard, latent_shape, embed_shape, num_rows, null_embed, device, stage_order, prefetch: int,
                   reopen=None):
        return cls(_batches(shard, prefetch), latent_shape, embed_shape, num_rows, null_embed, device, stage_order,
                   reopen)

    def at(self, stage: str, step: int) -> None:
        """Hold the rows of (stage, step), dropping the step before; the next record of the stream must be it
        (records before it are skipped)."""
        if self.key == (stage, step):
            return
        want = (self.order[stage], step)
        self._drop()
        while True:
            try:
                rec = next(self._records)
            except StopIteration:
                raise RuntimeError(f"the row stream ended before {stage} step {step}") from None
            got_stage, got_step = rec.column("stage")[0].as_py(), int(rec.column("step")[0].as_py())
            got = (self.order.get(got_stage, -1), got_step)
            if got < want:
                self.skipped += 1
                continue
            if got > want and self._reopen is not None and not self.reopened:
                # the plan began after the step this rank resumes at: Ray Train restored an older checkpoint
                # than the newest on disk (a failure right after a report); a stream of its own from there
                print(f"[rows] the stream begins at {got_stage} step {got_step}, the learner resumes at {stage} "
                      f"step {step}: streaming from there", flush=True)
                self._records, self.reopened = iter(self._reopen(stage, step)), self.reopened + 1
                continue
            if got > want:
                raise RuntimeError(f"the row stream sent {got_stage} step {got_step} where {stage} step {step} "
                                   "was expected")
            break
        data_rows = rec.column("data_rows")[0].as_py()
        prompt_rows = rec.column("prompt_rows")[0].as_py()
        rows = data_rows + prompt_rows
        self._latents = _tensor(rec.column("latents")[0], (len(data_rows), *self.latent_shape))
        self._embeds = _tensor(rec.column("prompt_embeds")[0], (len(rows), *self.embed_shape))
        self._pos = {r: i for i, r in enumerate(rows)}
        self._with_latents = len(data_rows)
        self.key = (stage, step)
        self.held_rows = len(rows)
        self.max_held_rows = max(self.max_held_rows, self.held_rows)

    def _drop(self) -> None:
        self._latents = self._embeds = None
        self._pos, self.held_rows, self.key = {}, 0, None

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None):
        """(latents, prompt embeddings) of the global rows `index` of the current step, in that order, with
        the prompts of `drop` replaced by the null prompt; latents are None for rows sent with their
        prompt embedding only (rollout rows)."""
        idx = [int(i) for i in index.reshape(-1).tolist()]
        missing = [i for i in idx if i not in self._pos]
        if missing:
            raise RuntimeError(f"rows {missing[:8]} of {self.key} were not streamed to this learner")
        pos = torch.tensor([self._pos[i] for i in idx], dtype=torch.long)
        cond = self._embeds[pos]
        x = self._latents[pos] if bool((pos < self._with_latents).all()) else None
        if drop is not None:
            cond = losses.drop_prompts(cond, self._null_cpu, drop.cpu())
        return (None if x is None else x.to(self.device)), cond.to(self.device)


def _batches(shard, prefetch: int):
    return shard.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=max(0, prefetch))


def _tensor(value: pa.Scalar, shape: tuple[int, ...]) -> torch.Tensor:
    buf = value.as_buffer()
    arr = np.frombuffer(buf, dtype="<f4", count=int(np.prod(shape)) if shape else 0)
    return torch.from_numpy(arr.reshape(shape).astype(np.float32, copy=True))


def stream_for(s, rank: int, device: torch.device, stage_order: list[str]) -> StreamedRows:
    """Rank `rank`'s `StreamedRows` from its Ray Train dataset shard (inside a train worker)."""
    import ray.train

    from pipeline.data.schema import read_meta

    meta = read_meta(s.data_dir)
    shard = ray.train.get_dataset_shard(DATASET)
    n = meta["num_rows"]["train"]

    def reopen(stage: str, step: int):
        """This rank's stream from (stage, step) on, outside Ray Train's datasets (see `StreamedRows.at`)."""
        plan = StepPlan(s.cfg, s.stages, None, row_bytes(s.data_dir), start=(stage, step), num_rows=n)
        mine = rank_stream(plan(), s.cfg, s.data_dir, rank, s.cfg.data.stream_prefetch, plan.read_ahead_bytes())
        return _batches(mine, s.cfg.data.stream_prefetch)

    return StreamedRows.from_shard(shard, meta["latent_shape"], meta["embed_shape"], n, s.null_embed, device,
                                   stage_order, s.cfg.data.stream_prefetch, reopen)

