"""An exact flow-map oracle: a Gaussian mixture whose marginal velocity is known in closed form.

Data `x ~ sum_k w_k N(mu_k, sigma_k^2 I)` over a fixed sample shape (e.g. `(F, C, H, W)`),
noise `eps ~ N(0, I)`, `z_t = (1 - t) x + t eps`, conditional velocity `v = eps - x`.

Per component, `(x, eps, z_t)` is jointly Gaussian, so with `a = 1 - t` and
`var_k(t) = a^2 sigma_k^2 + t^2`:

    z_t | k            ~ N(a mu_k, var_k I)
    E[x   | z, k]      = mu_k + (a sigma_k^2 / var_k) (z - a mu_k)
    E[eps | z, k]      = (t / var_k) (z - a mu_k)
    v_k(z, t)          = ((t - a sigma_k^2) / var_k) (z - a mu_k) - mu_k
    v(z, t)            = sum_k p(k | z) v_k(z, t),   p(k | z) ∝ w_k N(z; a mu_k, var_k I)

No division by `t`: at `t = 0` this gives `v = -z` (eps is independent of `z_0 = x`), at
`t = 1` it gives `v = z - sum_k w_k mu_k`. The formulas hold for any real `t` (var_k > 0), so
central differences may step slightly outside [0, 1].

The flow map `Phi(z_t; t -> r)` integrates `dz/ds = v(z, s)` from `t` down to `r` with classical
RK4 in float64, doubling the number of steps per sample until two answers agree to `tol` (1e-10 by
default); the average velocity `u = (z_t - Phi) / (t - r)` is accumulated directly from the RK4
increments (no cancellation for small `t - r`), and `u(z, t, t) = v(z, t)`.
An instance is callable as `u_fn(z, t, r, cond)`, the project's model protocol (`cond` ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_TOL = 1e-10
"""Flow-map accuracy (max abs, in data units) that step doubling aims for by default."""
MIN_STEPS = 32
"""RK4 steps of the first, coarsest pass of step doubling."""
MAX_STEPS = 16384
"""Step doubling gives up (RuntimeError) beyond this many RK4 steps."""


class GaussianMixture:
    """Isotropic Gaussian mixture `sum_k w_k N(mu_k, sigma_k^2 I)` with exact velocity and flow map.

    Args:
        means: `(K, *shape)` component means `mu_k`.
        stds: `(K,)` positive component standard deviations `sigma_k`.
        weights: `(K,)` non-negative mixture weights; normalised to sum to 1.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *sample_shape), got {tuple(means.shape)}")
        k = means.shape[0]
        if stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"stds and weights must have shape ({k},) to match means {tuple(means.shape)}, "
                             f"got {tuple(stds.shape)} and {tuple(weights.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError(f"component stds must be positive, got {stds.tolist()}")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
        self.shape = tuple(means.shape[1:])
        self.dim = math.prod(self.shape)
        self.means = means.reshape(k, self.dim)  # (K, D)
        self.stds = stds
        self.weights = weights / weights.sum()
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def random(cls, shape: Sequence[int], num_components: int, seed: int = 0, spread: float = 2.0,
               std: float = 0.3) -> GaussianMixture:
        """A reproducible mixture: means `spread * N(0, I)`, stds `std * U(0.5, 1.5)`, weights
        `U(0.5, 1.5)` normalised, all drawn from a generator seeded with `seed`."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(num_components, *shape, generator=g, dtype=torch.float64)
        stds = std * (0.5 + torch.rand(num_components, generator=g, dtype=torch.float64))
        weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        """The data mean `sum_k w_k mu_k`, shape `sample_shape` (float64)."""
        return (self.weights @ self.means).reshape(self.shape)

    def component_means(self) -> torch.Tensor:
        """`mu_k`, shape `(K, *sample_shape)` (float64)."""
        return self.means.reshape(self.num_components, *self.shape)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """`n` draws `x = mu_k + sigma_k e`, `k ~ w`, `e ~ N(0, I)`; shape `(n, *sample_shape)`, CPU.

        Drawn in float64, returned in `dtype` (torch's default dtype if None).
        """
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * e
        return x.reshape(n, *self.shape).to(dtype or torch.get_default_dtype())

    # ----------------------------------------------------------------------------------------
    # Exact marginal velocity
    # ----------------------------------------------------------------------------------------

    def _velocity64(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`v(z, t)` on flat float64 `z` `(B, D)` and `t` `(B,)` (formulas in the module docstring)."""
        means, stds, weights = self._params(z.device)
        a = (1 - t)[:, None]  # (B, 1)
        s2 = (stds ** 2)[None, :]  # (1, K)
        var = a ** 2 * s2 + t[:, None] ** 2  # (B, K)
        diff = z[:, None, :] - a[:, :, None] * means[None]  # (B, K, D): z - a mu_k
        sq = (diff ** 2).sum(-1)  # (B, K)
        # 1. posterior responsibilities p(k | z) by log-sum-exp
        logits = weights.log()[None] - 0.5 * self.dim * var.log() - 0.5 * sq / var
        # (written out: torch.softmax enters a parallel region even for tiny inputs, ~100x slower
        # on a busy CPU, and this runs thousands of times per flow map)
        resp = (logits - logits.amax(-1, keepdim=True)).exp()
        resp = resp / resp.sum(-1, keepdim=True)  # (B, K)
        # 2. per-component velocity v_k = ((t - a sigma_k^2) / var_k)(z - a mu_k) - mu_k, then mix
        coef = (t[:, None] - a * s2) / var  # (B, K)
        v_k = coef[..., None] * diff - means[None]
        return (resp[..., None] * v_k).sum(1)

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The exact marginal velocity `v(z, t) = E[eps - x | z_t = z]`, same shape and dtype as `z`."""
        z64 = self._flatten(z)
        t64 = self._per_sample(t, z64.shape[0], "t", z64.device)
        return self._velocity64(z64, t64).reshape(z.shape).to(z.dtype)

    # ----------------------------------------------------------------------------------------
    # Flow map and average velocity
    # ----------------------------------------------------------------------------------------

    def _rk4_average(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, num_steps: int) -> torch.Tensor:
        """`u(z, t, r)` by RK4 on `dz/ds = v(z, s)` from `s = t` to `s = r` in `num_steps` equal steps.

        Each sample uses its own step `h = (r - t) / N`. With RK4 increments `k_n` (the weighted
        stage average), `Phi = z + h sum_n k_n`, hence `u = (z - Phi) / (t - r) = mean_n k_n`.
        """
        h = (r - t) / num_steps  # (B,), <= 0
        s, acc = t.clone(), torch.zeros_like(z)
        for _ in range(num_steps):
            k1 = self._velocity64(z, s)
            k2 = self._velocity64(z + 0.5 * h[:, None] * k1, s + 0.5 * h)
            k3 = self._velocity64(z + 0.5 * h[:, None] * k2, s + 0.5 * h)
            k4 = self._velocity64(z + h[:, None] * k3, s + h)
            incr = (k1 + 2 * k2 + 2 * k3 + k4) / 6
            z, s, acc = z + h[:, None] * incr, s + h, acc + incr
        return acc / num_steps

    def _average_velocity64(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                            num_steps: int | None, tol: float) -> torch.Tensor:
        """`u(z, t, r)` on flat float64 inputs: exactly `v(z, t)` where `t == r`, else RK4 with
        `num_steps` steps, or (None) with per-sample step doubling.

        Doubling starts at `MIN_STEPS` and stops, sample by sample, once the flow maps of `N` and `2N`
        steps agree to `tol` (max abs); the `2N` result is kept. Each sample's answer is thus
        independent of the rest of the batch.
        """
        u = self._velocity64(z, t)
        todo = (t != r).nonzero()[:, 0]
        if num_steps is not None:
            u[todo] = self._rk4_average(z[todo], t[todo], r[todo], num_steps)
            return u
        n = MIN_STEPS
        u[todo] = self._rk4_average(z[todo], t[todo], r[todo], n)
        while len(todo):
            if 2 * n > MAX_STEPS:
                raise RuntimeError(f"flow map did not reach tol={tol:g} within {MAX_STEPS} RK4 steps for "
                                   f"{len(todo)} sample(s), e.g. sample {int(todo[0])}; raise tol or pass num_steps")
            n *= 2
            fine = self._rk4_average(z[todo], t[todo], r[todo], n)
            err = ((t - r)[todo, None] * (fine - u[todo])).abs().amax(dim=1)
            u[todo] = fine
            todo = todo[err > tol]
        return u

    def u(self, z: torch.Tensor, t: torch.Tensor | float, r: torch.Tensor | float, cond: object = None,
          num_steps: int | None = None, tol: float = DEFAULT_TOL) -> torch.Tensor:
        """Average velocity `u(z, t, r) = (z - Phi(z; t -> r)) / (t - r)`; `v(z, t)` where `t == r`.

        `t`, `r`: per-sample `(B,)` tensors (or scalars, broadcast), `r <= t`. `cond` is ignored.
        `num_steps=None` integrates until the flow map is accurate to about `tol`; an integer
        fixes the number of RK4 steps. Returns the shape, dtype and device of `z` (no gradient).
        """
        z64, t64, r64 = self._checked(z, t, r, num_steps)
        return self._average_velocity64(z64, t64, r64, num_steps, tol).reshape(z.shape).to(z.dtype)

    __call__ = u

    def flow_map(self, z: torch.Tensor, t: torch.Tensor | float, r: torch.Tensor | float,
                 num_steps: int | None = None, tol: float = DEFAULT_TOL) -> torch.Tensor:
        """`Phi(z_t; t -> r) = z_t - (t - r) u(z_t, t, r)`: the probability-flow ODE solved from `t` to `r`.

        Same arguments as `u`; returns `z` itself (cast through float64) where `r == t`.
        """
        z64, t64, r64 = self._checked(z, t, r, num_steps)
        u = self._average_velocity64(z64, t64, r64, num_steps, tol)
        phi = z64 - (t64 - r64)[:, None] * u
        return phi.reshape(z.shape).to(z.dtype)

    # ----------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim < 1 or tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"z must have shape (B, *{self.shape}) for this mixture, got {tuple(z.shape)}")
        return z.detach().to(torch.float64).reshape(z.shape[0], self.dim)

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(means, stds, weights)` in float64 on `device` (copied once per device)."""
        if device not in self._on_device:
            self._on_device[device] = tuple(p.to(device) for p in (self.means, self.stds, self.weights))
        return self._on_device[device]

    @staticmethod
    def _per_sample(t: torch.Tensor | float, batch: int, name: str, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).detach().to(device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one per sample), got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {t.tolist()}")
        return t

    def _checked(self, z, t, r, num_steps):
        bad_steps = isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
        if num_steps is not None and bad_steps:
            raise ValueError(f"num_steps must be None (adaptive) or an integer >= 1, got {num_steps!r}")
        z64 = self._flatten(z)
        t64 = self._per_sample(t, z64.shape[0], "t", z64.device)
        r64 = self._per_sample(r, z64.shape[0], "r", z64.device)
        bad = (r64 > t64).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(f"a flow map needs r <= t, but sample {i} has t={float(t64[i]):.6g} < "
                             f"r={float(r64[i]):.6g} ({len(bad)} sample(s) with r > t)")
        return z64, t64, r64
