"""What one training step of each stage is, shared by the one-process reference and the Ray roles.

    pipeline/flowmap, pipeline/data   the algorithm and the data (no Ray, no MLflow)
        ^
    pipeline/steps (this module)      a step's draws, rollout, settings, LoRA choices, prompt rows,
        ^                             and the trajectory record the fleet hands the learners
        |
    pipeline/reference.py             the one-process loop over these steps (the oracle)
    actors/, learners/                the Ray roles, built from the same steps; they never import
                                      each other: they meet through refs and the `Trajectory`

Every random draw of a step is a function of (seed, stage, step) (pipeline/flowmap/draws.py),
so a rollout actor, a scorer and every learner rank regenerate exactly the draws the reference
makes, and at policy lag 0 the Ray pipeline reproduces the reference step for step.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from pipeline.config import Config, Stage2Config
from pipeline.data.schema import LatentDataset
from pipeline.flowmap import draws, far, lora, losses
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

from pipeline.flowmap.models import StudentFn, student_arch
from pipeline.flowmap.schedule import PairFractions
from pipeline.flowmap.simulate import GradCalls, backward_simulate, consistency_backward_simulate

Log = Callable[[str, int, dict], None]
"""log(stage, step, figures): where the stages report per-step figures."""


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch CPU threads (as a learner or actor with `n` CPUs does), then restore
    the caller's count, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

ENDPOINT_ONLY = PairFractions(diffusion=0.5, endpoint=0.5)
"""the consistency baseline's co-training pairs: no free r, only r = t and r = 0"""


# ----------------------------------------------------------------------------- prompt rows


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

    @property
    def num_rows(self) -> int:
        return len(self.latents)

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None):
        x, cond = self.latents[index], self.prompt_embeds[index]
        if drop is not None:
            cond = losses.drop_prompts(cond, self.null_embed, drop)
        return x, cond


class PromptRows:
    """The part of `TrainData` a rollout needs: prompt embeddings by row index."""

    def __init__(self, prompt_embeds: torch.Tensor, null_embed: torch.Tensor):
        self.prompt_embeds, self.null_embed = prompt_embeds, null_embed

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None):
        if drop is not None:
            raise ValueError("rollouts never drop prompts")
        return None, self.prompt_embeds[index.to(self.prompt_embeds.device)]


def draws_to(d, device: torch.device):
    """A draws dataclass with every tensor moved to `device`."""
    return replace(d, **{f.name: getattr(d, f.name).to(device) for f in fields(d)
                         if torch.is_tensor(getattr(d, f.name))})


# ----------------------------------------------------------------------------- stages 0 and 1


def stage1_settings(cfg: Config) -> losses.Stage1Settings:
    return losses.Stage1Settings(guidance=cfg.stage1.guidance, fd_step=cfg.stage1.fd_step, shift=cfg.model.shift)


def stage1_fractions(cfg: Config) -> PairFractions:
    return PairFractions(cfg.stage1.diffusion_fraction, cfg.stage1.endpoint_fraction)


def supervised_draws(cfg: Config, stage: str, step: int, num_rows: int, latent_shape) -> draws.DataDraws:
    """The draws of one step of stage 0 (`teacher`: rows, t logit-normal and shifted, noise, prompt dropout)
    or stage 1 (`stage1`: the same with (t, r) pairs partitioned by index), for the whole global batch."""
    if stage == "teacher":  # the teacher's own training time distribution (teacher.shift, teacher.t_mean)
        fractions, shift_k, t_mean = None, cfg.teacher.train_shift(cfg.model.shift), cfg.teacher.t_mean
    else:
        fractions, shift_k, t_mean = stage1_fractions(cfg), cfg.model.shift, 0.0
    return draws.data_draws(cfg.run.seed, stage, step, getattr(cfg, stage).batch_size, num_rows, latent_shape,
                            shift_k, cfg.data.cond_dropout, fractions, t_mean)


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


INDEX_SHAPE = (1, 1, 1, 1)
"""the latent shape the row plan draws with: every draw takes its row indices from its generator before any
draw whose size depends on the latent shape (pipeline/flowmap/draws.py), so the indices are those of the
step's real draws, at a fraction of the cost (tests/test_steps.py checks it)"""


