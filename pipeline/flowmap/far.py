"""Causal AnyFlow-FAR: conversion, attention, chunk-wise sampler, backward simulation, teacher forcing.

The network is diffusers' `AnyFlowFARTransformer3DModel`, unchanged; only its self-attention
processor is chosen here (`set_far_attention`):

- `dense` (this module's `DenseFarAttnProcessor`): PyTorch SDPA with a dense boolean mask. It has
  a CPU backward (flex attention has none in torch 2.13) and never writes a cache in place.
- `flex`: diffusers' own `AnyFlowCausalAttnProcessor` (flex attention, the fast kernel on GPU).

Padding form (docs/far.md): diffusers' processor pads an inference call's tokens to a multiple
of 128 with zero keys that the queries may attend to. `pad="diffusers"` reproduces that (so a
student trained here samples the same in `AnyFlowFARPipeline`); `pad="none"` is the unpadded
computation. Queries of a chunk being denoised see `ceil(n/128)*128 - n` zero keys (n: the
chunk's tokens) in every path that stands for an inference call, including teacher forcing.

Calls follow the pipeline: per chunk, the N-step flow-map sampler on the shifted grid with the
earlier chunks in the KV cache, then (except after the last chunk) one call at t = r = 0 that
re-encodes the finished prefix into a *fresh* cache. A fresh cache per chunk keeps the
gradients exact under gradient checkpointing (an in-place cache is overwritten before the
checkpointed calls are recomputed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor, apply_rotary_emb
from torch.nn.attention.flex_attention import BlockMask

from . import losses
from .models import _check_inputs, _train_units, student_arch, student_from_teacher
from .simulate import (GradCalls, anystep_sample, backward_simulate, consistency_backward_simulate,
                       consistency_sample)

PAD_FORMS = ("diffusers", "none")
FAR_NEW_KEYS = frozenset({"far_patch_embedding.weight", "far_patch_embedding.bias"})
BLOCK = 128
"""diffusers' flex BlockMask block size: inference calls are padded to a multiple of it"""


# --- conversion -----------------------------------------------------------------------------

