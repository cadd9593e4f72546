"""One typed config tree: nested dataclasses, YAML presets, generic dotted overrides.

    python -m pipeline.run [--config FILE] [dotted.key=value ...]

Every field has a docstring (the `--help` text). Values from YAML or the command line are
checked against the field's type; an unknown key or a bad value raises `ConfigError`
naming the key, which the entry point turns into a one-line error and exit status 2.
Derived sizes are computed once, in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.data.toy import ToyWorldConfig
from pipeline.flowmap.lora import DEFAULT_TARGETS

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad config key or value (reported as one line, exit status 2)."""


@dataclass
class RunConfig:
    name: str = "toy"
    """run name: outputs go to <output_dir>/<name>/; running again with the same name resumes"""
    output_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    seed: int = 0
    """seed of every random draw in the run"""
    stages: list[str] = field(default_factory=lambda: ["teacher", "stage1", "stage2", "consistency", "eval", "export"])
    """stages to run, in order, from: teacher, stage1, stage2, consistency, eval, export"""
    threads: int = 0
    """torch CPU threads in the driver process (0: leave torch's default)"""
    track: bool = True
    """track the run in MLflow (config as params, per-step metrics, eval, artifacts)"""
    tracking_uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else SQLite under output_dir"""
    checkpoint_every: int = 100
    """learner checkpoint every this many steps of a stage, and at each stage's end (0: only at the end)"""
    checkpoints_kept: int = 2
    """newest learner checkpoints kept by Ray Train"""
    learner_restarts: int = 1
    """times Ray Train restarts a failed learner group from the newest checkpoint before the run fails"""
    max_bad_steps: int = 5
    """bad training steps (non-finite loss, gradient norm or batch) in a row, each skipped, before the run aborts (exit status 3)"""


@dataclass
class DataConfig:
    path: str = ""
    """dataset folder in the project's Parquet schema; empty: the toy world, made under <output_dir>/data"""
    validate: str = "full"
    """check of data.path before any work: "full" (every row: shapes, finite values, unique ids) or "schema" (dataset.json, every shard's columns, types and row counts; rows are checked when read)"""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """the toy world (used when `path` is empty)"""
    cond_dropout: float = 0.1
    """fraction of prompts replaced by the null prompt in stage 0/1 batches (for guidance)"""
    stream_prefetch: int = 2
    """learners on Ray: steps of rows each learner's stream reads ahead (read tasks in flight and batches
    prefetched); the learners never hold the train split, only the rows of their current and next steps
    (docs/streaming.md)"""
    stream_block_mb: float = 16.0
    """learners on Ray: one read task of the row stream reads the rows of as many steps as fit in this many
    MiB of one learner's rows (at least one step): fewer tasks for small rows, one step per task for real ones"""


@dataclass
class ModelConfig:
    size: str = "toy"
    """architecture preset: tiny, toy, wan2.1-1.3b, wan2.1-14b"""
    teacher_path: str = "auto"
    """diffusers folder of a WanTransformer3DModel teacher (stage 0 is then skipped); "auto": the pretrained toy
    teacher shipped with the package (pipeline/teachers/toy) when model.size is toy and the data is the toy world,
    which must be the world it was made for; empty, or "auto" with another model or data: stage 0 trains one"""
    shift: float = 3.0
    """timestep shift k applied to every sampled or gridded noise level (Wan uses 5)"""
    init_seed: int = 0
    """seed of the teacher's random initialisation (stage 0)"""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """AdamW learning rate"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup: int = 50
    """linear warm-up steps"""
    grad_clip: float = 1.0
    """gradient-norm clip (0: off)"""
    ema: float = 0.99
    """EMA decay of the weights kept for sampling (0: no EMA)"""
    ema_start: int = 0
    """step from which the EMA is updated (copied before)"""


@dataclass
class TeacherConfig:
    steps: int = 1200
    """stage-0 optimiser steps (flow matching of the teacher from scratch)"""
    batch_size: int = 32
    """global batch"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup=100, ema=0.995, ema_start=200))
    """optimiser"""
    shift: float = 0.0
    """shift of the teacher's training noise levels (0: model.shift, the one every sampler uses); a larger one
    puts more training draws at high noise, where a sample's layout and motion are decided"""
    t_mean: float = 0.0
    """mean of the logit-normal draw of the teacher's training noise levels, before the shift (ALGORITHM.md:
    0); above 0 more draws land at high noise"""

    def train_shift(self, model_shift: float) -> float:
        """The shift of the training noise levels: `shift`, or the sampling shift when it is 0."""
        return self.shift or model_shift


