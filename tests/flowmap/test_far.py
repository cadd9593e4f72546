"""Causal AnyFlow-FAR core, against diffusers' own FAR model, pipeline and bidirectional model."""

import copy
import random

import pytest
import torch
from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, FlowMapEulerDiscreteScheduler

from pipeline.flowmap import far, models
from pipeline.flowmap.far import (
    FAR_NEW_KEYS, ChunkFn, FarLayout, empty_cache, far_backward_simulate, far_dense_mask, far_from_bidirectional,
    far_sample, set_far_attention, teacher_forced_forward, teacher_forced_inputs, write_cache,
)
from pipeline.flowmap.models import StudentFn

SHIFT = 5.0
CP = [1, 2, 2, 2]  # 7 latent frames; with full_chunk_limit 2 the oldest chunks are compressed from chunk 2 on
LIMIT = 2
H = W = 8


def _bidi(size):
    torch.manual_seed(0)
    s = models.student_from_teacher(models.build_teacher(size, seed=0))
    with torch.no_grad():  # make u(z, t, r) really depend on r
        for p in s.condition_embedder.delta_embedder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return s.eval()


@pytest.fixture(scope="module")
def bidi():
    return _bidi("tiny")


@pytest.fixture(scope="module")
def bidi1():
    """One block: for the flex-attention checks, slow on CPU."""
    return _bidi({"num_layers": 1})


def _far(bidi, pad="diffusers", backend="dense", cp=CP, limit=LIMIT):
    model = far_from_bidirectional(bidi, cp, limit).eval()
    set_far_attention(model, backend, pad)
    return model


@pytest.fixture(scope="module")
def far_model(bidi):
    return _far(bidi)


def _noise_cond(b=2, frames=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, frames, 4, H, W, generator=g), torch.randn(b, 5, 16, generator=g)


# --- 1. conversion ---------------------------------------------------------------------------

def test_conversion_from_a_bidirectional_folder_keeps_every_weight_exactly(bidi, tmp_path):
    bidi.save_pretrained(tmp_path / "bidi")
    model = far_from_bidirectional(models.load_student(tmp_path / "bidi"), CP, LIMIT)
    ref, got = bidi.state_dict(), model.state_dict()
    assert set(got) - set(ref) == FAR_NEW_KEYS and set(ref) <= set(got)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    model.save_pretrained(tmp_path / "far")  # and the FAR folder loads back in diffusers
    back = AnyFlowFARTransformer3DModel.from_pretrained(tmp_path / "far")
    assert all(torch.equal(v, got[k]) for k, v in back.state_dict().items())
    assert list(back.config.chunk_partition) == CP and back.config.full_chunk_limit == LIMIT


def test_conversion_from_wan_teacher_equals_conversion_of_its_student():
    teacher = models.build_teacher("tiny", seed=1)
    a = far_from_bidirectional(teacher, CP, LIMIT).state_dict()
    b = far_from_bidirectional(models.student_from_teacher(teacher), CP, LIMIT).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_coarse_token_is_the_fine_token_of_the_pooled_latent(far_model):
    x = _noise_cond(b=1, frames=2)[0].permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
    with torch.no_grad():
        coarse = far_model.far_patch_embedding(x)  # (B, D, F, 2, 2)
        pooled = far_model.patch_embedding(torch.nn.functional.avg_pool3d(x, (1, 2, 2)))
    assert coarse.abs().mean() > 0.1
    assert (coarse - pooled).abs().max() < 1e-5


def test_conversion_bad_inputs_are_clear_errors(bidi):
    with pytest.raises(TypeError, match="AnyFlowTransformer3DModel"):
        far_from_bidirectional(torch.nn.Linear(2, 2), CP)
    with pytest.raises(ValueError, match="multiple of the patch"):
        far_from_bidirectional(bidi, CP, LIMIT, compressed_patch_size=(1, 3, 3))
    with pytest.raises(ValueError, match="full_chunk_limit"):
        far_from_bidirectional(bidi, CP, 1)


# --- attention: dense masks and processor against diffusers' flex ----------------------------

@pytest.mark.parametrize("mode,has_clean,cp", [("train", False, CP), ("train", True, CP), ("cache", False, CP[:3]),
                                               ("train", True, [1, 2])])
def test_dense_mask_matches_diffusers_block_mask(far_model, mode, has_clean, cp):
    layout = FarLayout.of(far_model, cp, H, W, mode)
    dense = far_dense_mask(layout, has_clean, pad="none")
    block = far_model.build_attention_mask(chunk_partition=cp, height=H, width=W, has_clean_context=has_clean,
                                           mode=mode)
    n = dense.shape[0]
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ref = block.mask_mod(torch.tensor(0), torch.tensor(0), q, kv)
    assert torch.equal(dense, ref.expand(n, n))
    assert 0 < dense.float().mean() < 1


# --- 2. causal any-step sampler -------------------------------------------------------------

