"""Samplers and backward simulation, against diffusers' own sampler and explicit computations."""

import pytest
import torch
from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

from pipeline.flowmap import models, schedule
from pipeline.flowmap.models import StudentFn
from pipeline.flowmap.simulate import (
    NO_GRAD, GradCalls, anystep_sample, backward_simulate, backward_simulation_plan,
    consistency_sample, euler_sample, flow_map_jump,
)

SHIFT = 5.0


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    s = models.student_from_teacher(models.build_teacher("tiny", seed=0))
    # perturb the delta embedder so u(z, t, r) really depends on r
    with torch.no_grad():
        for p in s.condition_embedder.delta_embedder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return s.eval()


def _noise_cond(b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 4, 8, 8, generator=g), torch.randn(b, 5, 16, generator=g)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_anystep_sampler_matches_diffusers_pipeline(student, n):
    noise, cond = _noise_cond()
    pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=student,
                           scheduler=FlowMapEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=n,
               output_type="latent", guidance_scale=1.0).frames.permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        ours = anystep_sample(StudentFn(student), noise, cond, n, SHIFT)
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("n", [1, 4, 7])
def test_grid_matches_diffusers_scheduler(n):
    sched = FlowMapEulerDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(n)
    assert torch.allclose(schedule.grid(n, SHIFT), sched.sigmas.double(), atol=1e-12)


def test_euler_sampler_is_anystep_with_r_equal_t(student):
    noise, cond = _noise_cond()
    fn = StudentFn(student)
    diag = lambda z, t, r, c: fn(z, t, t, c)  # noqa: E731
    with torch.no_grad():
        a = euler_sample(fn, noise, cond, 5, SHIFT)
        b = anystep_sample(diag, noise, cond, 5, SHIFT)
    assert (a - b).abs().max() < 1e-5


def test_consistency_sampler_renoises_with_fresh_noise(student):
    noise, cond = _noise_cond()
    fn = StudentFn(student)
    with torch.no_grad():
        one = consistency_sample(fn, noise, cond, 1, SHIFT)
        direct = flow_map_jump(fn, noise, 1.0, 0.0, cond)
        a = consistency_sample(fn, noise, cond, 4, SHIFT, torch.Generator().manual_seed(1))
        b = consistency_sample(fn, noise, cond, 4, SHIFT, torch.Generator().manual_seed(2))
    assert (one - direct).abs().max() < 1e-6
    assert (a - b).abs().max() > 1e-3  # the fresh noise matters


@pytest.mark.parametrize("n", [1, 2, 5])
def test_backward_simulation_with_network_equals_explicit_three_calls(student, n):
    noise, cond = _noise_cond()
    fn = StudentFn(student)
    s = schedule.grid(n, SHIFT)
    for k in range(n):
        with torch.no_grad():
            got = backward_simulate(fn, noise, cond, n, k, SHIFT)
            z = noise
            if k > 0:
                z = z - float(s[0] - s[k]) * fn(z, torch.full((2,), float(s[0]), dtype=torch.float64), torch.full((2,), float(s[k]), dtype=torch.float64), cond)
            z = z - float(s[k] - s[k + 1]) * fn(z, torch.full((2,), float(s[k]), dtype=torch.float64), torch.full((2,), float(s[k + 1]), dtype=torch.float64), cond)
            if k + 1 < n:
                z = z - float(s[k + 1]) * fn(z, torch.full((2,), float(s[k + 1]), dtype=torch.float64), torch.zeros(2, dtype=torch.float64), cond)
        assert (got - z).abs().max() < 1e-5
        assert len(backward_simulation_plan(n, k, SHIFT)) == 1 + (k > 0) + (k + 1 < n)


def test_backward_simulation_with_exact_flow_map_equals_full_rollout():
    from pipeline.flowmap.oracle import GaussianMixture

    oracle = GaussianMixture.random((1, 1, 2, 2), num_components=3, seed=0)
    noise = torch.randn(4, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (1, 3, 6):
        full = anystep_sample(oracle, noise, None, n, SHIFT)
        for k in range(n):
            got = backward_simulate(oracle, noise, None, n, k, SHIFT)
            assert (got - full).abs().max() < 1e-5, (n, k)


def _grad_norms(student, calls, n=4, k=1):
    noise, cond = _noise_cond()
    student.zero_grad()
    x = backward_simulate(StudentFn(student), noise, cond, n, k, SHIFT, calls)
    if not x.requires_grad:
        return None
    x.square().mean().backward()
    return {name: p.grad.norm().item() if p.grad is not None else 0.0 for name, p in student.named_parameters()}


def test_gradient_reaches_parameters_through_each_configured_call(student):
    student.train()
    try:
        assert _grad_norms(student, NO_GRAD) is None
        last = _grad_norms(student, GradCalls(False, False, True))
        last_two = _grad_norms(student, GradCalls(False, True, True))
        every = _grad_norms(student, GradCalls(True, True, True))
        key = "blocks.0.attn1.to_q.weight"
        assert last[key] > 0
        # each call added to the gradient path changes the parameter gradient
        assert abs(last_two[key] - last[key]) > 1e-6 * last[key]
        assert abs(every[key] - last_two[key]) > 1e-6 * last[key]
    finally:
        student.zero_grad()
        student.eval()


def test_gradient_path_that_would_be_cut_is_rejected():
    with pytest.raises(ValueError, match="cut"):
        GradCalls(True, False, True)
    with pytest.raises(ValueError, match="cut"):
        GradCalls(False, True, False)


def test_bad_inputs_are_clear_errors(student):
    noise, cond = _noise_cond()
    fn = StudentFn(student)
    with pytest.raises(ValueError, match="N >= 1"):
        schedule.grid(0, SHIFT)
    with pytest.raises(ValueError, match="N >= 1"):
        anystep_sample(fn, noise, cond, 0, SHIFT)
    with pytest.raises(ValueError, match="r <= t"):
        flow_map_jump(fn, noise, 0.2, 0.7, cond)
    with pytest.raises(ValueError, match="prompt batch"):
        anystep_sample(fn, noise, cond[:1], 2, SHIFT)
    with pytest.raises(ValueError, match="0 <= k < N"):
        backward_simulate(fn, noise, cond, 3, 3, SHIFT)


def test_heun_reference_converges_to_the_exact_flow_map_faster_than_euler():
    from pipeline.flowmap.oracle import GaussianMixture
    from pipeline.flowmap.simulate import heun_sample

    oracle = GaussianMixture.random((1, 1, 2, 2), num_components=3, seed=1, spread=1.0)
    noise = torch.randn(8, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = oracle.flow_map(noise, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64),
                            tol=1e-8)
    heun = [(heun_sample(oracle, noise, None, n, SHIFT) - exact).abs().max().item() for n in (16, 32)]
    euler = (euler_sample(oracle, noise, None, 64, SHIFT) - exact).abs().max().item()  # same number of calls
    assert heun[1] < heun[0] / 2.5  # second order
    assert heun[1] < euler / 3
