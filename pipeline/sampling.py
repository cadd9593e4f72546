"""Quality against sampling steps for the run's models, and the export of the student.

Turns trained networks into samplers (teacher: guided Euler; flow-map students: the any-step
sampler; consistency baseline: consistency sampling), generates from fixed noise and held-out
prompts, and scores with `pipeline.evaluate` (ode_error against the teacher's high-accuracy ODE
solution from the same noise, Frechet distance in the fixed feature space, motion_error against the
prompts), with the data row beside them (a second sample of the data, scored the same way).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, AutoencoderKLWan,
                       FlowMapEulerDiscreteScheduler)

from pipeline import evaluate, steps
from pipeline.config import Config
from pipeline.data import toy
from pipeline.data.schema import LatentDataset
from pipeline.flowmap import draws, far
from pipeline.flowmap.models import GuidedFn, StudentFn, VelocityFn
from pipeline.flowmap.simulate import anystep_sample, consistency_sample, euler_sample, heun_sample

VIDEO_STEPS = (1, 4, 32)


def _batched(fn, noise: torch.Tensor, cond: torch.Tensor, batch: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(noise), batch):
            outs.append(fn(noise[i:i + batch], cond[i:i + batch]))
    return torch.cat(outs)


def guided_teacher(cfg: Config, teacher: torch.nn.Module, null_embed: torch.Tensor) -> GuidedFn:
    """The teacher's velocity with classifier-free guidance at `eval.teacher_guidance`."""
    return GuidedFn(VelocityFn(teacher.eval()), null_embed, cfg.eval.teacher_guidance)


def samplers(cfg: Config, nets: dict[str, torch.nn.Module], null_embed: torch.Tensor) -> dict:
    """name -> sample(noise, cond, num_steps) for the networks present in `nets`."""
    k = cfg.model.shift
    out = {}
    if "teacher" in nets:
        guided = guided_teacher(cfg, nets["teacher"], null_embed)
        out["teacher"] = lambda z, c, n: euler_sample(guided, z, c, n, k)
    if cfg.model.causal:
        return {**out, **causal_samplers(cfg, nets)}
    for name in ("student_stage1", "student"):
        if name in nets:
            fn = StudentFn(nets[name].eval())
            out[name] = (lambda f: lambda z, c, n: anystep_sample(f, z, c, n, k))(fn)
    if "consistency" in nets:
        fn = StudentFn(nets["consistency"].eval())

        def sample_consistency(z, c, n, _fn=fn):
            gen = draws.generator(cfg.run.seed, "eval", n, stream=7)
            return consistency_sample(_fn, z, c, n, k, gen)
        out["consistency"] = sample_consistency
    return out


def causal_samplers(cfg: Config, nets: dict[str, torch.nn.Module]) -> dict:
    """name -> sample(noise, cond, num_steps) for the causal students in `nets`: chunk by chunk through the
    KV cache (AnyFlowFARPipeline at CFG 1), the consistency baseline re-noising within each chunk."""
    k, cp = cfg.model.shift, cfg.model.far.chunk_partition
    out = {}
    for name in ("student_stage1", "student"):
        if name in nets:
            model = steps.prepared(cfg, nets[name].eval())
            out[name] = (lambda m: lambda z, c, n: far.far_sample(m, z, c, n, k, cp))(model)
    if "consistency" in nets:
        model = steps.prepared(cfg, nets["consistency"].eval())

        def sample_consistency(z, c, n, _m=model):
            gen = draws.generator(cfg.run.seed, "eval", n, stream=7)
            return far.far_consistency_sample(_m, z, c, n, k, cp, gen)
        out["consistency"] = sample_consistency
    return out


def evaluate_run(cfg: Config, nets: dict[str, torch.nn.Module], heldout: LatentDataset,
                 null_embed: torch.Tensor, run_dir: Path, log=print) -> dict:
    """Every model at every step count: eval.json, eval.png and sample GIFs in `run_dir`."""
    e = cfg.eval
    n = min(e.num_samples, len(heldout))
    cond = heldout.prompt_embeds[:n]
    noise = torch.randn((n, *heldout.latents.shape[1:]), generator=draws.generator(cfg.run.seed, "eval", 0))
    null = null_embed[None] if null_embed.ndim == 2 else null_embed
    fns = samplers(cfg, nets, null)
    t0 = time.time()
    guided = guided_teacher(cfg, nets["teacher"], null)
    ref = _batched(lambda z, c: heun_sample(guided, z, c, e.ode_ref_steps, cfg.model.shift), noise, cond,
                   e.batch_size)
    log(f"[eval] teacher ODE reference ({e.ode_ref_steps} Heun steps) in {time.time() - t0:.0f}s")
    prompts = heldout.prompts[:n]
    data_feats = evaluate.video_features(heldout.latents[:n])
    metrics: dict[str, dict[str, list[float | None]]] = {}
    videos: dict[str, torch.Tensor] = {}
    bounds = far.chunk_bounds(cfg.model.far.chunk_partition) if cfg.model.causal else None
    chunk_feats = [evaluate.video_features(heldout.latents[:n, lo:hi]) for lo, hi in bounds] if bounds else None
    per_chunk: dict[str, list[list[float]]] = {}
    for name, fn in fns.items():
        t0 = time.time()
        m = metrics.setdefault(name, {metric: [] for metric in evaluate.METRICS})
        for num_steps in e.steps:
            x = _batched(lambda z, c: fn(z, c, num_steps), noise, cond, e.batch_size)
            feats = evaluate.video_features(x)
            m["ode_error"].append(evaluate.ode_error(x, ref))
            m["fd"].append(evaluate.frechet_distance(feats, data_feats))
            m["motion_error"].append(evaluate.motion_error(feats, prompts))
            if bounds:
                per_chunk.setdefault(name, []).append(
                    [evaluate.frechet_distance(evaluate.video_features(x[:, lo:hi]), cf)
                     for (lo, hi), cf in zip(bounds, chunk_feats)])
            if num_steps in VIDEO_STEPS and e.video_prompts > 0:
                videos[f"{name}_steps{num_steps}"] = x[:e.video_prompts]
        log(f"[eval] {name}: {sum(e.steps)} calls per sample in {time.time() - t0:.0f}s")
    metrics[evaluate.DATA] = evaluate.data_row(len(e.steps), *data_floor(cfg, data_feats, prompts))
    chunks = None
    if bounds:
        floor = data_floor_per_chunk(cfg, chunk_feats, bounds)
        if floor is not None:
            per_chunk[evaluate.DATA] = [floor] * len(e.steps)
        chunks = evaluate.fd_per_chunk(cfg.model.far.chunk_partition, per_chunk)
    result = evaluate.eval_json(list(e.steps), metrics, chunks)
    evaluate.write_eval(run_dir, result)
    if videos:
        videos["data"] = heldout.latents[:e.video_prompts]
        evaluate.write_videos(run_dir / "videos", videos, heldout.prompts[:e.video_prompts])
    return result


