"""Every random draw of a training step, as a pure function of (seed, stage, step).

The one-process reference and the Ray pipeline both take their randomness from here,
so the same seed gives the same step in both, whatever process makes which part:
a rollout actor asks for the trajectory draws of step `i`, the learner for the
data-batch draws of step `i`, and they agree with the reference's single loop.
A data-parallel learner slices the global draws by its rank (`slice_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from .schedule import PairFractions, logit_normal, sample_pairs, shift

_STAGE_IDS = {"teacher": 0, "stage1": 1, "stage2": 2, "consistency": 3, "critic": 4, "eval": 5}


def generator(seed: int, stage: str, step: int, stream: int = 0) -> torch.Generator:
    """A torch generator seeded from (seed, stage, step, stream) through numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, _STAGE_IDS[stage], step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class DataDraws:
    """Draws of a flow-matching or stage-1 batch on real data (global batch)."""

    index: torch.Tensor
    """row indices into the train split"""
    t: torch.Tensor
    """source noise levels"""
    r: torch.Tensor
    """target noise levels (= t for flow matching)"""
    eps: torch.Tensor
    """noise"""
    drop: torch.Tensor
    """prompts replaced by the null prompt"""


@dataclass
class RolloutDraws:
    """Draws of one batch of on-policy rollouts (global batch)."""

    num_steps: int
    """N of the backward simulation"""
    k: int
    """index of the real step, 0 <= k < N"""
    index: torch.Tensor
    """row indices of the prompts (train split)"""
    noise: torch.Tensor
    """the starting noise"""
    renoise: torch.Tensor
    """fresh noise of the consistency rollout's re-noising steps (N - 1, B, ...); empty otherwise"""
    s: torch.Tensor
    """noise level of the DMD / critic draw"""
    eps: torch.Tensor
    """noise of the DMD / critic draw"""


def slice_rows(d, start: int, stop: int):
    """The rows [start, stop) of every batch-sized tensor in a draws dataclass (rank slicing)."""
    out = {}
    for f in fields(d):
        v = getattr(d, f.name)
        if f.name == "renoise" and torch.is_tensor(v) and v.ndim > 1:
            out[f.name] = v[:, start:stop]
        elif torch.is_tensor(v) and v.ndim >= 1 and f.name != "renoise":
            out[f.name] = v[start:stop]
        else:
            out[f.name] = v
    return type(d)(**out)


def data_draws(seed: int, stage: str, step: int, batch: int, num_rows: int, latent_shape, shift_k: float,
               cond_dropout: float, fractions: PairFractions | None, t_mean: float = 0.0) -> DataDraws:
    """A real-data batch: flow matching (`fractions=None`: r = t, t logit-normal with mean `t_mean`, then
    shifted) or stage-1 pairs."""
    g = generator(seed, stage, step, stream=0)
    index = torch.randint(num_rows, (batch,), generator=g)
    if fractions is None:
        t = shift(logit_normal(batch, g, mean=t_mean), shift_k).float()
        r = t.clone()
    else:
        t, r = sample_pairs(batch, shift_k, fractions, g)
    eps = torch.randn((batch, *latent_shape), generator=g)
    drop = torch.rand(batch, generator=g) < cond_dropout
    return DataDraws(index, t, r, eps, drop)


def rollout_draws(seed: int, stage: str, step: int, batch: int, num_rows: int, latent_shape, shift_k: float,
                  num_steps_choices: list[int], min_s: float, max_s: float, consistency: bool = False,
                  logit_normal_s: bool = False, stream: int = 1) -> RolloutDraws:
    """On-policy rollouts of one step: N and k (shared by every rank), prompts, noise, DMD draws.

    `logit_normal_s` draws the noise level as the critic's flow matching does; otherwise
    uniform, shifted and clamped to [min_s, max_s] as DMD does.
    """
    g = generator(seed, stage, step, stream=stream)
    n = int(num_steps_choices[int(torch.randint(len(num_steps_choices), (1,), generator=g))])
    k = int(torch.randint(n, (1,), generator=g))
    index = torch.randint(num_rows, (batch,), generator=g)
    noise = torch.randn((batch, *latent_shape), generator=g)
    renoise = torch.randn((max(n - 1, 0), batch, *latent_shape), generator=g) if consistency else torch.empty(0)
    u = logit_normal(batch, g) if logit_normal_s else torch.rand(batch, generator=g)
    s = shift(u, shift_k).clamp(min_s, max_s).float()
    eps = torch.randn((batch, *latent_shape), generator=g)
    return RolloutDraws(n, k, index, noise, renoise, s, eps)
