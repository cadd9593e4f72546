"""The Gaussian-mixture oracle against independent references: Monte-Carlo posteriors, the score of
the closed-form marginal density, flow-map composition, the pushforward of noise to data, and the
MeanFlow identity that stage 1 trains on."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import steps
from pipeline.flowmap.losses import central_difference_dudt
from pipeline.flowmap.oracle import GaussianMixture

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noised(mix: GaussianMixture, n: int, t: torch.Tensor, seed: int) -> torch.Tensor:
    """`z_t = (1 - t) x + t eps` with `x` from the mixture: draws from the marginal at `t`."""
    g = _gen(seed)
    x = mix.sample(n, g, dtype=F64)
    eps = torch.randn(x.shape, generator=g, dtype=F64)
    tb = t.view(-1, *([1] * (x.ndim - 1)))
    return (1 - tb) * x + tb * eps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The oracle's tensors are tiny; on a busy 2-core machine the OpenMP barriers of exp/log on
    a few thousand elements cost milliseconds each, thousands of times per flow map."""
    with steps.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mix() -> GaussianMixture:
    return GaussianMixture.random((1, 2, 2), num_components=3, seed=0, spread=2.0, std=0.3)


# -------------------------------------------------------------------------------------------------
# velocity
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_velocity_matches_monte_carlo_posterior(t):
    """E[eps - x | z_t = z] by self-normalised importance sampling over prior draws x_i with
    weights N(z; (1 - t) x_i, t^2 I); there eps_i - x_i = (z - x_i) / t."""
    mix = GaussianMixture.random((2,), num_components=3, seed=1, spread=2.0, std=0.3)
    n = 200_000
    xs = mix.sample(n, _gen(10), dtype=F64)  # (n, 2)
    zs = _noised(mix, 6, torch.full((6,), t, dtype=F64), seed=11)  # (6, 2)
    v = mix.velocity(zs, torch.full((6,), t, dtype=F64))
    for z, v_z in zip(zs, v):
        logw = -((z - (1 - t) * xs) ** 2).sum(-1) / (2 * t ** 2)
        w = torch.softmax(logw, dim=0)
        f = (z - xs) / t
        est = w @ f
        se = torch.sqrt((w[:, None] ** 2 * (f - est) ** 2).sum(0))  # delta-method SE of the ratio estimate
        ess = 1 / (w ** 2).sum()
        assert ess > 2000, f"too few effective samples ({ess:.0f}) for a reliable error estimate"
        assert float(se.max()) < 0.02, f"Monte-Carlo error {se.tolist()} too large to test anything"
        err = (v_z - est).abs()
        assert bool((err <= 4 * se).all()), f"t={t}: |v - MC| = {err.tolist()} > 4 SE = {(4 * se).tolist()}"


def test_velocity_matches_score_of_marginal(mix):
    """Tweedie: E[eps | z] = -t grad log p_t(z) and E[x | z] = (z - t E[eps | z]) / (1 - t), with
    p_t(z) = sum_k w_k N(z; (1 - t) mu_k, ((1 - t)^2 sigma_k^2 + t^2) I) differentiated by autograd."""
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=F64)
    z = _noised(mix, len(t), t, seed=3).requires_grad_(True)
    a = (1 - t)[:, None]
    var = a ** 2 * mix.stds[None] ** 2 + t[:, None] ** 2  # (B, K)
    sq = ((z.flatten(1)[:, None] - a[..., None] * mix.means[None]) ** 2).sum(-1)
    logp = torch.logsumexp(mix.weights.log() - 0.5 * mix.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, -1)
    (score,) = torch.autograd.grad(logp.sum(), z)
    e_eps = -t.view(-1, 1, 1, 1) * score
    e_x = (z.detach() - t.view(-1, 1, 1, 1) * e_eps) / (1 - t).view(-1, 1, 1, 1)
    torch.testing.assert_close(mix.velocity(z.detach(), t), e_eps - e_x, rtol=0, atol=1e-10)


