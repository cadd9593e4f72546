"""The losses of every stage (ALGORITHM.md), on any `FlowMapFn`.

- `flow_matching_loss`: stage 0 (teacher) and the critic.
- `forward_flowmap_loss`: stage 1, the MeanFlow target by central difference, guidance fusion,
  t-weighting and the rescaling of r != t samples.
- `dmd_target` / `dmd_loss` / `dmd_generator_loss`: stage 2's distribution matching, in the
  decoupled form the Ray pipeline computes (a stored target `y`) and the in-process form.

All reductions that must span the *global* batch take an `all_reduce` callable (sum over
data-parallel ranks); the one-process reference passes none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import t_weight

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def noised(x: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`z_s = (1 - s) x + s eps`."""
    if x.shape != eps.shape:
        raise ValueError(f"data and noise shapes differ: {tuple(x.shape)} vs {tuple(eps.shape)}")
    return (1 - _bcast(s, x)) * x + _bcast(s, x) * eps


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def flow_matching_loss(v_fn, x: torch.Tensor, cond: torch.Tensor, s: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """`mean |v(z_s, s) - (eps - x)|^2` (teacher stage 0, and the critic of stage 2)."""
    z = noised(x, eps, s)
    return per_sample_mse(v_fn(z, s, s, cond), eps - x).mean()


def drop_prompts(cond: torch.Tensor, null_cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the prompts where the boolean mask `drop` (B,) is set by the null embedding."""
    null = null_cond.to(cond.dtype).expand_as(cond)
    return torch.where(drop.view(-1, 1, 1), null, cond)


@torch.no_grad()
def central_difference_dudt(u_fn, z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                            cond: torch.Tensor | None, d: float) -> torch.Tensor:
    """Total derivative of `u(z_t, t, r)` along the path (tangent `dz = v`, `dt = 1`, r fixed),
    by central difference: `[u(z + d v, t + d, r) - u(z - d v, t - d, r)] / (2 d)`.

    Both evaluations go through the model in one batched call.
    """
    zz = torch.cat([z + d * v, z - d * v])
    tt = torch.cat([t + d, t - d])
    rr = torch.cat([r, r])
    cc = None if cond is None else torch.cat([cond, cond])
    plus, minus = u_fn(zz, tt, rr, cc).chunk(2)
    return (plus - minus) / (2 * d)


def rescale_free_pairs(per_sample: torch.Tensor, diag: torch.Tensor,
                       all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Scale the losses of r != t samples by a detached factor so their global mean equals the
    global mean loss of the r = t samples. Unchanged if either group is empty globally."""
    stats = torch.stack([
        (per_sample.detach() * diag).sum(), diag.sum().to(per_sample.dtype),
        (per_sample.detach() * ~diag).sum(), (~diag).sum().to(per_sample.dtype),
    ])
    if all_reduce is not None:
        stats = all_reduce(stats)
    sum_d, n_d, sum_f, n_f = stats.unbind()
    if n_d == 0 or n_f == 0 or sum_f == 0:
        return per_sample
    factor = (sum_d / n_d) / (sum_f / n_f)
    return torch.where(diag, per_sample, per_sample * factor)


@dataclass(frozen=True)
class Stage1Settings:
    guidance: float = 3.0
    """guidance scale w fused into the student (1 disables fusion)"""
    fd_step: float = 0.005
    """central-difference step d in s units"""
    shift: float = 5.0
    """timestep shift (used by the t-weight normalisation)"""
    weight_a: float = 1.0
    """exponent of t in the weight t^a (1 - t)^b"""
    weight_b: float = 0.5
    """exponent of (1 - t) in the weight"""


def forward_flowmap_loss(u_fn, x: torch.Tensor, cond: torch.Tensor, null_cond: torch.Tensor,
                         t: torch.Tensor, r: torch.Tensor, eps: torch.Tensor,
                         cfg: Stage1Settings = Stage1Settings(),
                         all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, dict]:
    """The stage-1 forward flow-map loss on a (local) batch; returns (loss, figures)."""
    if cond.shape[0] != x.shape[0]:
        raise ValueError(f"latent batch ({x.shape[0]}) and prompt batch ({cond.shape[0]}) differ")
    w = cfg.guidance
    # 1. the path point and its conditional velocity
    z, v = noised(x, eps, t), eps - x
    # 2. the student's prediction, with the unconditional branch fused in (guidance fusion)
    u_cond = u_fn(z, t, r, cond)
    pred = u_cond
    if w != 1.0:
        with torch.no_grad():
            u_null = u_fn(z, t, r, null_cond.to(cond.dtype).expand_as(cond))
        pred = (u_cond - (1 - w) * u_null) / w
    # 3. the MeanFlow target v - (t - r) dU/dt, dU/dt by central difference (only where r < t)
    target = v.clone()
    free = r < t
    if bool(free.any()):
        dudt = central_difference_dudt(u_fn, z[free], v[free], t[free], r[free], cond[free], cfg.fd_step) / w
        target[free] = v[free] - _bcast((t - r)[free], dudt) * dudt
    # 4. per-sample weighted MSE, then rescale the r != t samples to the r = t mean
    per = per_sample_mse(pred, target.detach()) * t_weight(t, cfg.shift, cfg.weight_a, cfg.weight_b).to(pred.dtype)
    per = rescale_free_pairs(per, ~free, all_reduce)
    done = per.detach()
    figures = {"loss_diag": float(done[~free].mean()) if bool((~free).any()) else float("nan"),
               "loss_free": float(done[free].mean()) if bool(free.any()) else float("nan")}
    return per.mean(), figures


@dataclass(frozen=True)
class DMDSettings:
    real_guidance: float = 3.0
    """guidance g_r of the teacher's ("real") clean estimate"""
    min_s: float = 0.02
    """lower clamp of the DMD noise level (after shifting)"""
    max_s: float = 0.98
    """upper clamp of the DMD noise level (after shifting)"""
    weight: float = 1.0
    """weight of the DMD loss"""


@torch.no_grad()
def dmd_target(teacher_fn, critic_fn, x: torch.Tensor, cond: torch.Tensor, null_cond: torch.Tensor,
               s: torch.Tensor, eps: torch.Tensor, real_guidance: float) -> tuple[torch.Tensor, dict]:
    """The decoupled DMD target `y = x - grad` for a detached rollout sample `x` (ALGORITHM.md, step 3)."""
    x = x.detach()
    x_s = noised(x, eps, s)
    sb = _bcast(s, x)
    x0_fake = x_s - sb * critic_fn(x_s, s, s, cond)
    null = null_cond.to(cond.dtype).expand_as(cond)
    v_c, v_u = teacher_fn(torch.cat([x_s, x_s]), torch.cat([s, s]), torch.cat([s, s]),
                          torch.cat([cond, null])).chunk(2)
    x0_c, x0_u = x_s - sb * v_c, x_s - sb * v_u
    x0_real = x0_c + real_guidance * (x0_c - x0_u)
    denom = (x - x0_real).abs().flatten(1).mean(dim=1)
    grad = torch.nan_to_num((x0_fake - x0_real) / _bcast(denom, x), nan=0.0, posinf=0.0, neginf=0.0)
    return x - grad, {"dmd_grad_norm": float(grad.flatten(1).norm(dim=1).mean())}


def dmd_loss(x_theta: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """`weight * mean((x_theta - y)^2)` with `y` a constant (the decoupled generator loss)."""
    if x_theta.shape != y.shape:
        raise ValueError(f"rollout and target shapes differ: {tuple(x_theta.shape)} vs {tuple(y.shape)}")
    return weight * ((x_theta - y.detach()) ** 2).mean()


LAG_TARGETS = ("stored", "recentred")


def offpolicy_target(y: torch.Tensor, x_old: torch.Tensor, x_theta: torch.Tensor, form: str) -> torch.Tensor:
    """The target the learner regresses its rollout `x_theta` on, given a buffered rollout `x_old` (made by
    an older student version) and its DMD target `y = x_old - grad`:

    * "stored": `y` itself (ALGORITHM.md, the decoupled form); the loss's gradient with respect to `x_theta`
      is `grad + (x_theta - x_old)`, the DMD step plus a pull back toward the older sample;
    * "recentred": `stopgrad(x_theta) - grad`, the same DMD step taken from the learner's own sample, so
      the gradient is `grad` alone.

    At policy lag 0 `x_theta` equals `x_old` and the two coincide."""
    if form == "stored":
        return y
    if form == "recentred":
        return y + (x_theta.detach() - x_old)
    raise ValueError(f"unknown off-policy target {form!r}: one of {LAG_TARGETS}")


def dmd_generator_loss(x_hat: torch.Tensor, teacher_fn, critic_fn, cond, null_cond, s, eps,
                       cfg: DMDSettings = DMDSettings()) -> tuple[torch.Tensor, dict]:
    """The in-process DMD loss `mean((x_hat - stopgrad(x_hat - grad))^2)`."""
    y, figures = dmd_target(teacher_fn, critic_fn, x_hat, cond, null_cond, s, eps, cfg.real_guidance)
    return dmd_loss(x_hat, y, cfg.weight), figures