@dataclass
class Stage1Config:
    steps: int = 600
    """forward flow-map training steps"""
    batch_size: int = 32
    """global batch"""
    guidance: float = 2.0
    """guidance scale w fused into the student (the student then samples at CFG 1)"""
    fd_step: float = 0.005
    """central-difference step d of dU/dt, in s units"""
    diffusion_fraction: float = 0.5
    """fraction of each batch with r = t"""
    endpoint_fraction: float = 0.25
    """fraction of each batch with r = 0"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup=50, ema=0.99, ema_start=100))
    """optimiser"""


@dataclass
class Stage2Config:
    steps: int = 200
    """on-policy generator steps (one critic step each)"""
    batch_size: int = 16
    """global batch of rollouts per generator step"""
    num_steps_choices: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    """N is drawn uniformly from this list each step (reference {2, 4, 8, 16, 50})"""
    grad_calls: list[str] = field(default_factory=lambda: ["shortcut_in", "real_step", "shortcut_out"])
    """backward-simulation calls that carry gradient (a suffix of shortcut_in, real_step, shortcut_out)"""
    real_guidance: float = 2.0
    """guidance g_r of the teacher's clean estimate in DMD"""
    dmd_min_s: float = 0.02
    """lower clamp of the DMD noise level"""
    dmd_max_s: float = 0.98
    """upper clamp of the DMD noise level"""
    dmd_weight: float = 1.0
    """weight of the DMD loss"""
    cotrain_weight: float = 1.0
    """weight of the stage-1 loss on a real-data batch added each step (0: off)"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.0, beta2=0.999, warmup=0,
                                                                    ema=0.95, ema_start=20))
    """student optimiser"""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.0, beta2=0.999,
                                                                           warmup=0, ema=0.0))
    """critic optimiser"""
    lora_rank: int = 0
    """LoRA rank of the student's and the critic's adapters (0: train every parameter). With LoRA the base
    weights stay frozen (the critic is a full teacher copy, so it gets adapters too), only the adapters are
    trained, checkpointed and sent to the rollout and scorer actors; the stage's result is merged"""
    lora_alpha: float = 0.0
    """LoRA scale numerator: the adapters add (lora_alpha / lora_rank) B A x (0: lora_alpha = lora_rank, scale 1)"""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """linear layers given adapters: a module named one of these, or ending in "." + one (default: every
    block's self- and cross-attention q, k, v, out and both FFN linears)"""


@dataclass
class EvalConfig:
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """sampling step counts evaluated"""
    num_samples: int = 256
    """videos generated per model and step count (prompts from the held-out split)"""
    ode_ref_steps: int = 32
    """Heun steps (2N guided teacher calls) of the high-accuracy ODE solution that ode_error compares to
    (toy world: 32 and 64 steps differ by an ode_error of 2.8e-5, 1 % of the smallest figure reported,
    the teacher's at 32 Euler steps, 2.6e-3; 32 takes half the evaluation's largest share)"""
    teacher_guidance: float = 2.0
    """CFG scale of the teacher when sampled (match stage1.guidance)"""
    batch_size: int = 64
    """generation batch"""
    video_prompts: int = 4
    """sample videos written per model (at 1, 4 and 32 steps)"""


@dataclass
class RayConfig:
    backend: str = "ray"
    """where the training stages run: "ray" (one learner group for every stage, a rollout fleet per
    on-policy stage) or "reference" (everything in this one process: the correctness oracle)"""
    address: str = ""
    """Ray cluster to join ("auto", "ray://host:10001", host:port); empty: start a local Ray in this process"""
    rollout_actors: int = 1
    """student rollout actors (backward simulation without gradient); steps go to them round-robin"""
    scorer_actors: int = 1
    """scorer actors (frozen teacher + critic snapshot: the DMD target); steps go to them round-robin"""
    colocate: bool = True
    """one actor per rollout slot holds both roles (student, teacher, critic) and makes a step's rollouts
    and DMD targets in one call: for small models, or few cores, where a second busy process per step
    only preempts the learners; the pool is then `rollout_actors` x (`rollout_cpus`, `rollout_gpus`)
    and the scorer_* keys are unused"""
    learners: int = 1
    """data-parallel Ray Train workers (DeepSpeed); the global batch is split evenly between them"""
    rollout_cpus: float = 1.0
    """CPUs reserved per rollout actor, or per rollout+scorer actor with `colocate` (fractional allowed)"""
    scorer_cpus: float = 0.5
    """CPUs reserved per scorer actor (fractional allowed)"""
    learner_cpus: float = 1.0
    """CPUs reserved per learner worker (fractional allowed)"""
    learner_threads: int = 2
    """torch threads per learner worker in stages 0 and 1, when no rollout actor runs (0: its reserved
    CPUs, rounded, at least 1); 2 lets the default 2-core run use both cores there (8.4 vs 6.2 steps/s)"""
    learner_onpolicy_threads: int = 0
    """torch threads per learner worker in the on-policy stages, which share the machine with the fleet
    (0: its reserved CPUs, rounded, at least 1); more threads than cores only preempt each other"""
    rollout_gpus: float = 0.0
    """GPUs per rollout actor (fractional allowed; > 0 runs the student on CUDA)"""
    scorer_gpus: float = 0.0
    """GPUs per scorer actor (fractional allowed; > 0 runs teacher and critic on CUDA)"""
    learner_gpus: float = 0.0
    """GPUs per learner worker (> 0: CUDA and NCCL; 0: CPU, gloo and DS_ACCELERATOR=cpu)"""
    max_policy_lag: int = 0
    """bound on (learner version - student version of a rollout): rollouts of step i may start once version
    i - L is out, overlapping rollout and learning; 0 (the default) reproduces the reference step for step.
    On the toy preset L = 1 makes stage 2 about 20 % faster on 2 cores but changes the student: better at
    every step count on both metrics, yet its ode_error rises 10.5 % from 4 to 32 steps (the bar allows 5 %;
    the same in 4 of 4 runs; met with `lag_target` recentred); L = 2 misses it in 1 of 3 runs
    (docs/policy-lag.md)"""
    lag_target: str = "stored"
    """what a learner regresses its rollout on when the buffered one came from an older student version
    (`pipeline.flowmap.losses.offpolicy_target`): "stored", the buffered target y = x_old - grad (ALGORITHM.md;
    its gradient also pulls toward x_old), or "recentred", the same DMD step from the learner's own sample.
    Identical at lag 0. Toy preset, lag 1: "stored" misses the ode_error bar (10.5 % rise from 4 to 32 steps),
    "recentred" meets it (1.6 %) (docs/policy-lag.md)"""
    buffer_capacity: int = 2
    """steps of rollouts the replay buffer may hold; rollouts wait (never dropped) when it is full"""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the learners: 2 (shard optimiser state and gradients) or 3 (also parameters)"""
    actor_restarts: int = 3
    """times Ray restarts a rollout or scorer actor that died (the call it ran is retried; -1: always)"""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """the run: name, outputs, seed, stages"""
    data: DataConfig = field(default_factory=DataConfig)
    """the dataset"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """networks and noise schedule"""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """stage 0: teacher flow matching"""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """stage 1: forward flow-map training"""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """stage 2: on-policy flow-map distillation"""
    consistency: Stage2Config = field(default_factory=lambda: Stage2Config(num_steps_choices=[1, 2, 4]))
    """the consistency baseline (endpoint-only student, consistency sampling); same fields as stage2"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation"""
    ray: RayConfig = field(default_factory=RayConfig)
    """the distributed on-policy stage: pools, their resources, policy lag, buffer, DeepSpeed"""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def validate(self) -> "Config":
        """Check values across fields; raise ConfigError naming the key and what to set."""
        _validate(self)
        return self