def test_velocity_at_the_edges(mix):
    """t = 0: eps is independent of z_0 = x, so v = -z.  t = 1: z = eps, so v = z - E[x]."""
    z = torch.randn(5, 1, 2, 2, generator=_gen(4), dtype=F64)
    torch.testing.assert_close(mix.velocity(z, torch.zeros(5, dtype=F64)), -z, rtol=0, atol=1e-12)
    torch.testing.assert_close(mix.velocity(z, torch.ones(5, dtype=F64)), z - mix.mean(), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------------
# flow map
# -------------------------------------------------------------------------------------------------

def test_flow_map_matches_fine_fixed_step_rk4(mix):
    """Step doubling to the default tol agrees with 4096 fixed RK4 steps far below 1e-8."""
    t, r = torch.tensor([1.0, 0.7, 0.5], dtype=F64), torch.tensor([0.0, 0.2, 0.0], dtype=F64)
    z = _noised(mix, 3, t, seed=5)
    fine = mix.flow_map(z, t, r, num_steps=4096)
    assert float((mix.flow_map(z, t, r) - fine).abs().max()) < 1e-9
    assert float((mix.flow_map(z, t, r, num_steps=16) - fine).abs().max()) > 1e-7  # the check has teeth


@pytest.mark.parametrize("t,s,r", [(1.0, 0.6, 0.0), (1.0, 0.3, 0.1), (0.8, 0.5, 0.0), (0.9, 0.85, 0.4)])
def test_flow_map_composes(mix, t, s, r):
    """Phi(Phi(z; t -> s); s -> r) = Phi(z; t -> r)."""
    n = 8
    tt, ss, rr = (torch.full((n,), v, dtype=F64) for v in (t, s, r))
    z = _noised(mix, n, tt, seed=6)
    two_jumps = mix.flow_map(mix.flow_map(z, tt, ss, tol=1e-8), ss, rr, tol=1e-8)
    one_jump = mix.flow_map(z, tt, rr, tol=1e-8)
    assert float((two_jumps - one_jump).abs().max()) < 1e-4
    assert float((one_jump - z).abs().max()) > 0.1  # the map moves points


def test_flow_map_pushes_noise_to_data(mix):
    """Phi(eps; 1 -> 0) with eps ~ N(0, I) is distributed as the mixture: its mean, the share of
    samples nearest each component, and each cluster's per-coordinate std match."""
    n = 2000
    eps = torch.randn(n, *mix.shape, generator=_gen(7), dtype=F64)
    x = mix.flow_map(eps, torch.ones(n, dtype=F64), torch.zeros(n, dtype=F64), tol=1e-6).flatten(1)
    # 1. mean within 4 standard errors of the data mean (per coordinate)
    second = mix.weights @ (mix.means ** 2 + mix.stds[:, None] ** 2)
    data_sd = torch.sqrt(second - (mix.weights @ mix.means) ** 2)
    assert bool(((x.mean(0) - mix.mean().flatten()).abs() <= 4 * data_sd / math.sqrt(n)).all())
    # 2. cluster shares within 4 binomial standard errors of the weights
    nearest = torch.cdist(x, mix.means).argmin(1)
    share = torch.bincount(nearest, minlength=mix.num_components).to(F64) / n
    w = mix.weights
    assert bool(((share - w).abs() <= 4 * torch.sqrt(w * (1 - w) / n)).all()), (share, w)
    # 3. per-cluster spread: sigma_k within 10% (n_k ~ 600 draws of 4 coordinates: SE ~ 1.5%)
    for k in range(mix.num_components):
        sd = (x[nearest == k] - mix.means[k]).pow(2).mean().sqrt()
        assert abs(float(sd / mix.stds[k]) - 1) < 0.1, (k, float(sd), float(mix.stds[k]))


def test_meanflow_identity_residual_shrinks_with_fd_step():
    """u(z, t, r) = v - (t - r) dU/dt along the ODE; with dU/dt by central difference of step d the
    residual is O(d^2) until integration error takes over (ALGORITHM.md, stage 1).

    The O(d^2) constant grows with how sharply the flow bends between components: on this
    spread-1 mixture d = 0.005 leaves ~2e-4; on the spread-2 fixture it leaves ~2e-3.
    """
    mix = GaussianMixture.random((1, 2, 2), num_components=3, seed=0, spread=1.0, std=0.3)
    n = 16
    g = _gen(8)
    t = 0.3 + 0.5 * torch.rand(n, generator=g, dtype=F64)
    r = (t - 0.1) * torch.rand(n, generator=g, dtype=F64)
    r[:4] = 0.0
    z = _noised(mix, n, t, seed=9)
    v = mix.velocity(z, t)
    u = mix.u(z, t, r)
    residuals = []
    for d in (0.04, 0.02, 0.01, 0.005):
        dudt = central_difference_dudt(mix, z, v, t, r, None, d)
        target = v - (t - r).view(-1, 1, 1, 1) * dudt
        residuals.append(float((u - target).abs().max()))
    print("MeanFlow identity residual at d = 0.04, 0.02, 0.01, 0.005:", residuals)
    for coarse, fine in zip(residuals, residuals[1:]):
        assert fine < coarse / 2.5, residuals
    assert residuals[-1] < 1e-3, residuals


# -------------------------------------------------------------------------------------------------
# the model protocol and bad input
# -------------------------------------------------------------------------------------------------

def test_u_at_r_equals_t_is_velocity_and_keeps_dtype(mix):
    """u(z, t, t) = v(z, t), Phi(z; t -> t) = z, float32 in gives float32 out, cond is ignored."""
    z = torch.randn(4, 1, 2, 2, generator=_gen(12))
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    out = mix(z, t, t, cond=torch.zeros(4, 7))
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out, mix.velocity(z, t), rtol=0, atol=0)
    torch.testing.assert_close(mix.flow_map(z, t, t), z, rtol=0, atol=0)


def test_r_above_t_raises(mix):
    z = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"r <= t.*sample 1 has t=0\.4 < r=0\.5"):
        mix.u(z, torch.tensor([0.5, 0.4, 0.9]), torch.tensor([0.1, 0.5, 0.2]))
    with pytest.raises(ValueError, match="sample 0"):
        mix.flow_map(z, 0.2, 0.3)


def test_wrong_shapes_raise(mix):
    with pytest.raises(ValueError, match=r"z must have shape \(B, \*\(1, 2, 2\)\)"):
        mix.velocity(torch.zeros(3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(3,\)"):
        mix.u(torch.zeros(3, 1, 2, 2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="stds and weights"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2), torch.ones(3))
