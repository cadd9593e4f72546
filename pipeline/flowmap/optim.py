"""Optimiser, warm-up schedule and EMA: the same objects in the reference and the learners."""

from __future__ import annotations

import copy

import torch


def make_optimizer(params, lr: float, beta1: float, beta2: float, weight_decay: float,
                   warmup: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over `warmup` steps (constant afterwards)."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=(beta1, beta2),
                            weight_decay=weight_decay, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup)))
    return opt, sched


def optimizer_from(params, optim_cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    return make_optimizer(params, optim_cfg.lr, optim_cfg.beta1, optim_cfg.beta2, optim_cfg.weight_decay,
                          optim_cfg.warmup)


class EMA:
    """An exponential moving average of a model's parameters (buffers copied as they are).

    Before `start` the average tracks the weights exactly (copies them); from `start` on
    it is updated with `decay` after every optimiser step. `decay = 0` keeps a plain copy.
    Frozen parameters (LoRA's base weights) never change, so they are left as copied: under
    ZeRO-3 they need not be gathered for the update.
    """

    def __init__(self, model: torch.nn.Module, decay: float, start: int = 0):
        self.decay, self.start = decay, start
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay if step >= self.start else 0.0
        for e, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def clip_grads(model: torch.nn.Module, grad_clip: float) -> float:
    """Clip the gradient norm (if > 0); return the pre-clip global norm (non-finite if any
    gradient is: check it before stepping, `pipeline.guard.StepGuard.check_grad_norm`)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    return float(norm)


def clip_and_step(model: torch.nn.Module, opt, sched, grad_clip: float) -> float:
    """Clip the gradient norm (if > 0), step optimiser and schedule; return the pre-clip norm."""
    norm = clip_grads(model, grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm
