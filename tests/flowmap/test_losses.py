"""Losses: the decoupled DMD form against the in-process form, stage-1 target pieces."""

import pytest
import torch

from pipeline.flowmap import losses, models, schedule
from pipeline.flowmap.models import StudentFn, VelocityFn
from pipeline.flowmap.simulate import backward_simulate

SHIFT = 5.0


@pytest.fixture(scope="module")
def nets():
    teacher = models.build_teacher("tiny", seed=0).eval()
    critic = models.build_teacher("tiny", seed=1).eval()
    student = models.student_from_teacher(teacher)
    return teacher, critic, student


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 4, 8, 8, generator=g), torch.randn(b, 5, 16, generator=g),
            torch.randn(1, 5, 16, generator=g))


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_decoupled_dmd_target_matches_in_process_loss_and_gradient_at_lag_0(nets):
    teacher, critic, student = nets
    noise, cond, null = _batch()
    g = torch.Generator().manual_seed(7)
    s = schedule.shift(torch.rand(3, generator=g), SHIFT).clamp(0.02, 0.98)
    eps = torch.randn(noise.shape, generator=g)
    t_fn, c_fn, u_fn = VelocityFn(teacher), VelocityFn(critic), StudentFn(student)

    # in-process: rollout with gradient, DMD on it
    student.zero_grad()
    x_hat = backward_simulate(u_fn, noise, cond, 4, 1, SHIFT)
    loss_a, _ = losses.dmd_generator_loss(x_hat, t_fn, c_fn, cond, null, s, eps)
    loss_a.backward()
    grads_a = _grads(student)

    # decoupled: a rollout actor makes x_old without gradient, a scorer makes y,
    # the learner recomputes the rollout from the same noise, N and k
    with torch.no_grad():
        x_old = backward_simulate(u_fn, noise, cond, 4, 1, SHIFT)
    y, _ = losses.dmd_target(t_fn, c_fn, x_old, cond, null, s, eps, real_guidance=3.0)
    student.zero_grad()
    x_theta = backward_simulate(u_fn, noise, cond, 4, 1, SHIFT)
    loss_b = losses.dmd_loss(x_theta, y)
    loss_b.backward()
    grads_b = _grads(student)

    assert loss_a.item() > 0
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6 * loss_a.item()
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    student.zero_grad()


def test_dmd_target_is_the_normalised_score_difference(nets):
    teacher, critic, _ = nets
    x, cond, null = _batch()
    s = torch.full((3,), 0.5)
    eps = torch.randn_like(x)
    y, _ = losses.dmd_target(VelocityFn(teacher), VelocityFn(critic), x, cond, null, s, eps, 2.0)
    with torch.no_grad():
        xs = 0.5 * x + 0.5 * eps
        x0_fake = xs - 0.5 * VelocityFn(critic)(xs, s, s, cond)
        x0_c = xs - 0.5 * VelocityFn(teacher)(xs, s, s, cond)
        x0_u = xs - 0.5 * VelocityFn(teacher)(xs, s, s, null.expand(3, -1, -1))
        x0_real = x0_c + 2.0 * (x0_c - x0_u)
        grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(y, x - grad, atol=1e-5)


def test_dmd_target_zeroes_nans(nets):
    teacher, critic, _ = nets
    x, cond, null = _batch()
    x[0] = float("nan")
    y, _ = losses.dmd_target(VelocityFn(teacher), VelocityFn(critic), x, cond, null,
                             torch.full((3,), 0.5), torch.randn_like(x), 3.0)
    assert torch.isfinite(y[1:]).all()


def test_rescale_makes_free_mean_equal_diag_mean_and_is_split_invariant():
    per = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 50.0], requires_grad=True)
    diag = torch.tensor([True, True, False, False, True, False])
    out = losses.rescale_free_pairs(per, diag)
    assert torch.isclose(out[~diag].mean(), out[diag].mean())
    # the factor is detached: d out_i / d per_i is the factor, no cross terms
    out.sum().backward()
    factor = (per[diag].mean() / per[~diag].mean()).item()
    assert torch.allclose(per.grad, torch.where(diag, 1.0, factor))
    # two "ranks" with an all_reduce over their partial sums give the same result
    halves = [(per.detach()[:3], diag[:3]), (per.detach()[3:], diag[3:])]
    partial = []

    def fake_all_reduce(stats, _store=[]):  # sums the stats of both halves
        return sum(torch.stack([
            (p * d).sum(), d.sum().float(), (p * ~d).sum(), (~d).sum().float()]) for p, d in halves)

    for p, d in halves:
        partial.append(losses.rescale_free_pairs(p, d, fake_all_reduce))
    assert torch.allclose(torch.cat(partial), out.detach())


def test_stage1_loss_with_exact_flow_map_is_near_zero_and_not_for_a_wrong_one():
    from pipeline.flowmap.oracle import GaussianMixture

    oracle = GaussianMixture.random((1, 1, 2, 2), num_components=2, seed=0)
    n = 16
    x = oracle.sample(n, torch.Generator().manual_seed(0)).double()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    # every pair free (r < t): with no r = t sample in the batch the loss is not rescaled
    t = 0.3 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    cfg = losses.Stage1Settings(guidance=1.0, fd_step=0.005, shift=1.0)
    # the marginal velocity replaces the conditional one: u_exact is then the exact target
    z = losses.noised(x, eps, t)
    v = oracle.velocity(z, t)
    x_marg = z - t.view(-1, 1, 1, 1, 1) * v
    eps_marg = x_marg + v
    loss, _ = losses.forward_flowmap_loss(oracle, x_marg, torch.zeros(n, 1, 1), torch.zeros(1, 1, 1),
                                          t, r, eps_marg, cfg)
    wrong = lambda z_, t_, r_, c_: oracle(z_, t_, t_, c_)  # noqa: E731  (velocity, not flow map)
    loss_wrong, _ = losses.forward_flowmap_loss(wrong, x_marg, torch.zeros(n, 1, 1), torch.zeros(1, 1, 1),
                                                t, r, eps_marg, cfg)
    assert loss.item() < 1e-5
    assert loss_wrong.item() > 100 * loss.item()


def test_guidance_fusion_formula(nets):
    _, _, student = nets
    x, cond, null = _batch()
    eps = torch.randn_like(x)
    t = torch.tensor([0.5, 0.7, 0.9])
    fn = StudentFn(student)
    w = 3.0
    cfg = losses.Stage1Settings(guidance=w, shift=SHIFT)
    loss, _ = losses.forward_flowmap_loss(fn, x, cond, null, t, t, eps, cfg)  # r = t: target is v
    with torch.no_grad():
        z = losses.noised(x, eps, t)
        pred = (fn(z, t, t, cond) - (1 - w) * fn(z, t, t, null.expand(3, -1, -1))) / w
        per = ((pred - (eps - x)) ** 2).flatten(1).mean(1) * schedule.t_weight(t, SHIFT)
    assert torch.isclose(loss, per.mean(), rtol=1e-5)


def test_stage1_rejects_mismatched_batches(nets):
    _, _, student = nets
    x, cond, null = _batch()
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="prompt batch"):
        losses.forward_flowmap_loss(StudentFn(student), x, cond[:2], null, t, t, torch.randn_like(x))


def test_pair_sampling_fractions_and_shift():
    t, r = schedule.sample_pairs(64, 5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r[:32], t[:32])
    assert torch.all(r[32:48] == 0)
    assert torch.all(r[48:] < t[48:]) and torch.all(r[48:] > 0)
    assert torch.all((t > 0) & (t < 1))
    # shifted: with k = 5 most t lie above 0.5
    assert (t > 0.5).float().mean() > 0.7


def test_t_weight_is_normalised_on_the_shifted_grid():
    grid = schedule.shift(torch.linspace(0, 1, 1000, dtype=torch.float64), 5.0)
    assert torch.isclose(schedule.t_weight(grid, 5.0).mean(), torch.tensor(1.0, dtype=torch.float64))


def test_offpolicy_targets_give_the_dmd_step_with_or_without_the_pull_toward_the_old_sample():
    """A buffered rollout x_old from an older student, its target y = x_old - grad, and the learner's own
    rollout x_theta: "stored" regresses on y (gradient grad + (x_theta - x_old)), "recentred" on the same
    step from x_theta (gradient grad alone); at lag 0 (x_theta = x_old) both are the decoupled loss."""
    g = torch.Generator().manual_seed(3)
    x_old, grad, move = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    y = x_old - grad
    n = x_old.numel()
    for form, want in (("stored", grad + move), ("recentred", grad)):
        x_theta = (x_old + move).requires_grad_(True)
        losses.dmd_loss(x_theta, losses.offpolicy_target(y, x_old, x_theta, form), 2.0).backward()
        torch.testing.assert_close(x_theta.grad, 2.0 * 2 * want / n)
    same = x_old.clone().requires_grad_(True)
    assert torch.equal(losses.offpolicy_target(y, x_old, same, "recentred"), y)
    with pytest.raises(ValueError, match="unknown off-policy target"):
        losses.offpolicy_target(y, x_old, same, "fresh")
