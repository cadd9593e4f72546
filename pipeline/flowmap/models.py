"""Build, convert, save and load the student, teacher and critic.

The networks are diffusers' own classes, unchanged:

- teacher and critic: `WanTransformer3DModel` (a velocity model, layout (B, C, F, H, W)),
- student: `AnyFlowTransformer3DModel` (a flow-map model, layout (B, F, C, H, W), two timesteps).

Samplers and losses never call them directly; they call the model protocol
`u(z_t, t, r, cond) -> average velocity` (`FlowMapFn`) with `z_t` in (B, F, C, H, W),
`t` and `r` per-sample noise levels in [0, 1] and `cond` the prompt embeddings
(B, L, D). `StudentFn` and `VelocityFn` adapt the diffusers models to it; the
Gaussian-mixture oracle implements it exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel

from .schedule import TRAIN_UNITS

# Architecture presets. `tiny` is for unit tests, `toy` for the embedded default run;
# the Wan2.1 shapes are the published 1.3B and 14B T2V configurations.
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2,
                 text_dim=16, freq_dim=32, in_channels=4, out_channels=4, rope_max_seq_len=64),
    # 16x16 toy frames in 4x4 patches: 128 tokens for 8 frames, ~0.1 s per training step on 2 cores
    "toy": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=3, patch_size=(1, 4, 4),
                text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    # screening candidates for issue 12 (docs/toy-world.md, "Second round"): not defaults, kept so the
    # screens can be repeated. A temporal patch (p_t > 1) is not offered: AnyFlowTransformer3DModel unpacks
    # its output with the spatial patch only and takes one timestep per latent frame, so its student breaks.
    "toy_h8": dict(num_attention_heads=8, attention_head_dim=8, ffn_dim=128, num_layers=3, patch_size=(1, 4, 4),
                   text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    "toy_h24": dict(num_attention_heads=4, attention_head_dim=24, ffn_dim=192, num_layers=3, patch_size=(1, 4, 4),
                    text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    "toy_wide": dict(num_attention_heads=8, attention_head_dim=16, ffn_dim=256, num_layers=4, patch_size=(1, 4, 4),
                     text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    "toy8": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=3, patch_size=(1, 2, 2),
                 text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    # 2 heads x 32 at toy8's width (inner dim 64: the same parameters and FLOPs): 3D RoPE then has 5
    # frequencies per spatial axis and 6 in time (toy8: 2 and 4), for offsets that depend on the prompt
    "toy8_h2": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=3, patch_size=(1, 2, 2),
                    text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    # toy8 with a fourth block: a Wan block's self-attention comes before its cross-attention, so the first
    # block's self-attention never sees the prompt; with 4 blocks three of them can move tokens by it
    "toy8_l4": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=4, patch_size=(1, 2, 2),
                    text_dim=32, freq_dim=64, in_channels=4, out_channels=4, rope_max_seq_len=64),
    "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                        text_dim=4096, freq_dim=256, in_channels=16, out_channels=16),
    "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                       text_dim=4096, freq_dim=256, in_channels=16, out_channels=16),
}
COMMON_ARCH = dict(patch_size=(1, 2, 2), cross_attn_norm=True, eps=1e-6)
GATE_VALUE = 0.25
"""The fixed, non-learned gate between the t and r embeddings (ALGORITHM.md, the model)."""


class FlowMapFn(Protocol):
    """`u(z_t, t, r, cond)`: the average velocity over [r, t]; with r = t, the velocity."""

    def __call__(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                 cond: torch.Tensor | None) -> torch.Tensor: ...


def _check_inputs(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
    if z.ndim != 5:
        raise ValueError(f"latents must be (B, F, C, H, W), got shape {tuple(z.shape)}")
    if t.shape != (z.shape[0],):
        raise ValueError(f"noise levels must have shape ({z.shape[0]},) to match the latent batch, "
                         f"got {tuple(t.shape)}")
    if cond is None:
        raise ValueError("this model needs prompt embeddings (cond), got None")
    if cond.ndim != 3 or cond.shape[0] != z.shape[0]:
        raise ValueError(f"prompt embeddings must be (B, L, D) with B = {z.shape[0]} like the latents, "
                         f"got shape {tuple(cond.shape)}")


def _train_units(s: torch.Tensor) -> torch.Tensor:
    # float64 first, like diffusers' scheduler, so timesteps agree with AnyFlowPipeline bit for bit
    return (s.double() * TRAIN_UNITS).float()


class StudentFn:
    """`AnyFlowTransformer3DModel` as a `FlowMapFn` (same layout, timesteps per frame)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def __call__(self, z, t, r, cond):
        _check_inputs(z, t, cond)
        b, f = z.shape[:2]
        dtype = next(self.transformer.parameters()).dtype
        tt = _train_units(t).to(z.device)[:, None].expand(b, f)
        rr = _train_units(r).to(z.device)[:, None].expand(b, f)
        out = self.transformer(hidden_states=z.to(dtype), timestep=tt, r_timestep=rr,
                               encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.to(z.dtype)


class VelocityFn:
    """`WanTransformer3DModel` (a velocity model) as a `FlowMapFn`: r is ignored, u = v(z_t, t)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def __call__(self, z, t, r, cond):
        _check_inputs(z, t, cond)
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(hidden_states=z.permute(0, 2, 1, 3, 4).to(dtype), timestep=_train_units(t).to(z.device),
                               encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4).to(z.dtype)


class GuidedFn:
    """Classifier-free guidance around any `FlowMapFn`: `u_null + scale (u_cond - u_null)`."""

    def __init__(self, fn: FlowMapFn, null_cond: torch.Tensor, scale: float):
        self.fn, self.null_cond, self.scale = fn, null_cond, scale

    def __call__(self, z, t, r, cond):
        if self.scale == 1.0:
            return self.fn(z, t, r, cond)
        null = self.null_cond.expand(z.shape[0], *self.null_cond.shape[-2:])
        both = self.fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([r, r]), torch.cat([null, cond]))
        u_null, u_cond = both.chunk(2)
        return u_null + self.scale * (u_cond - u_null)


def arch_config(size: str | dict) -> dict:
    """The diffusers constructor arguments for a named size preset (or a dict of overrides on `tiny`)."""
    if isinstance(size, dict):
        return {**COMMON_ARCH, **SIZE_PRESETS["tiny"], **size}
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    return {**COMMON_ARCH, **SIZE_PRESETS[size]}


def build_teacher(size: str | dict, seed: int | None = None) -> WanTransformer3DModel:
    """A freshly initialised Wan velocity model (the toy world trains it from scratch)."""
    if seed is not None:
        torch.manual_seed(seed)
    return WanTransformer3DModel(**arch_config(size))


WAN_QK_NORM = "rms_norm_across_heads"
"""Wan2.1's query/key normalisation (WanTransformer3DModel's default), the one AnyFlow supports"""


def student_arch(teacher_config: dict) -> dict:
    """The AnyFlow constructor arguments of the student converted from a Wan teacher of this config."""
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    unsupported = {k: cfg[k] for k in ("added_kv_proj_dim", "pos_embed_seq_len") if cfg.get(k) is not None}
    if unsupported or cfg.get("qk_norm", WAN_QK_NORM) != WAN_QK_NORM:
        raise ValueError(f"only Wan2.1 T2V/I2V transformers convert to AnyFlow; this one has {unsupported or cfg}")
    keep = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
            "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
            "rope_max_seq_len")
    return {**{k: cfg[k] for k in keep if k in cfg}, "gate_value": GATE_VALUE, "deltatime_type": "r"}


def student_from_teacher(teacher: WanTransformer3DModel) -> AnyFlowTransformer3DModel:
    """Convert a Wan teacher into an AnyFlow student.

    Every key maps one to one; the extra `delta_embedder` is a copy of `time_embedder`, so
    at r = t the student computes exactly the teacher's velocity.
    """
    if not isinstance(teacher, WanTransformer3DModel):
        raise TypeError(f"expected a WanTransformer3DModel, got {type(teacher).__name__}")
    student = AnyFlowTransformer3DModel(**student_arch(teacher.config))
    state = dict(teacher.state_dict())
    for key in list(state):
        if ".time_embedder." in key:
            state[key.replace(".time_embedder.", ".delta_embedder.")] = state[key].clone()
    student.load_state_dict(state, strict=True)
    return student if teacher.dtype == torch.float32 else student.to(teacher.dtype)


_CLASSES = {"WanTransformer3DModel": WanTransformer3DModel, "AnyFlowTransformer3DModel": AnyFlowTransformer3DModel,
            "AnyFlowFARTransformer3DModel": AnyFlowFARTransformer3DModel}


def model_class_of(path: str | os.PathLike) -> str:
    """The diffusers class name stored in a model folder, with clear errors for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file() and (path / "transformer" / "config.json").is_file():
        cfg_file = path / "transformer" / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a diffusers model folder: no config.json")
    try:
        name = json.loads(cfg_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
    if name not in _CLASSES:
        raise ValueError(f"{path} holds a {name!r}, not a Wan, AnyFlow or AnyFlow-FAR transformer "
                         f"(expected one of {sorted(_CLASSES)})")
    return name


def load_transformer(path: str | os.PathLike, expect: str | None = None, dtype=torch.float32):
    """Load a Wan or AnyFlow transformer from a diffusers folder (or a pipeline's `transformer/`)."""
    name = model_class_of(path)
    if expect is not None and name != expect:
        raise ValueError(f"{path} holds a {name}, expected a {expect}")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        folder = folder / "transformer"
    try:
        return _CLASSES[name].from_pretrained(folder, torch_dtype=dtype)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"could not load {name} from {folder}: {exc}") from None


def load_student(path: str | os.PathLike, dtype=torch.float32) -> AnyFlowTransformer3DModel:
    """An AnyFlow student from its folder, or converted on the fly from a Wan folder."""
    model = load_transformer(path, dtype=dtype)
    return model if isinstance(model, AnyFlowTransformer3DModel) else student_from_teacher(model)


def convert_wan_folder(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a `WanTransformer3DModel` folder into an `AnyFlowTransformer3DModel` folder."""
    teacher = load_transformer(src, expect="WanTransformer3DModel")
    student_from_teacher(teacher).save_pretrained(dst, safe_serialization=True)
    return Path(dst)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