def data_floor(cfg: Config, heldout_feats: torch.Tensor, prompts: list[str]) -> tuple[float | None, float | None]:
    """(fd, motion_error) of the data row. The toy world (no `data.path`): a fresh sample of as many
    clips as the held-out features have rows, sample ids after the train and held-out ones (so
    disjoint from both), against those features. A dataset from `data.path` has no world to draw
    from: its held-out clips' even rows against their odd rows (`evaluate.halves_floor`)."""
    if cfg.data.path:
        return evaluate.halves_floor(heldout_feats, prompts)
    world = cfg.data.toy
    ids = world.num_train + world.num_heldout + np.arange(len(heldout_feats))
    x, floor_prompts = toy.render_videos(world, ids)
    feats = evaluate.video_features(x)
    return evaluate.frechet_distance(feats, heldout_feats), evaluate.motion_error(feats, floor_prompts)


def data_floor_per_chunk(cfg: Config, chunk_feats: list[torch.Tensor], bounds) -> list[float] | None:
    """fd per chunk of the data row: the toy world's fresh sample (as `data_floor`), chunk against chunk;
    None for a dataset from `data.path` (no world to draw from)."""
    if cfg.data.path:
        return None
    world = cfg.data.toy
    ids = world.num_train + world.num_heldout + np.arange(len(chunk_feats[0]))
    x, _ = toy.render_videos(world, ids)
    return [evaluate.frechet_distance(evaluate.video_features(x[:, lo:hi]), cf) for (lo, hi), cf in zip(bounds, chunk_feats)]


def toy_vae(latent_channels: int) -> AutoencoderKLWan:
    """A small, shape-compatible Wan VAE for toy latents (z_dim = latent channels, identity
    normalisation). The toy world's latents are its videos, so `output_type="latent"` is
    the meaningful output; this VAE exists so the standard pipeline folder loads and runs."""
    return AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels)


def export_student(cfg: Config, student: AnyFlowTransformer3DModel, folder: Path,
                   vae: AutoencoderKLWan | None = None) -> Path:
    """Write `folder` as a diffusers AnyFlowPipeline folder (transformer, scheduler, VAE, no
    text encoder); `AnyFlowPipeline.from_pretrained(folder, tokenizer=None, text_encoder=None)`
    loads it and `AnyFlowTransformer3DModel.from_pretrained(folder, subfolder="transformer")`
    loads the student alone."""
    return _export_pipeline(cfg, student, folder, vae, "AnyFlowPipeline")


def export_far_student(cfg: Config, student: AnyFlowFARTransformer3DModel, folder: Path,
                       vae: AutoencoderKLWan | None = None) -> Path:
    """Write `folder` as a diffusers AnyFlowFARPipeline folder (the causal student, the scheduler, a VAE,
    no text encoder): `AnyFlowFARPipeline.from_pretrained(folder, tokenizer=None, text_encoder=None)` loads
    it, `AnyFlowFARTransformer3DModel.from_pretrained(folder, subfolder="transformer")` the student alone.
    Its config carries the chunk partition and full-resolution limit it was trained with; it was trained in
    diffusers' padding form (model.far.pad, docs/far.md), so the pipeline samples it as trained."""
    return _export_pipeline(cfg, student, folder, vae, "AnyFlowFARPipeline")


def _export_pipeline(cfg: Config, student, folder: Path, vae: AutoencoderKLWan | None, pipeline_class: str) -> Path:
    """The folder of a diffusers `pipeline_class` around `student` (its class names the transformer): the
    student, a FlowMapEulerDiscreteScheduler at `model.shift`, a VAE (the toy one by default), no text encoder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(folder / "transformer", safe_serialization=True)
    FlowMapEulerDiscreteScheduler(shift=cfg.model.shift).save_pretrained(folder / "scheduler")
    (vae or toy_vae(student.config.in_channels)).save_pretrained(folder / "vae", safe_serialization=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", "FlowMapEulerDiscreteScheduler"],
             "text_encoder": [None, None], "tokenizer": [None, None],
             "transformer": ["diffusers", type(student).__name__],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
