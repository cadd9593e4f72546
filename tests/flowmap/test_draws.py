"""The teacher's own training-time distribution (teacher.shift, teacher.t_mean) in the data draws."""

import torch

from pipeline.config import load_config
from pipeline.flowmap import draws
from pipeline.flowmap.schedule import shift


def _t(shift_k: float, t_mean: float) -> torch.Tensor:
    return draws.data_draws(7, "teacher", 3, 4096, 10, (1, 1, 2, 2), shift_k, 0.0, None, t_mean).t.double()


def _unshift(s: torch.Tensor, k: float) -> torch.Tensor:
    return s / (k - (k - 1) * s)


def test_t_mean_moves_the_logit_normal_before_the_shift():
    base, moved = _t(3.0, 0.0), _t(3.0, 1.0)
    logit = lambda u: torch.log(u / (1 - u))  # noqa: E731
    assert torch.allclose(logit(_unshift(moved, 3.0)), logit(_unshift(base, 3.0)) + 1.0, atol=1e-3)
    high = lambda t: float((t > 0.95).double().mean())  # noqa: E731
    assert high(base) < 0.05 and high(moved) > 0.15  # where a sample's layout and motion are decided
    assert torch.allclose(_t(8.0, 0.0), shift(_unshift(base, 3.0), 8.0), atol=1e-5)


def test_teacher_shift_defaults_to_the_sampling_shift():
    cfg = load_config(None, ["model.shift=4"])
    assert cfg.teacher.train_shift(cfg.model.shift) == 4.0
    cfg = load_config(None, ["model.shift=4", "teacher.shift=8", "teacher.t_mean=0.5"])
    assert cfg.teacher.train_shift(cfg.model.shift) == 8.0 and cfg.teacher.t_mean == 0.5