def coarse_patch_weight(weight: torch.Tensor, compressed_patch_size) -> torch.Tensor:
    """Resample a Conv3d patch kernel (O, I, pt, ph, pw) to a coarser patch that is an integer
    multiple of it: stretch each tap over the block it covers (nearest) and divide by the block
    size. A coarse token is then exactly the fine token of the latent average-pooled by that
    ratio (a lower-resolution view of the same content, at the scale of a fine token).
    diffusers' own init stretches trilinearly without dividing, which makes a coarse token of
    smooth content about prod(ratio) times a fine one (docs/far.md has the measurement)."""
    fine = weight.shape[2:]
    ratio = [c // f for c, f in zip(compressed_patch_size, fine)]
    if any(c % f for c, f in zip(compressed_patch_size, fine)) or min(ratio) < 1:
        raise ValueError(f"compressed patch {tuple(compressed_patch_size)} must be a multiple of the patch "
                         f"{tuple(fine)}")
    out = weight
    for axis, k in zip((2, 3, 4), ratio):
        out = out.repeat_interleave(k, dim=axis)
    return out / math.prod(ratio)


def far_from_bidirectional(model: torch.nn.Module, chunk_partition, full_chunk_limit: int = 3,
                           compressed_patch_size=(1, 4, 4)) -> AnyFlowFARTransformer3DModel:
    """An `AnyFlowFARTransformer3DModel` from a bidirectional AnyFlow student (or a Wan teacher,
    converted first). Every bidirectional weight is kept exactly; only `far_patch_embedding.*`
    is new, initialised by `coarse_patch_weight` from `patch_embedding`."""
    if isinstance(model, WanTransformer3DModel):
        model = student_from_teacher(model)
    if not isinstance(model, AnyFlowTransformer3DModel):
        raise TypeError(f"expected an AnyFlowTransformer3DModel or WanTransformer3DModel, got {type(model).__name__}")
    if sum(chunk_partition) < 1 or min(chunk_partition) < 1 or full_chunk_limit < 2:
        raise ValueError(f"need chunk sizes >= 1 and full_chunk_limit >= 2, got {list(chunk_partition)}, "
                         f"{full_chunk_limit}")
    cfg = {**student_arch(model.config), "gate_value": model.config.gate_value,
           "deltatime_type": model.config.deltatime_type}
    far = AnyFlowFARTransformer3DModel(**cfg, compressed_patch_size=tuple(compressed_patch_size),
                                       full_chunk_limit=full_chunk_limit, chunk_partition=tuple(chunk_partition))
    state = model.state_dict()
    missing, unexpected = far.load_state_dict(state, strict=False)
    if set(missing) != FAR_NEW_KEYS or unexpected:
        raise ValueError(f"bidirectional weights do not map onto the FAR model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    with torch.no_grad():
        far.far_patch_embedding.weight.copy_(coarse_patch_weight(state["patch_embedding.weight"],
                                                                 compressed_patch_size))
        far.far_patch_embedding.bias.copy_(state["patch_embedding.bias"])
    return far if model.dtype == torch.float32 else far.to(model.dtype)


def net(model) -> AnyFlowFARTransformer3DModel:
    """The diffusers model behind `model`: itself, or the module a wrapper holds (a DeepSpeed engine's
    `.module`, whose own `.config` is DeepSpeed's). Every function here reads the architecture from
    `net(model)` and calls `model` itself, so a learner can pass its engine."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


# --- attention ------------------------------------------------------------------------------

def pad_keys(num_queries: int) -> int:
    """How many zero keys diffusers' processor adds to an inference call of `num_queries` tokens."""
    return math.ceil(num_queries / BLOCK) * BLOCK - num_queries


class DenseFarAttnProcessor:
    """Causal FAR self-attention with SDPA and a dense boolean mask (same call signature as
    diffusers' `AnyFlowCausalAttnProcessor`).

    Cache step: stores the keys/values as new tensors in the layer's dict (never in place).
    A flex `BlockMask` (what diffusers' own callers pass) is turned into its dense form.
    Read step: prepends the cached keys/values; with `pad="diffusers"`, appends the zero keys
    diffusers' processor would. A mask wider than the keys means: append that many zero keys
    (the teacher-forcing path uses it for the chunks that stand for inference calls).
    """

    def __init__(self, pad: str = "diffusers"):
        if pad not in PAD_FORMS:
            raise ValueError(f"unknown padding form {pad!r}; choose one of {PAD_FORMS}")
        self.pad = pad

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 kv_cache=None, kv_cache_flag=None):
        dtype = hidden_states.dtype
        q = attn.norm_q(attn.to_q(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if kv_cache is not None and kv_cache_flag["is_cache_step"]:
            n = kv_cache_flag["num_compressed_tokens"]
            kv_cache["compressed_cache"] = torch.stack([k[:, :, :n], v[:, :, :n]])
            kv_cache["full_cache"] = torch.stack([k[:, :, n:], v[:, :, n:]])
        elif kv_cache is not None:
            nc, nf = kv_cache_flag["num_cached_compressed_tokens"], kv_cache_flag["num_cached_full_tokens"]
            comp, full = kv_cache["compressed_cache"], kv_cache["full_cache"]
            k = torch.cat([comp[0, :, :, :nc], full[0, :, :, :nf], k], dim=2)
            v = torch.cat([comp[1, :, :, :nc], full[1, :, :, :nf], v], dim=2)
        if rotary_emb is not None:
            q, k = apply_rotary_emb(q, rotary_emb["query"]), apply_rotary_emb(k, rotary_emb["key"])
        if isinstance(attention_mask, BlockMask):  # diffusers' own callers (AnyFlowFARPipeline's cache write)
            attention_mask = block_mask_to_dense(attention_mask, q.shape[2], k.shape[2])
        if attention_mask is None:
            extra = pad_keys(q.shape[2]) if self.pad == "diffusers" and kv_cache is not None else 0
        else:
            extra = attention_mask.shape[-1] - k.shape[2]
        if extra > 0:
            zeros = k.new_zeros(*k.shape[:2], extra, k.shape[3])
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def block_mask_to_dense(mask: BlockMask, num_queries: int, num_keys: int) -> torch.Tensor:
    """The (num_queries, num_keys) boolean mask a flex `BlockMask` stands for (its padding cut)."""
    q = torch.arange(num_queries, device=mask.kv_num_blocks.device)[:, None]
    kv = torch.arange(num_keys, device=mask.kv_num_blocks.device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    return mask.mask_mod(zero, zero, q, kv).expand(num_queries, num_keys)


def set_far_attention(model: AnyFlowFARTransformer3DModel, backend: str = "dense", pad: str = "diffusers") -> None:
    """Install the self-attention processor: `dense` (CPU-trainable) or `flex` (diffusers' own,
    which always uses the diffusers padding form)."""
    if backend == "flex":
        if pad != "diffusers":
            raise ValueError("diffusers' flex processor only computes the 'diffusers' padding form")
        make = AnyFlowCausalAttnProcessor
    elif backend == "dense":
        def make():
            return DenseFarAttnProcessor(pad)
    else:
        raise ValueError(f"unknown FAR attention backend {backend!r}; choose 'dense' or 'flex'")
    for block in net(model).blocks:
        block.attn1.set_processor(make())


def _processor(model):
    return net(model).blocks[0].attn1.processor


def pad_form(model) -> str:
    proc = _processor(model)
    return proc.pad if isinstance(proc, DenseFarAttnProcessor) else "diffusers"


def uses_flex(model) -> bool:
    return isinstance(_processor(model), AnyFlowCausalAttnProcessor)


# --- layout and masks -----------------------------------------------------------------------

@dataclass(frozen=True)
class FarLayout:
    """Which chunks of a forward call are compressed and how many tokens each frame makes."""

    chunk_partition: tuple
    """frames per chunk of the call"""
    num_compressed_chunks: int
    """the oldest chunks, seen through `far_patch_embedding`"""
    full_tokens_per_frame: int
    compressed_tokens_per_frame: int

    @classmethod
    def of(cls, model, chunk_partition, height: int, width: int, mode: str) -> "FarLayout":
        """`mode`: 'train' (the newest `full_chunk_limit` chunks at full resolution) or 'cache'
        (the newest `full_chunk_limit - 1`, since the next chunk will join them)."""
        cfg = net(model).config
        threshold = cfg.full_chunk_limit - (1 if mode == "cache" else 0)
        n = len(chunk_partition)
        full = (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
        comp = (height // cfg.compressed_patch_size[1]) * (width // cfg.compressed_patch_size[2])
        return cls(tuple(chunk_partition), max(n - threshold, 0), full, comp)

    def chunk_tokens(self) -> list[tuple[int, int]]:
        """(chunk index, tokens) for each chunk in sequence order."""
        return [(i, f * (self.compressed_tokens_per_frame if i < self.num_compressed_chunks
                         else self.full_tokens_per_frame)) for i, f in enumerate(self.chunk_partition)]


def far_dense_mask(layout: FarLayout, has_clean: bool, pad: str, device=None) -> torch.Tensor:
    """The dense boolean mask of diffusers' train/cache BlockMask for this layout, without its
    padding, plus (pad='diffusers') zero-key columns for the chunks that stand for inference
    calls: with a clean copy, every noisy chunk; without, the newest chunk.

    Sequence: [compressed context, full chunks (noisy), clean copy of the full chunks].
    Context and clean tokens attend chunk-causally to context and clean tokens; a noisy chunk
    attends to the context, the clean copy of earlier chunks and itself.
    """
    ids, kind = [], []  # kind: 0 context, 1 noisy/full, 2 clean
    for i, n in layout.chunk_tokens():
        ids.append(torch.full((n,), i))
        kind.append(torch.full((n,), 0 if i < layout.num_compressed_chunks else 1))
    if has_clean:
        for i, n in layout.chunk_tokens()[layout.num_compressed_chunks:]:
            ids.append(torch.full((n,), i))
            kind.append(torch.full((n,), 2))
    ids, kind = torch.cat(ids), torch.cat(kind)
    qi, ki, qk, kk = ids[:, None], ids[None, :], kind[:, None], kind[None, :]
    if has_clean:
        to_context_or_clean = (kk != 1) & (qi >= ki) & ((qk != 1) | (qi > ki) | (kk == 0))
        noisy_to_itself = (qk == 1) & (kk == 1) & (qi == ki)
        mask = to_context_or_clean | noisy_to_itself
    else:
        mask = qi >= ki
    if pad == "diffusers":
        mask = _with_zero_keys(mask, ids, kind, layout, has_clean)
    return mask.to(device)


def _with_zero_keys(mask, ids, kind, layout: FarLayout, has_clean: bool) -> torch.Tensor:
    newest = len(layout.chunk_partition) - 1
    stands_for_inference = (kind == 1) if has_clean else (ids == newest)
    pads = torch.tensor([pad_keys(n) for _, n in layout.chunk_tokens()])
    per_row = torch.where(stands_for_inference, pads[ids], 0)
    extra = int(per_row.max())
    cols = torch.arange(extra)[None, :] < per_row[:, None]
    return torch.cat([mask, cols], dim=1)


# --- KV cache and per-chunk calls -----------------------------------------------------------

@dataclass
class FarCache:
    """The KV cache of the clean prefix: one dict per block, made fresh by each cache write."""

    layers: list
    num_chunks: int


def empty_cache(model, like: torch.Tensor) -> FarCache:
    """The cache before the first chunk: no tokens (batch and device of `like`, the model's dtype)."""
    shape = (2, like.shape[0], net(model).config.num_attention_heads, 0, net(model).config.attention_head_dim)
    dtype = next(model.parameters()).dtype
    return FarCache([{name: like.new_zeros(shape, dtype=dtype) for name in ("compressed_cache", "full_cache")}
                     for _ in net(model).blocks], 0)


def write_cache(model, prefix: torch.Tensor, chunk_partition, cond: torch.Tensor) -> FarCache:
    """The cache-write call: the finished prefix (B, F, C, H, W) at t = r = 0 into a new cache."""
    b, f, _, h, w = prefix.shape
    prefix, cond = prefix.to(next(model.parameters()).dtype), cond.to(next(model.parameters()).dtype)
    layout = FarLayout.of(model, chunk_partition, h, w, mode="cache")
    n_comp = sum(chunk_partition[:layout.num_compressed_chunks]) * layout.compressed_tokens_per_frame
    n_full = sum(chunk_partition[layout.num_compressed_chunks:]) * layout.full_tokens_per_frame
    if uses_flex(model):  # diffusers' processor writes into preallocated buffers, so allocate new ones
        heads, dim = net(model).config.num_attention_heads, net(model).config.attention_head_dim
        layers = [{"compressed_cache": prefix.new_zeros(2, b, heads, n_comp, dim),
                   "full_cache": prefix.new_zeros(2, b, heads, n_full, dim)} for _ in net(model).blocks]
        mask = net(model).build_attention_mask(chunk_partition=list(chunk_partition), height=h, width=w,
                                          device=prefix.device, mode="cache")
    else:
        layers = [{} for _ in net(model).blocks]
        mask = far_dense_mask(layout, has_clean=False, pad="none", device=prefix.device)
    zero = torch.zeros(b, f, device=prefix.device)
    flag = {"num_cached_chunks": len(chunk_partition) - 1, "is_cache_step": True}
    model(hidden_states=prefix, timestep=zero, r_timestep=zero, encoder_hidden_states=cond,
          chunk_partition=list(chunk_partition), kv_cache=layers, kv_cache_flag=flag, attention_mask=mask,
          return_dict=False)
    return FarCache(layers, len(chunk_partition))


class ChunkFn:
    """The FAR model on the newest chunk, earlier chunks through `cache`, as a `FlowMapFn`."""

    def __init__(self, model, cache: FarCache, chunk_partition):
        if len(chunk_partition) != cache.num_chunks + 1:
            raise ValueError(f"a cache of {cache.num_chunks} chunks serves chunk {cache.num_chunks}, "
                             f"not a partition of {len(chunk_partition)} chunks")
        self.model, self.cache, self.chunk_partition = model, cache, list(chunk_partition)

    def __call__(self, z, t, r, cond):
        _check_inputs(z, t, cond)
        b, f = z.shape[:2]
        if f != self.chunk_partition[-1]:
            raise ValueError(f"chunk has {f} frames, the partition says {self.chunk_partition[-1]}")
        tt = _train_units(t).to(z.device)[:, None].expand(b, f)
        rr = _train_units(r).to(z.device)[:, None].expand(b, f)
        flag = {"num_cached_chunks": self.cache.num_chunks, "is_cache_step": False}
        dtype = next(self.model.parameters()).dtype
        out = self.model(hidden_states=z.to(dtype), timestep=tt, r_timestep=rr, encoder_hidden_states=cond.to(dtype),
                         chunk_partition=self.chunk_partition, kv_cache=self.cache.layers, kv_cache_flag=flag,
                         return_dict=False)[0]
        return out.to(z.dtype)


def chunk_bounds(chunk_partition) -> list[tuple[int, int]]:
    ends = [sum(chunk_partition[:i + 1]) for i in range(len(chunk_partition))]
    return list(zip([0] + ends[:-1], ends))


def _check_video(model, noise: torch.Tensor, chunk_partition) -> list:
    cp = list(chunk_partition if chunk_partition is not None else net(model).config.chunk_partition)
    if noise.ndim != 5 or noise.shape[1] != sum(cp):
        raise ValueError(f"latents (B, F, C, H, W) must have F = sum(chunk_partition) = {sum(cp)}, "
                         f"got shape {tuple(noise.shape)}")
    return cp


def _rollout(model, noise, cond, chunk_partition, run_chunk) -> torch.Tensor:
    """Chunk by chunk: `run_chunk(fn, chunk_noise)` makes a chunk, then the cache write
    (without gradient: later chunks see the earlier ones as detached context)."""
    cp = _check_video(model, noise, chunk_partition)
    cache, chunks = empty_cache(model, noise), []
    for c, (lo, hi) in enumerate(chunk_bounds(cp)):
        chunks.append(run_chunk(ChunkFn(model, cache, cp[:c + 1]), noise[:, lo:hi]))
        if c + 1 < len(cp):
            with torch.no_grad():
                cache = write_cache(model, torch.cat(chunks, dim=1).detach(), cp[:c + 1], cond)
    return torch.cat(chunks, dim=1)


def far_sample(model, noise: torch.Tensor, cond: torch.Tensor, num_steps: int, shift_k: float,
               chunk_partition=None) -> torch.Tensor:
    """Causal any-step sampling (AnyFlowFARPipeline at CFG 1): per chunk N flow-map jumps."""
    return _rollout(model, noise, cond, chunk_partition,
                    lambda fn, z: anystep_sample(fn, z, cond, num_steps, shift_k))


def far_backward_simulate(model, noise: torch.Tensor, cond: torch.Tensor, num_steps: int, k: int,
                          shift_k: float, chunk_partition=None, grad_calls: GradCalls = GradCalls()) -> torch.Tensor:
    """Causal Flow Map Backward Simulation: every chunk with the same (N, k), `1 + [k > 0] +
    [k < N - 1]` student calls per chunk plus the cache write after every chunk but the last."""
    return _rollout(model, noise, cond, chunk_partition,
                    lambda fn, z: backward_simulate(fn, z, cond, num_steps, k, shift_k, grad_calls))


def far_consistency_sample(model, noise: torch.Tensor, cond: torch.Tensor, num_steps: int, shift_k: float,
                           chunk_partition=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The causal consistency baseline's sampler (Self-Forcing-like): per chunk, consistency sampling
    (jump to 0, re-noise with fresh noise from `generator`, drawn chunk after chunk)."""
    return _rollout(model, noise, cond, chunk_partition,
                    lambda fn, z: consistency_sample(fn, z, cond, num_steps, shift_k, generator))


def far_consistency_backward_simulate(model, noise: torch.Tensor, cond: torch.Tensor, num_steps: int, k: int,
                                      shift_k: float, renoise: torch.Tensor, chunk_partition=None,
                                      grad: bool = True) -> torch.Tensor:
    """The causal consistency baseline's on-policy rollout: every chunk with the same (N, k), k consistency
    steps without gradient, then the endpoint jump (with gradient if `grad`); `renoise` (N - 1, B, F, ...)
    is cut per chunk along its frames."""
    cp = _check_video(model, noise, chunk_partition)
    bounds = iter(chunk_bounds(cp))

    def run_chunk(fn, z):
        lo, hi = next(bounds)
        return consistency_backward_simulate(fn, z, cond, num_steps, k, shift_k,
                                             renoise[:, :, lo:hi] if renoise.ndim > 1 else renoise, grad=grad)
    return _rollout(model, noise, cond, cp, run_chunk)


# --- teacher forcing (stage 1) --------------------------------------------------------------

def draw_num_chunks(num_chunks: int, full_chunk_limit: int, long_context_ratio: float = 0.5,
                    rng: random.Random | None = None) -> int:
    """How many leading chunks a stage-1 sample keeps: with probability `long_context_ratio`
    uniform in [full_chunk_limit, num_chunks], else full_chunk_limit (the authors' draw)."""
    rng = rng or random
    lo = min(full_chunk_limit, num_chunks)
    return rng.randint(lo, num_chunks) if rng.random() < long_context_ratio else lo


@dataclass
class TeacherForced:
    """Model inputs of one teacher-forced forward: clean context, then the noisy chunks."""

    hidden_states: torch.Tensor
    """(B, F, C, H, W): clean context frames, then the noisy frames"""
    timestep: torch.Tensor
    """(B, F) train units: 0 on the context, t on the noisy frames"""
    r_timestep: torch.Tensor
    """(B, F) train units: 0 on the context, r on the noisy frames"""
    clean_hidden_states: torch.Tensor
    """(B, F_noisy, C, H, W): the clean copy of the noisy frames"""
    chunk_partition: list
    num_noisy_frames: int


def teacher_forced_inputs(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                          chunk_partition, full_chunk_limit: int) -> TeacherForced:
    """Noise the last min(full_chunk_limit, chunks) chunks of the clean video `x` with one
    (t, r) per sample (`noise` covers those frames); earlier chunks stay clean context."""
    cp = list(chunk_partition)
    if x.ndim != 5 or x.shape[1] != sum(cp):
        raise ValueError(f"x must be (B, F, C, H, W) with F = {sum(cp)}, got {tuple(x.shape)}")
    n_noisy = sum(cp[-min(full_chunk_limit, len(cp)):])
    if noise.shape != (x.shape[0], n_noisy, *x.shape[2:]):
        raise ValueError(f"noise must cover the {n_noisy} noisy frames, got {tuple(noise.shape)}")
    b, f = x.shape[:2]
    clean = x[:, f - n_noisy:]
    s = t.to(x.dtype).view(-1, 1, 1, 1, 1)
    z = (1 - s) * clean + s * noise
    ctx = torch.zeros(b, f - n_noisy, device=x.device)
    tt = torch.cat([ctx, _train_units(t).to(x.device)[:, None].expand(b, n_noisy)], dim=1)
    rr = torch.cat([ctx, _train_units(r).to(x.device)[:, None].expand(b, n_noisy)], dim=1)
    return TeacherForced(torch.cat([x[:, :f - n_noisy], z], dim=1), tt, rr, clean, cp, n_noisy)


def teacher_forced_forward(model, inputs: TeacherForced, cond: torch.Tensor) -> torch.Tensor:
    """u on the noisy frames (B, F_noisy, C, H, W): noisy chunks beside their clean copy under
    the chunk-causal mask (dense processor only: it is the training path)."""
    if uses_flex(model):
        raise ValueError("teacher forcing needs the dense processor (set_far_attention(model, 'dense', ...))")
    _, _, _, h, w = inputs.hidden_states.shape
    layout = FarLayout.of(model, inputs.chunk_partition, h, w, mode="train")
    mask = far_dense_mask(layout, has_clean=True, pad=pad_form(model), device=inputs.hidden_states.device)
    clean_t = torch.zeros_like(inputs.timestep[:, -inputs.num_noisy_frames:])
    return model(hidden_states=inputs.hidden_states, timestep=inputs.timestep, r_timestep=inputs.r_timestep,
                 encoder_hidden_states=cond, chunk_partition=inputs.chunk_partition,
                 clean_hidden_states=inputs.clean_hidden_states, clean_timestep=clean_t,
                 attention_mask=mask, return_dict=False)[0]


class TeacherForcedFn:
    """The teacher-forced forward as a `FlowMapFn` on a *packed* video (B, F_ctx + 2 F_noisy, C, H, W):
    [clean context, noisy frames, clean copy of the noisy frames]. It returns u on the noisy frames and 0
    on the context and the clean copy, so the existing stage-1 loss (`losses.forward_flowmap_loss`: its
    batched calls, row subsets and central difference) applies unchanged: with data `x = [ctx, x, x]` and
    noise `[ctx, eps, x]` the packed frames of the context and the copy are fixed points of z_t and of
    `z +- d v` (v = 0 there), and their loss terms are exactly 0 (`teacher_forced_flowmap_loss`
    rescales the mean to the noisy frames)."""

    def __init__(self, model, num_context_frames: int, num_noisy_frames: int, chunk_partition):
        self.model, self.n_ctx, self.n_noisy = model, num_context_frames, num_noisy_frames
        self.chunk_partition = list(chunk_partition)

    def __call__(self, z, t, r, cond):
        _check_inputs(z, t, cond)
        b = z.shape[0]
        if z.shape[1] != self.n_ctx + 2 * self.n_noisy:
            raise ValueError(f"packed teacher-forced video must have {self.n_ctx} + 2 x {self.n_noisy} frames, "
                             f"got {z.shape[1]}")
        dtype = next(self.model.parameters()).dtype
        ctx, noisy = z[:, :self.n_ctx], z[:, self.n_ctx:self.n_ctx + self.n_noisy]
        clean = z[:, self.n_ctx + self.n_noisy:]
        zeros = torch.zeros(b, self.n_ctx, device=z.device)
        tt = torch.cat([zeros, _train_units(t).to(z.device)[:, None].expand(b, self.n_noisy)], dim=1)
        rr = torch.cat([zeros, _train_units(r).to(z.device)[:, None].expand(b, self.n_noisy)], dim=1)
        inputs = TeacherForced(torch.cat([ctx, noisy], dim=1).to(dtype), tt, rr, clean.to(dtype),
                               self.chunk_partition, self.n_noisy)
        u = teacher_forced_forward(self.model, inputs, cond.to(dtype)).to(z.dtype)
        return torch.cat([torch.zeros_like(ctx), u, torch.zeros_like(clean)], dim=1)


def teacher_forced_flowmap_loss(model, x: torch.Tensor, cond: torch.Tensor, null_cond: torch.Tensor,
                                t: torch.Tensor, r: torch.Tensor, eps: torch.Tensor, num_chunks: int,
                                chunk_partition, full_chunk_limit: int,
                                settings: losses.Stage1Settings = losses.Stage1Settings(),
                                all_reduce: losses.AllReduce | None = None) -> tuple[torch.Tensor, dict]:
    """FAR stage 1: the forward flow-map loss (MeanFlow target, guidance fusion, weighting, rescaling) of
    the teacher-forced model on the first `num_chunks` chunks of the clean videos `x` (B, F, ...): the last
    min(full_chunk_limit, num_chunks) chunks noised with one (t, r) per sample (noise: the same frames of
    `eps` (B, F, ...)), the earlier ones clean context. The loss is the mean over the noisy frames."""
    cp = list(chunk_partition)[:num_chunks]
    if not 1 <= num_chunks <= len(chunk_partition):
        raise ValueError(f"num_chunks must be in 1..{len(chunk_partition)}, got {num_chunks}")
    f = sum(cp)
    n_noisy = sum(cp[-min(full_chunk_limit, len(cp)):])
    n_ctx = f - n_noisy
    ctx, clean = x[:, :n_ctx], x[:, n_ctx:f]
    packed_x = torch.cat([ctx, clean, clean], dim=1)
    packed_eps = torch.cat([ctx, eps[:, n_ctx:f], clean], dim=1)
    fn = TeacherForcedFn(model, n_ctx, n_noisy, cp)
    loss, figures = losses.forward_flowmap_loss(fn, packed_x, cond, null_cond, t, r, packed_eps, settings,
                                                all_reduce)
    scale = packed_x.shape[1] / n_noisy
    return loss * scale, {k: v * scale for k, v in figures.items()}
