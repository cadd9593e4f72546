"""Learner checkpoints: safetensors and JSON only, independent of the number of learners.

A checkpoint folder holds, for every trainable network NAME of the stage (the student and,
in on-policy stages, the critic):

    NAME.safetensors         full fp32 weights of the trained parameters, and the buffers
                             (gathered under ZeRO-3)
    NAME.optim.safetensors   full AdamW moments, `<param>::exp_avg` and `<param>::exp_avg_sq`
                             (deepspeed.utils.safe_get_full_optimizer_state: ZeRO-2 and 3)
    NAME.ema.safetensors     the EMA weights of the same tensors (when the network keeps one)
    rng.safetensors          the learner's torch CPU RNG state
    meta.json                format, stage, step, weight version, optimiser step counts,
                             warm-up schedule states, the networks' configs and LoRA
                             adapters (rank, alpha, layers, or null), world size

Without LoRA every parameter is trained, so the files hold the whole network. With LoRA
they hold the adapters only: the frozen base weights are the stage's input network, which a
resumed stage starts from again (the stage-1 student, the teacher), so they are not copied.

Every random draw of a step is a function of (seed, stage, step) (pipeline/flowmap/draws.py),
so the step is also the data position: a resumed stage draws exactly the batches it would
have drawn. Nothing here is unpickled: weights and moments are read with safetensors, the
rest is JSON, so a checkpoint from elsewhere cannot run code. Full (not sharded) tensors make
a checkpoint loadable with any number of learners and any ZeRO stage.

Loading into DeepSpeed engines: AdamW creates its state lazily at the first step, so
`load` first takes one step with a zero loss through the engine (every moment stays 0 and,
with the weights overwritten next, nothing else changes), then sets weights, moments, the
step counts and the schedule. The resumed engine then steps exactly like the one saved
(tests/learners/test_checkpoint.py).

`save` and `load` are collectives under data parallelism: every rank calls them; rank 0
writes and reads the files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from learners import deepspeed_setup as ds
from pipeline.flowmap import lora
from pipeline.flowmap.optim import EMA

FORMAT = 1
META = "meta.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt or made for another run); names it."""


@dataclass
class Trainable:
    """A network being trained: its DeepSpeed engine, its EMA (rank 0, or None) and a closure
    returning a differentiable output through the engine (for the zero-loss priming step)."""

    engine: object
    ema: EMA | None
    prime: Callable[[], torch.Tensor]


def _jsonable(sched_state: dict) -> dict:
    return {k: v for k, v in sched_state.items() if k != "lr_lambdas"}


def save(folder: str | Path, trainables: dict[str, Trainable], meta: dict, zero_stage: int, rank: int) -> Path | None:
    """Write the checkpoint (rank 0) into `folder`; returns it on rank 0, None elsewhere."""
    from deepspeed.utils import safe_get_full_optimizer_state

    folder = Path(folder)
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    info = {}
    for name, t in trainables.items():
        e = t.engine
        with ds.full_params(e, zero_stage):
            weights = ds.trained_state_of(e) if rank == 0 else None
        moments = {}
        for pname, p in _trained(e).items():
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(p, key)  # a collective: every rank
                if rank == 0:
                    moments[f"{pname}::{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        if rank == 0:
            save_file(weights, folder / f"{name}.safetensors")
            save_file(moments, folder / f"{name}.optim.safetensors")
            if t.ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in t.ema.state_dict().items() if k in weights},
                          folder / f"{name}.ema.safetensors")
            info[name] = {"optimizer_steps": _optimizer_steps(e), "schedule": _jsonable(e.lr_scheduler.state_dict()),
                          "config": _arch(e), "ema": t.ema is not None, "lora": lora.describe(e.module)}
    if rank != 0:
        return None
    save_file({"cpu": torch.get_rng_state()}, folder / "rng.safetensors")
    (folder / META).write_text(json.dumps({"format": FORMAT, **meta, "networks": info}, indent=1, default=str))
    return folder


def _trained(engine) -> dict:
    """The engine's trained parameters by name (all of them without LoRA, the adapters with it)."""
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def _arch(engine) -> dict:
    """The network's diffusers config without its bookkeeping keys (`_class_name`, ...)."""
    return {k: v for k, v in dict(engine.module.config).items() if not k.startswith("_")}


def _optimizer_steps(engine) -> int:
    states = [s for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def read_meta(folder: str | Path) -> dict:
    """The checkpoint's meta.json, checked: format and every file it needs present."""
    folder = Path(folder)
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder}: no {META} (not a checkpoint of this pipeline, or cut short)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"this code reads format {FORMAT}")
    for key in ("stage", "step", "networks"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path}: no {key!r} entry")
    for name, info in meta["networks"].items():
        files = [f"{name}.safetensors", f"{name}.optim.safetensors"] + ([f"{name}.ema.safetensors"] if info.get("ema") else [])
        for f in files:
            if not (folder / f).is_file():
                raise CheckpointError(f"checkpoint {folder}: {f} is missing")
    return meta


