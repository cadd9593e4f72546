"""Noise levels: shift, N-step grids, (t, r) pair sampling, the t-weighting.

Everything here is in `s` units (noise level in [0, 1]; `z_s = (1 - s) x + s eps`).
Models take `1000 * s` ("train units"); `TRAIN_UNITS` is that factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRAIN_UNITS = 1000.0


def shift(s: torch.Tensor | float, k: float) -> torch.Tensor | float:
    """Wan's timestep shift `k s / (1 + (k - 1) s)`; identity for k = 1, keeps 0 and 1 fixed."""
    if k <= 0:
        raise ValueError(f"shift must be positive, got {k}")
    if k == 1.0:
        return s
    return k * s / (1 + (k - 1) * s)


def grid(num_steps: int, shift_k: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The shifted N-step grid `s_0 = 1 > s_1 > ... > s_N = 0` (N + 1 points).

    Built in float64 the way diffusers' `FlowMapEulerDiscreteScheduler` builds its sigmas,
    so samples made on this grid match diffusers' own sampler.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"a sampling grid needs an integer number of steps N >= 1, got {num_steps!r}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift(s, shift_k).to(dtype)


def check_interval(t: torch.Tensor, r: torch.Tensor) -> None:
    """Flow maps go from noisier to cleaner: `0 <= r <= t <= 1` elementwise."""
    if t.shape != r.shape:
        raise ValueError(f"t and r must have the same shape, got {tuple(t.shape)} and {tuple(r.shape)}")
    if bool((r > t).any()):
        i = int((r > t).nonzero()[0, 0])
        raise ValueError(f"a flow map needs r <= t, but sample {i} has t={float(t[i]):.6g} < r={float(r[i]):.6g}")
    if bool((t > 1).any()) or bool((r < 0).any()):
        raise ValueError(f"noise levels must lie in [0, 1]; got t in [{float(t.min()):.4g}, {float(t.max()):.4g}], "
                         f"r in [{float(r.min()):.4g}, {float(r.max()):.4g}]")


def logit_normal(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """`sigmoid(N(mean, std^2))` draws in (0, 1)."""
    g = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * g)


@dataclass(frozen=True)
class PairFractions:
    """How stage 1 partitions a global batch of (t, r) pairs (ALGORITHM.md, stage 1)."""

    diffusion: float = 0.5
    """fraction with r = t (plain flow matching)"""
    endpoint: float = 0.25
    """fraction with r = 0 (jump to the clean sample)"""

    def __post_init__(self) -> None:
        if not (0 <= self.diffusion and 0 <= self.endpoint and self.diffusion + self.endpoint <= 1):
            raise ValueError(f"pair fractions must be >= 0 and sum to <= 1, got {self}")


def sample_pairs(n: int, shift_k: float, fractions: PairFractions = PairFractions(),
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 time pairs for a global batch of `n`.

    `a, b ~ U(0, 1)`, `t = max`, `r = min`, both shifted; then by index the first
    `round(diffusion * n)` samples get `r = t` and the next `round(endpoint * n)` get `r = 0`.
    The partition is by index (not random) so every data-parallel split of the same
    global batch sees the same pairs.
    """
    ab = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    t = shift(ab.max(dim=1).values, shift_k)
    r = shift(ab.min(dim=1).values, shift_k)
    n_diff = int(round(fractions.diffusion * n))
    n_end = int(round(fractions.endpoint * n))
    r = r.clone()
    r[:n_diff] = t[:n_diff]
    r[n_diff:n_diff + n_end] = 0.0
    return t.float(), r.float()


def t_weight(t: torch.Tensor, shift_k: float, a: float = 1.0, b: float = 0.5) -> torch.Tensor:
    """Loss weight `t^a (1 - t)^b`, normalised to mean 1 over the 1000-point shifted grid."""
    ref = shift(torch.linspace(0.0, 1.0, 1000, dtype=torch.float64), shift_k)
    norm = (ref ** a * (1 - ref) ** b).mean()
    return ((t.double() ** a * (1 - t.double()).clamp_min(0) ** b) / norm).to(t.dtype)