def _pipeline(model, noise, cond, n):
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=n, guidance_scale=1.0,
               output_type="latent", height=8 * H, width=8 * W, num_frames=4 * sum(CP) - 3, chunk_partition=CP)
    return out.frames.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sampler_matches_anyflow_far_pipeline(far_model, n):
    """The pipeline drives diffusers' loop (scheduler, cache writes into its own buffers); both
    run the dense processor here. That it equals diffusers' flex processor: the masks (above)
    and the next test."""
    noise, cond = _noise_cond()
    with torch.no_grad():
        ref = _pipeline(far_model, noise, cond, n)
        ours = far_sample(far_model, noise, cond, n, SHIFT)
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() < 1e-5


def test_sampler_matches_pipeline_with_diffusers_own_flex_attention(bidi1):
    """One block, N = 2: flex attention runs unfused (and recompiles per shape) on CPU."""
    flex = _far(bidi1, "diffusers", "flex")
    noise, cond = _noise_cond(b=1)
    with torch.no_grad():
        ref = _pipeline(flex, noise, cond, 2)
        ours = far_sample(_far(bidi1, "diffusers", "dense"), noise, cond, 2, SHIFT)
        unpadded = far_sample(_far(bidi1, "none", "dense"), noise, cond, 2, SHIFT)
    assert (ours - ref).abs().max() < 1e-5
    assert (unpadded - ref).abs().max() > 1e-2  # the padding form matters (docs/far.md)


@pytest.mark.parametrize("pad", ["diffusers", "none"])
def test_kv_cache_generation_equals_full_causal_forward(bidi, pad):
    model = _far(bidi, pad)
    noise, cond = _noise_cond()
    x = _noise_cond(seed=11)[0]
    t = torch.full((2,), 0.6, dtype=torch.float64)
    with torch.no_grad():
        for c in range(1, len(CP)):
            lo, hi = sum(CP[:c]), sum(CP[:c + 1])
            cached = ChunkFn(model, write_cache(model, x[:, :lo], CP[:c], cond), CP[:c + 1])(noise[:, lo:hi], t,
                                                                                             0.5 * t, cond)
            tt = torch.cat([torch.zeros(2, lo), torch.full((2, hi - lo), 600.0)], 1)
            mask = far_dense_mask(FarLayout.of(model, CP[:c + 1], H, W, "train"), False, pad)
            full = model(torch.cat([x[:, :lo], noise[:, lo:hi]], 1), tt, 0.5 * tt, cond, chunk_partition=CP[:c + 1],
                         attention_mask=mask, return_dict=False)[0][:, -(hi - lo):]
            assert cached.abs().mean() > 0.1
            assert (cached - full).abs().max() <= 1e-6


def test_one_chunk_equals_the_bidirectional_model(bidi):
    noise, cond = _noise_cond(frames=3)
    t = torch.full((2,), 0.8, dtype=torch.float64)
    outs = {}
    with torch.no_grad():
        ref = StudentFn(bidi)(noise, t, 0.4 * t, cond)
        for pad in ("none", "diffusers"):
            model = _far(bidi, pad, cp=[3])
            outs[pad] = ChunkFn(model, empty_cache(model, noise), [3])(noise, t, 0.4 * t, cond)
    assert (outs["none"] - ref).abs().max() < 1e-5
    assert (outs["diffusers"] - ref).abs().max() > 1e-2  # 48 tokens see 80 zero keys


# --- 3. causal backward simulation ----------------------------------------------------------

def _count_calls(model):
    calls = {"student": 0, "cache": 0}

    def hook(_module, _args, kwargs):
        flag = kwargs.get("kv_cache_flag")
        calls["cache" if flag and flag["is_cache_step"] else "student"] += 1
    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("n,k", [(1, 0), (2, 0), (2, 1), (4, 0), (4, 2), (4, 3)])
def test_backward_simulation_calls_per_chunk(far_model, n, k):
    noise, cond = _noise_cond(b=1)
    calls, handle = _count_calls(far_model)
    try:
        with torch.no_grad():
            far_backward_simulate(far_model, noise, cond, n, k, SHIFT)
    finally:
        handle.remove()
    assert calls == {"student": len(CP) * (1 + (k > 0) + (k < n - 1)), "cache": len(CP) - 1}


def test_backward_simulation_with_k_last_of_two_steps_is_the_two_step_sampler(far_model):
    noise, cond = _noise_cond()
    with torch.no_grad():
        a = far_backward_simulate(far_model, noise, cond, 2, 1, SHIFT)
        b = far_sample(far_model, noise, cond, 2, SHIFT)
    assert torch.equal(a, b)


GRAD_CP = CP[:3]  # chunk 2 sees chunk 0 compressed, so each cache write rewrites the layout