def step_rows(cfg: Config, stage: str, step: int, num_rows: int, rows: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(data rows, prompt rows) of one step for the learner rank that trains rows [start, stop) of its
    global batch: the sorted global row indices whose latents and prompt embeddings it reads (stage 0 and
    1 batches, the on-policy co-training batch) and those whose prompt embedding alone it needs (the
    on-policy generator and critic rollouts). A function of (cfg, stage, step, rows) only, so the rows a
    learner needs are known before any data is read (the streaming learners, learners/feed.py)."""
    from pipeline.flowmap.draws import slice_rows

    if stage in ("teacher", "stage1"):
        d = slice_rows(supervised_draws(cfg, stage, step, num_rows, INDEX_SHAPE), *rows)
        return sorted(set(d.index.tolist())), []
    gen, crit, co = (slice_rows(d, *rows) for d in stage2_draws(cfg, stage, step, num_rows, INDEX_SHAPE))
    data = sorted(set(co.index.tolist())) if getattr(cfg, stage).cotrain_weight > 0 else []
    prompts = sorted((set(gen.index.tolist()) | set(crit.index.tolist())) - set(data))
    return data, prompts


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


# ----------------------------------------------------------------------------- causal (FAR) students
#
# With model.causal the students are AnyFlowFARTransformer3DModel (pipeline/flowmap/far.py); teacher and
# critic stay bidirectional. A step is the bidirectional one with three functions swapped, chosen here so
# that the reference loop (and later the Ray roles) call one thing whatever the model: `student_loss`
# (stage 1 and co-training: teacher-forced on causal students), `student_rollout` (backward simulation
# chunk by chunk through the student's own KV cache) and `prepared` (the attention processor).

NUM_CHUNKS_STREAM = 9
"""draws stream of the number of chunks a teacher-forced batch keeps (the same on every rank)"""


def prepared(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """`model` ready to train or sample here: a causal student gets the dense attention processor in the
    configured padding form (a FAR model loaded from a folder comes with diffusers' flex one); idempotent."""
    if cfg.model.causal:
        far.set_far_attention(model, "dense", cfg.model.far.pad)
    return model


def far_student_from(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """The causal student converted from a bidirectional student or a Wan teacher (only far_patch_embedding
    is new), with the configured chunk partition, full-resolution limit and compressed patch."""
    f = cfg.model.far
    return prepared(cfg, far.far_from_bidirectional(model, f.chunk_partition, f.full_chunk_limit,
                                                    f.compressed_patch_size))


def student_config(cfg: Config, teacher_config: dict) -> dict:
    """The constructor arguments of the run's student from its teacher's config: AnyFlow, or with
    model.causal AnyFlow-FAR (the same plus the chunk partition, limit and compressed patch)."""
    arch = student_arch(teacher_config)
    if not cfg.model.causal:
        return arch
    f = cfg.model.far
    return {**arch, "chunk_partition": list(f.chunk_partition), "full_chunk_limit": f.full_chunk_limit,
            "compressed_patch_size": list(f.compressed_patch_size)}


def build_student(cfg: Config, config: dict, state: dict | None = None) -> torch.nn.Module:
    """A student of `config` (a `student_config`, or a student's `dict(model.config)`: AnyFlow-FAR when it has
    a `full_chunk_limit`), with `state` loaded, `prepared` (how the Ray roles build their students)."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cls = AnyFlowFARTransformer3DModel if "full_chunk_limit" in config else AnyFlowTransformer3DModel
    model = cls.from_config(config)
    if state is not None:
        model.load_state_dict(state)
    return prepared(cfg, model) if cls is AnyFlowFARTransformer3DModel else model


def student_fn(cfg: Config, model: torch.nn.Module):
    """A `FlowMapFn` through `model` on a whole clip (B, F, ...) (a learner's priming forward): the model
    itself, or for a causal student its first chunk, with no context."""
    if not cfg.model.causal:
        return StudentFn(model)
    first = cfg.model.far.chunk_partition[:1]

    def fn(z, t, r, cond):
        return far.ChunkFn(model, far.empty_cache(model, z), first)(z[:, :first[0]], t, r, cond)
    return fn


def num_chunks_of(cfg: Config, stage: str, step: int) -> int:
    """How many leading chunks the teacher-forced batch of (stage, step) keeps (`far.draw_num_chunks`),
    a function of (seed, stage, step) like every other draw."""
    f = cfg.model.far
    g = draws.generator(cfg.run.seed, stage, step, stream=NUM_CHUNKS_STREAM)
    rng = random.Random(int(torch.randint(2**62, (1,), generator=g)))
    return far.draw_num_chunks(len(f.chunk_partition), f.full_chunk_limit, f.long_context_ratio, rng)


def student_loss(cfg: Config, model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, null_embed: torch.Tensor,
                 d: draws.DataDraws, stage: str, step: int,
                 all_reduce: losses.AllReduce | None = None) -> tuple[torch.Tensor, dict]:
    """The stage-1 loss of `model` on a real-data batch (stage 1 itself, and stage 2's co-training): the forward
    flow-map loss, teacher-forced on a causal student (its number of chunks: `num_chunks_of`, and then
    figures["num_chunks"])."""
    settings = stage1_settings(cfg)
    if not cfg.model.causal:
        return losses.forward_flowmap_loss(StudentFn(model), x, cond, null_embed, d.t, d.r, d.eps, settings,
                                           all_reduce)
    f, n = cfg.model.far, num_chunks_of(cfg, stage, step)
    loss, figures = far.teacher_forced_flowmap_loss(model, x, cond, null_embed, d.t, d.r, d.eps, n,
                                                    f.chunk_partition, f.full_chunk_limit, settings, all_reduce)
    return loss, {**figures, "num_chunks": n}


def student_rollout(cfg: Config, model: torch.nn.Module, data, r: draws.RolloutDraws, consistency: bool,
                    grad_calls: GradCalls):
    """The on-policy sample of a rollout draw by `model`: `rollout` for a bidirectional student; for a causal
    one, chunk by chunk with the same (N, k) for every chunk, each chunk conditioned on the student's own
    earlier chunks through a fresh KV cache (far.far_backward_simulate, or the consistency form)."""
    if not cfg.model.causal:
        return rollout(StudentFn(model), data, r, cfg.model.shift, consistency, grad_calls)
    _, cond = data.batch(r.index)
    cp = cfg.model.far.chunk_partition
    if consistency:
        return far.far_consistency_backward_simulate(model, r.noise, cond, r.num_steps, r.k, cfg.model.shift,
                                                     r.renoise, cp, grad=grad_calls.shortcut_out)
    return far.far_backward_simulate(model, r.noise, cond, r.num_steps, r.k, cfg.model.shift, cp, grad_calls)


# ----------------------------------------------------------------------------- the trajectory record


@dataclass
class Trajectory:
    """One learner rank's rows of one on-policy step: what the rollout fleet makes and the learners train on.

    Made in two parts, so each tensor crosses the object store once and only to the rank that
    trains on it (rank r of W gets rows [r*B/W, (r+1)*B/W) of the step's global batch of B rows,
    `rank_rows`; every part is cut per rank *before* it is put in the object store, `split_rows`):

        RolloutWorker.rollout (actors/rollout.py):  x_old, x_crit, student_version   (y, critic_version None)
        Scorer.score (actors/scorer.py):            y, critic_version                (x_old, x_crit None)
        learner rank r (learners/onpolicy.py):      rollout.joined(target) -> the whole record

    The ReplayBuffer holds refs to the two parts, never the bytes. The noise, N, k and the DMD
    draws are not stored: every party regenerates them from (seed, stage, step) with
    `stage2_draws`; `num_steps` and `k` are stored as a check and for the logs.

    Tensors: shape (rows, F, C, H, W) (rows = B/W, then the dataset's latent shape), the models'
    dtype (float32), on the CPU.
    """

    stage: str
    """the on-policy stage: "stage2" or "consistency" """
    step: int
    """the on-policy step i; the learner trains it with student version i"""
    rows: tuple[int, int]
    """[start, stop) of this rank's rows in the step's global batch"""
    num_steps: int
    """N of the step's generator rollout (the critic rollout has its own N and k: its draws)"""
    k: int
    """k of the step's generator rollout: the real step is s_k -> s_{k+1} of the N-step grid"""
    student_version: int
    """the WeightStore version of the student that made x_old and x_crit (policy lag = step - version)"""
    critic_version: int | None = None
    """the WeightStore version of the critic the target was scored with (None in the rollout part)"""
    x_old: torch.Tensor | None = None
    """the detached generator rollout (backward simulation from the step's noise, N and k)"""
    x_crit: torch.Tensor | None = None
    """the detached critic rollout (its own noise, N and k), the critic's flow-matching data"""
    y: torch.Tensor | None = None
    """the DMD target y = x_old - grad (frozen teacher, guided, and the critic snapshot)"""

    def joined(self, target: "Trajectory") -> "Trajectory":
        """This rollout part completed by its scorer's `target` part (same stage, step and rows)."""
        if (target.stage, target.step, target.rows) != (self.stage, self.step, self.rows):
            raise ValueError(f"a target for {target.stage} step {target.step} rows {target.rows} does not fit "
                             f"the rollout of {self.stage} step {self.step} rows {self.rows}")
        return replace(self, critic_version=target.critic_version, y=target.y)


def rank_rows(batch: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank` among `world` equal data-parallel slices of `batch` rows."""
    if batch % world:
        raise ValueError(f"a batch of {batch} rows does not split evenly over {world} learners")
    per = batch // world
    return rank * per, (rank + 1) * per


def split_rows(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """`x` cut into `world` row slices, each a compact copy (a pickled view would carry all rows)."""
    return [x[slice(*rank_rows(x.shape[0], world, r))].detach().cpu().clone() for r in range(world)]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
