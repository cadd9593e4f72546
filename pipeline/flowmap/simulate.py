"""Samplers and Flow Map Backward Simulation, on any `FlowMapFn` (network or oracle).

- `flow_map_jump`: one call, `Phi(z_t; t -> r) = z_t - (t - r) u(z_t, t, r)`.
- `anystep_sample`: N jumps along the shifted N-step grid (diffusers' `AnyFlowPipeline`).
- `euler_sample`: the teacher's Euler sampler (the same loop with r = t).
- `heun_sample`: second-order reference solution of the teacher's ODE.
- `consistency_sample`: jump to 0, re-noise with fresh noise (the baseline).
- `backward_simulate`: the on-policy rollout of stage 2, three calls at most.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .schedule import check_interval, grid


def per_sample(s, z: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) noise level as a float64 (B,) tensor on z's device."""
    s = s.double() if torch.is_tensor(s) else torch.tensor(float(s), dtype=torch.float64)
    s = s.to(z.device)
    return s.expand(z.shape[0]) if s.ndim == 0 else s


def flow_map_jump(u_fn, z: torch.Tensor, t, r, cond: torch.Tensor | None) -> torch.Tensor:
    """`z_t - (t - r) u(z_t, t, r)` with per-sample or scalar t and r."""
    t64, r64 = per_sample(t, z), per_sample(r, z)
    check_interval(t64, r64)
    u = u_fn(z, t64, r64, cond)
    return z - (t64 - r64).to(z.dtype).view(-1, *([1] * (z.ndim - 1))) * u


def _check_batch(noise: torch.Tensor, cond: torch.Tensor | None) -> None:
    if cond is not None and cond.shape[0] != noise.shape[0]:
        raise ValueError(f"latent batch ({noise.shape[0]}) and prompt batch ({cond.shape[0]}) differ")


def anystep_sample(u_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int,
                   shift_k: float) -> torch.Tensor:
    """N flow-map jumps from pure noise along the shifted grid; any N >= 1."""
    _check_batch(noise, cond)
    s = grid(num_steps, shift_k)
    z = noise
    for i in range(num_steps):
        z = flow_map_jump(u_fn, z, s[i], s[i + 1], cond)
    return z


def euler_sample(v_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int,
                 shift_k: float) -> torch.Tensor:
    """Euler steps of the probability-flow ODE with a velocity model (`u(z, t, t)`)."""
    _check_batch(noise, cond)
    s = grid(num_steps, shift_k)
    z = noise
    for i in range(num_steps):
        t = per_sample(s[i], z)
        v = v_fn(z, t, t, cond)
        z = z - float(s[i] - s[i + 1]) * v
    return z


def heun_sample(v_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int,
                shift_k: float) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (2N velocity calls, the last at
    s = 0): the high-accuracy reference that `ode_error` is measured against."""
    _check_batch(noise, cond)
    s = grid(num_steps, shift_k)
    z = noise
    for i in range(num_steps):
        t, r = per_sample(s[i], z), per_sample(s[i + 1], z)
        h = float(s[i] - s[i + 1])
        v = v_fn(z, t, t, cond)
        z = z - h * 0.5 * (v + v_fn(z - h * v, r, r, cond))
    return z


def consistency_sample(u_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int,
                       shift_k: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Consistency sampling: predict the endpoint, re-noise to the next level with fresh noise."""
    _check_batch(noise, cond)
    s = grid(num_steps, shift_k)
    z = noise
    x0 = z
    for i in range(num_steps):
        x0 = flow_map_jump(u_fn, z, s[i], 0.0, cond)
        if i + 1 < num_steps:
            fresh = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
            z = (1 - float(s[i + 1])) * x0 + float(s[i + 1]) * fresh
    return x0


@dataclass(frozen=True)
class GradCalls:
    """Which of the three backward-simulation calls carry gradient to the student."""

    shortcut_in: bool = True
    """the jump s_0 -> s_k"""
    real_step: bool = True
    """the step s_k -> s_{k+1}"""
    shortcut_out: bool = True
    """the jump s_{k+1} -> 0"""

    def __post_init__(self) -> None:
        # A call without gradient detaches its output, so a gradient-carrying call followed by
        # one without would have its gradient cut: the calls with gradient must be a suffix.
        flags = (self.shortcut_in, self.real_step, self.shortcut_out)
        if any(a and not b for a, b in zip(flags, flags[1:])):
            raise ValueError(f"grad_calls {flags}: a call without gradient after one with gradient would cut "
                             "the gradient path; the calls with gradient must be the last ones")


NO_GRAD = GradCalls(False, False, False)


def backward_simulation_plan(num_steps: int, k: int, shift_k: float) -> list[tuple[str, float, float]]:
    """The (name, t, r) calls of Flow Map Backward Simulation for (N, k): three at most."""
    if not 0 <= k < num_steps:
        raise ValueError(f"backward simulation needs 0 <= k < N, got k={k}, N={num_steps}")
    s = grid(num_steps, shift_k)
    plan = []
    if k > 0:
        plan.append(("shortcut_in", float(s[0]), float(s[k])))
    plan.append(("real_step", float(s[k]), float(s[k + 1])))
    if k + 1 < num_steps:
        plan.append(("shortcut_out", float(s[k + 1]), 0.0))
    return plan


def backward_simulate(u_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int, k: int,
                      shift_k: float, grad_calls: GradCalls = GradCalls()) -> torch.Tensor:
    """Flow Map Backward Simulation (ALGORITHM.md, stage 2, step 2).

    From pure noise on the shifted N-step grid: shortcut `s_0 -> s_k` (skipped when k = 0),
    the real step `s_k -> s_{k+1}`, shortcut `s_{k+1} -> 0` (skipped when k + 1 = N).
    Each call runs with gradient only if `grad_calls` says so (and grad mode is on).
    """
    _check_batch(noise, cond)
    z = noise
    for name, t, r in backward_simulation_plan(num_steps, k, shift_k):
        ctx = nullcontext() if getattr(grad_calls, name) else torch.no_grad()
        with ctx:
            z = flow_map_jump(u_fn, z, t, r, cond)
    return z


def consistency_backward_simulate(u_fn, noise: torch.Tensor, cond: torch.Tensor | None, num_steps: int, k: int,
                                  shift_k: float, renoise: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """The consistency baseline's on-policy rollout (DMD2/rCM style backward simulation).

    k steps of consistency sampling without gradient (jump to 0, re-noise to the next grid
    level with `renoise[i]`), then the endpoint jump `s_k -> 0`, with gradient if `grad`.
    """
    _check_batch(noise, cond)
    if not 0 <= k < num_steps:
        raise ValueError(f"backward simulation needs 0 <= k < N, got k={k}, N={num_steps}")
    if k > 0 and renoise.shape[0] < k:
        raise ValueError(f"consistency rollout to k={k} needs {k} re-noising draws, got {renoise.shape[0]}")
    s = grid(num_steps, shift_k)
    z = noise
    with torch.no_grad():
        for i in range(k):
            x0 = flow_map_jump(u_fn, z, s[i], 0.0, cond)
            z = (1 - float(s[i + 1])) * x0 + float(s[i + 1]) * renoise[i].to(z)
    with nullcontext() if grad else torch.no_grad():
        return flow_map_jump(u_fn, z, s[k], 0.0, cond)