def _dmd_grads(model, checkpointing, shared_cache=False):
    """Gradients of a DMD-style loss mean((x_theta - y)^2) through causal backward simulation."""
    noise, cond = _noise_cond(b=1, frames=5, seed=5)
    y = _noise_cond(b=1, frames=5, seed=6)[0]
    model.zero_grad()
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        x = _shared_cache_rollout(model, noise, cond) if shared_cache else \
            far_backward_simulate(model, noise, cond, 3, 1, SHIFT, GRAD_CP)
        ((x - y) ** 2).mean().backward()
    finally:
        model.disable_gradient_checkpointing()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _shared_cache_rollout(model, noise, cond):
    """The authors' form, for contrast: one cache object overwritten in place by each write."""
    from pipeline.flowmap.simulate import backward_simulate
    shared, chunks = empty_cache(model, noise), []
    for c, (lo, hi) in enumerate(far.chunk_bounds(GRAD_CP)):
        chunks.append(backward_simulate(ChunkFn(model, shared, GRAD_CP[:c + 1]), noise[:, lo:hi], cond, 3, 1,
                                        SHIFT))
        if c + 1 < len(GRAD_CP):
            with torch.no_grad():
                fresh = write_cache(model, torch.cat(chunks, 1).detach(), GRAD_CP[:c + 1], cond)
            for old, new in zip(shared.layers, fresh.layers):
                old.update(new)
            shared.num_chunks = fresh.num_chunks
    return torch.cat(chunks, 1)


def test_gradients_with_and_without_checkpointing_agree_with_a_fresh_cache(bidi):
    model = _far(bidi)
    plain, ckpt = _dmd_grads(model, False), _dmd_grads(model, True)
    assert plain.norm() > 0
    assert (plain - ckpt).norm() / plain.norm() < 1e-5
    # the trap: a cache overwritten in place is read back by the recomputation
    shared = _dmd_grads(model, True, shared_cache=True)
    assert (_dmd_grads(model, False, shared_cache=True) - plain).norm() / plain.norm() < 1e-5
    assert (shared - plain).norm() / plain.norm() > 1e-3


# --- 4. teacher forcing ---------------------------------------------------------------------

@pytest.mark.parametrize("pad", ["diffusers", "none"])
def test_teacher_forced_newest_chunk_equals_the_cached_forward(bidi, pad):
    model = _far(bidi, pad)
    x, cond = _noise_cond(seed=7)
    noise = _noise_cond(frames=4, seed=12)[0]
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.4], dtype=torch.float64)
    inputs = teacher_forced_inputs(x, noise, t, r, CP, LIMIT)
    with torch.no_grad():
        u = teacher_forced_forward(model, inputs, cond)
        cached = ChunkFn(model, write_cache(model, x[:, :5], CP[:3], cond), CP)(inputs.hidden_states[:, 5:], t, r,
                                                                                cond)
    assert u.shape == (2, 4, 4, H, W) and inputs.timestep[0, :3].eq(0).all()
    assert (u[:, 2:] - cached).abs().max() <= 1e-5


@pytest.mark.parametrize("pad", ["diffusers", "none"])
def test_teacher_forced_chunks_without_compressed_context_all_equal_the_sampler_forward(bidi, pad):
    cp = [1, 2]
    model = _far(bidi, pad, cp=cp)
    x, cond = _noise_cond(frames=3, seed=8)
    noise = _noise_cond(frames=3, seed=13)[0]
    t = torch.tensor([0.7, 0.5], dtype=torch.float64)
    inputs = teacher_forced_inputs(x, noise, t, 0.5 * t, cp, LIMIT)
    with torch.no_grad():
        u = teacher_forced_forward(model, inputs, cond)
        first = ChunkFn(model, empty_cache(model, x), cp[:1])(inputs.hidden_states[:, :1], t, 0.5 * t, cond)
        second = ChunkFn(model, write_cache(model, x[:, :1], cp[:1], cond), cp)(inputs.hidden_states[:, 1:], t,
                                                                                 0.5 * t, cond)
    assert (u[:, :1] - first).abs().max() <= 1e-5
    assert (u[:, 1:] - second).abs().max() <= 1e-5


def test_draw_num_chunks_follows_the_authors_mixture():
    rng = random.Random(0)
    draws = [far.draw_num_chunks(8, 3, 0.5, rng) for _ in range(6000)]
    assert set(draws) == set(range(3, 9))
    # P(3) = 0.5 + 0.5 / 6, every other count 0.5 / 6
    assert abs(draws.count(3) / 6000 - (0.5 + 0.5 / 6)) < 0.02
    assert abs(draws.count(8) / 6000 - 0.5 / 6) < 0.015
    assert far.draw_num_chunks(2, 3, 1.0, rng) == 2


def test_bad_inputs_are_clear_errors(far_model):
    noise, cond = _noise_cond()
    with pytest.raises(ValueError, match="sum\\(chunk_partition\\)"):
        far_sample(far_model, noise[:, :6], cond, 2, SHIFT)
    with pytest.raises(ValueError, match="padding form"):
        set_far_attention(copy.deepcopy(far_model), "dense", "zeros")
    with pytest.raises(ValueError, match="flex processor"):
        set_far_attention(copy.deepcopy(far_model), "flex", "none")
    with pytest.raises(ValueError, match="serves chunk"):
        ChunkFn(far_model, empty_cache(far_model, noise), CP[:2])
    with pytest.raises(ValueError, match="noisy frames"):
        teacher_forced_inputs(noise, noise, torch.ones(2), torch.zeros(2), CP, LIMIT)