STAGES = ("teacher", "stage1", "stage2", "consistency", "eval", "export")
GRAD_CALLS = ("shortcut_in", "real_step", "shortcut_out")
DATA_CHECKS = ("full", "schema")


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _validate(cfg: Config) -> None:
    from pipeline.flowmap.models import SIZE_PRESETS
    from pipeline.flowmap.simulate import GradCalls

    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty name without '/'")
    for s in cfg.run.stages:
        _require(s in STAGES, "run.stages", f"unknown stage {s!r}; choose from {list(STAGES)}")
    _require(cfg.run.threads >= 0, "run.threads", "must be >= 0")
    _require(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0: only at each stage's end)")
    _require(cfg.run.checkpoints_kept >= 1, "run.checkpoints_kept", "must be >= 1")
    _require(cfg.run.learner_restarts >= 0, "run.learner_restarts", "must be >= 0")
    _require(cfg.run.max_bad_steps >= 1, "run.max_bad_steps", "must be >= 1")
    _require(0 <= cfg.data.cond_dropout < 1, "data.cond_dropout", "must be in [0, 1)")
    _require(cfg.data.stream_prefetch >= 1, "data.stream_prefetch", "must be >= 1")
    _require(cfg.data.stream_block_mb > 0, "data.stream_block_mb", "must be > 0")
    _require(cfg.data.validate in DATA_CHECKS, "data.validate", f"choose from {list(DATA_CHECKS)}")
    _require(cfg.model.size in SIZE_PRESETS, "model.size", f"unknown size; choose from {sorted(SIZE_PRESETS)}")
    _require(cfg.model.shift > 0, "model.shift", "must be > 0")
    _require(cfg.teacher.shift >= 0, "teacher.shift", "must be >= 0 (0: model.shift)")
    for name in ("teacher", "stage1", "stage2", "consistency"):
        sec = getattr(cfg, name)
        _require(sec.steps >= 0, f"{name}.steps", "must be >= 0")
        _require(sec.batch_size >= 1, f"{name}.batch_size", "must be >= 1")
        for oname in ("optim", "critic_optim"):
            if hasattr(sec, oname):
                _check_optim(getattr(sec, oname), f"{name}.{oname}")
    s1 = cfg.stage1
    _require(s1.guidance >= 1, "stage1.guidance", "must be >= 1 (1 disables guidance fusion)")
    _require(0 < s1.fd_step < 0.1, "stage1.fd_step", "must be in (0, 0.1)")
    _require(s1.diffusion_fraction >= 0 and s1.endpoint_fraction >= 0
             and s1.diffusion_fraction + s1.endpoint_fraction <= 1,
             "stage1.diffusion_fraction", "diffusion_fraction and endpoint_fraction must be >= 0 and sum to <= 1")
    for name in ("stage2", "consistency"):
        sec = getattr(cfg, name)
        _require(len(sec.num_steps_choices) > 0 and all(n >= 1 for n in sec.num_steps_choices),
                 f"{name}.num_steps_choices", "must be a non-empty list of step counts >= 1")
        _require(all(c in GRAD_CALLS for c in sec.grad_calls), f"{name}.grad_calls",
                 f"entries must be among {list(GRAD_CALLS)}")
        try:
            GradCalls(**{c: c in sec.grad_calls for c in GRAD_CALLS})
        except ValueError as exc:
            raise ConfigError(f"{name}.grad_calls: {exc}") from None
        _require(0 <= sec.dmd_min_s < sec.dmd_max_s <= 1, f"{name}.dmd_min_s", "need 0 <= dmd_min_s < dmd_max_s <= 1")
        _require(sec.real_guidance >= 0, f"{name}.real_guidance", "must be >= 0")
        _check_lora(cfg, name)
    _require(len(cfg.eval.steps) > 0 and all(n >= 1 for n in cfg.eval.steps), "eval.steps",
             "must be a non-empty list of step counts >= 1")
    _require(cfg.eval.num_samples >= 2, "eval.num_samples", "must be >= 2 (Frechet distance needs a covariance)")
    _require(cfg.eval.ode_ref_steps >= 1, "eval.ode_ref_steps", "must be >= 1")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check_ray(cfg)


def _check_ray(cfg: Config) -> None:
    from pipeline.flowmap.losses import LAG_TARGETS

    r = cfg.ray
    _require(r.backend in ("ray", "reference"), "ray.backend", 'choose "ray" or "reference"')
    for name in ("rollout_actors", "scorer_actors", "learners"):
        _require(getattr(r, name) >= 1, f"ray.{name}", "must be >= 1 (each pool needs at least one member)")
    for pool in ("rollout", "scorer", "learner"):
        cpus, gpus = getattr(r, f"{pool}_cpus"), getattr(r, f"{pool}_gpus")
        _require(cpus >= 0 and gpus >= 0, f"ray.{pool}_cpus", "CPUs and GPUs per member must be >= 0")
        _require(cpus > 0 or gpus > 0, f"ray.{pool}_cpus", f"set ray.{pool}_cpus or ray.{pool}_gpus above 0")
    _require(r.learner_gpus <= 1, "ray.learner_gpus", "a learner drives one device: at most 1 GPU (add learners instead)")
    _require(r.max_policy_lag >= 0, "ray.max_policy_lag", "must be >= 0 (0: strictly on-policy)")
    _require(r.buffer_capacity >= 1, "ray.buffer_capacity", "must be >= 1 step of rollouts")
    _require(r.zero_stage in (2, 3), "ray.zero_stage", "DeepSpeed ZeRO stage must be 2 or 3")
    _require(r.lag_target in LAG_TARGETS, "ray.lag_target", f"must be one of {', '.join(LAG_TARGETS)}")
    _require(r.learner_threads >= 0, "ray.learner_threads", "must be >= 0 (0: from ray.learner_cpus)")
    _require(r.learner_onpolicy_threads >= 0, "ray.learner_onpolicy_threads", "must be >= 0 (0: from ray.learner_cpus)")
    _require(r.actor_restarts >= -1, "ray.actor_restarts", "must be >= 0, or -1 for no limit")
    if r.backend == "ray":
        for name in ("teacher", "stage1", "stage2", "consistency"):
            b = getattr(cfg, name).batch_size
            _require(b % r.learners == 0, f"{name}.batch_size",
                     f"{b} rows do not split evenly over ray.learners={r.learners}; use a multiple of it")


def _check_lora(cfg: Config, name: str) -> None:
    """LoRA values, and that the targets name linear layers of the student and the critic (built on the
    meta device from model.size: no memory, no random draws)."""
    import torch

    from pipeline.flowmap import lora, models

    sec = getattr(cfg, name)
    _require(sec.lora_rank >= 0, f"{name}.lora_rank", "must be >= 0 (0: train every parameter)")
    _require(sec.lora_alpha >= 0, f"{name}.lora_alpha", "must be >= 0 (0: equal to lora_rank)")
    if sec.lora_rank == 0:
        return
    targets = sec.lora_targets
    _require(len(targets) > 0 and all(isinstance(t, str) and t.strip() == t and t for t in targets),
             f"{name}.lora_targets", "must be a non-empty list of module names, like to_q or ffn.net.2")
    with torch.device("meta"):
        critic = models.build_teacher(cfg.model.size)
        student = models.AnyFlowTransformer3DModel(**models.student_arch(critic.config))
    missing = lora.unmatched_targets(student, targets)
    _require(not missing, f"{name}.lora_targets", f"{missing} name no layer of the student (layer names look "
                                                    f"like blocks.0.attn1.to_q, blocks.0.ffn.net.0.proj)")
    for role, net in (("student", student), ("critic", critic)):
        try:
            lora.target_layers(net, targets)
        except ValueError as exc:
            raise ConfigError(f"{name}.lora_targets: {exc} (the {role})") from None


def _check_optim(o: OptimConfig, key: str) -> None:
    _require(o.lr > 0, f"{key}.lr", "must be > 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"{key}.beta1", "betas must be in [0, 1)")
    _require(o.warmup >= 0 and o.ema_start >= 0, f"{key}.warmup", "warmup and ema_start must be >= 0")
    _require(0 <= o.ema < 1, f"{key}.ema", "must be in [0, 1)")
    _require(o.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")


# ----------------------------------------------------------------------------- building from dicts


def _coerce(value, tp, key: str):
    """Check (and gently convert) a YAML value to a field type; ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return _coerce(value, tp, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _from_dict(cls, data: dict, prefix: str = "", base=None):
    """`cls` with the fields in `data` replaced (checked) and the rest taken from `base`."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {name: getattr(base, name) for name in names}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key; valid keys here: {sorted(names)}")
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of fields, got {v!r}")
            values[k] = _from_dict(hints[k], v, key, getattr(base, k))
        else:
            values[k] = _coerce(v, hints[k], key)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # a nested dataclass's own __post_init__ check
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[str, object]:
    """`a.b.c=value` with value parsed as YAML (numbers, lists, booleans; else a string)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{text}: overrides look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_tree(config_file: str | None, preset_dir: Path = PRESET_DIR) -> dict:
    """The mapping in a YAML file (or preset `preset_dir/NAME.yaml`); {} for None."""
    if not config_file:
        return {}
    path = Path(config_file)
    if not path.is_file() and (preset_dir / f"{config_file}.yaml").is_file():
        path = preset_dir / f"{config_file}.yaml"
    if not path.is_file():
        raise ConfigError(f"--config {config_file}: no such file (or preset in {preset_dir})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping")
    return tree


def build(cls, tree: dict, overrides: list[str] = ()):
    """A `cls` config tree: its defaults, then `tree` (from YAML), then dotted overrides; checked types."""
    over: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(over, key, value)
    return _from_dict(cls, _merge(tree, over))


def load_config(config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """The resolved config: defaults, then the YAML file (or preset name), then dotted overrides."""
    return build(Config, read_tree(config_file), overrides).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_help(cls=Config, prefix: str = "") -> list[tuple[str, str, object]]:
    """(dotted key, docstring, default) for every leaf field, read from the source docstrings."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs.setdefault(a.target.id, str(b.value.value))
    out = []
    base = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(field_help(hints[f.name], key + "."))
        else:
            out.append((key, docs.get(f.name, ""), getattr(base, f.name)))
    return out