def _check_file(path: Path) -> None:
    """A safetensors file's header parses and the file is as long as the header says (cheap: no
    tensor is read), so a truncated or overwritten file is caught before any work starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            size = int.from_bytes(head, "little")
            if size > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(size))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != 8 + size + end:
            raise ValueError(f"{path.stat().st_size} bytes, the header describes {8 + size + end}")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {exc}") from None


def verify(folder: str | Path) -> dict:
    """`read_meta` plus a header and length check of every tensor file; returns the meta."""
    folder = Path(folder)
    meta = read_meta(folder)
    for f in sorted(folder.glob("*.safetensors")):
        _check_file(f)
    return meta


def newest(storage: str | Path) -> Path | None:
    """The newest checkpoint folder Ray Train kept under `storage` (`checkpoint_<timestamp>`), or None."""
    found = sorted(p for p in Path(storage).glob("checkpoint_*") if p.is_dir())  # not ..._snapshot.json
    return found[-1] if found else None


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {exc}") from None


def _lora_text(described: dict | None) -> str:
    if described is None:
        return "none (every parameter trained)"
    return f"rank {described['rank']}, alpha {described['alpha']:g} on {len(described['layers'])} layers"


def _load_ema(ema: EMA, state: dict[str, torch.Tensor], trained: set[str], path: Path) -> None:
    """The EMA's trained tensors (and buffers) from `state`; its frozen ones stay the base weights."""
    missing, unexpected = ema.model.load_state_dict(state, strict=False)
    lacking = [k for k in missing if k in trained]
    if unexpected or lacking:
        raise CheckpointError(f"checkpoint file {path} does not fit the network: unexpected {unexpected[:3]}, "
                              f"missing {lacking[:3]}")


def load(folder: str | Path, trainables: dict[str, Trainable], zero_stage: int, rank: int) -> dict:
    """Restore every trainable from `folder` (a collective); returns the meta."""
    from deepspeed.utils import safe_set_full_optimizer_state

    folder = Path(folder)
    meta = read_meta(folder)
    if set(meta["networks"]) != set(trainables):
        raise CheckpointError(f"checkpoint {folder} holds networks {sorted(meta['networks'])}, "
                              f"the stage trains {sorted(trainables)}")
    for name, t in trainables.items():
        info, e = meta["networks"][name], t.engine
        if info["config"] != json.loads(json.dumps(_arch(e), default=str)):
            raise CheckpointError(f"checkpoint {folder}: network {name} has another architecture than the one "
                                  f"configured (config differs)")
        if info.get("lora") != lora.describe(e.module):
            raise CheckpointError(f"checkpoint {folder}: network {name} was trained with LoRA adapters "
                                  f"{_lora_text(info.get('lora'))}, the stage is configured with "
                                  f"{_lora_text(lora.describe(e.module))} (set lora_rank, lora_alpha and "
                                  f"lora_targets as they were)")
        weights = _read(folder / f"{name}.safetensors")
        moments = _read(folder / f"{name}.optim.safetensors")
        params = _trained(e)
        missing = [p for p in params if p not in weights or f"{p}::exp_avg" not in moments]
        if missing:
            raise CheckpointError(f"checkpoint {folder}: {name} lacks {missing[:3]}")
        # 1. priming: one zero-loss step creates AdamW's lazy state (moments stay 0)
        e.backward(0.0 * t.prime().sum())
        e.step()
        # 2. the weights: the fp32 master copy and the module's own parameters
        from deepspeed.utils import safe_set_full_fp32_param

        for pname, p in params.items():
            safe_set_full_fp32_param(p, weights[pname])
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, moments[f"{pname}::{key}"], key)
        with torch.no_grad(), ds.full_params(e, zero_stage, modifier_rank=0):
            if zero_stage < 3 or rank == 0:
                for pname, p in params.items():
                    p.copy_(weights[pname].to(p.device, p.dtype))
            for bname, b in e.module.named_buffers():
                if bname in weights:
                    b.copy_(weights[bname].to(b.device, b.dtype))
        # 3. step counts and the warm-up schedule
        for s in e.optimizer.optimizer.state.values():
            if "step" in s:
                s["step"].fill_(float(info["optimizer_steps"]))
        sched = e.lr_scheduler
        sched.load_state_dict({**sched.state_dict(), **info["schedule"]})
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
        if t.ema is not None:
            if not info.get("ema"):
                raise CheckpointError(f"checkpoint {folder}: {name} was saved without its EMA")
            path = folder / f"{name}.ema.safetensors"
            _load_ema(t.ema, _read(path), set(params), path)
    if rank == 0:
        torch.set_rng_state(_read(folder / "rng.safetensors")["cpu"])
    return meta
