"""Bad input and bad training steps: the errors the entry point reports, and the step guard.

Pure Python + torch (imports neither Ray, DeepSpeed nor MLflow), so the reference backend,
the Ray learners and the entry point share it.

Errors and exit statuses (`python -m pipeline.run`):

- `InputError` (and `pipeline.config.ConfigError`, `pipeline.data.schema.DatasetError`):
  something the run reads is bad (a config key or value, the dataset, a model folder).
  One line on stderr naming the thing, exit status 2 (`EXIT_BAD_INPUT`), before work starts.
- `TooManyBadSteps`: training met `run.max_bad_steps` bad steps in a row and stopped.
  One line naming the stage, the step and the reason, exit status 3 (`EXIT_ABORTED`).

The step guard, for any training loop (one guard per trained network)::

    guard = StepGuard("stage2 student", max_bad_in_a_row=cfg.run.max_bad_steps)
    ok = guard.check(loss, x=x, cond=cond)        # finite loss and batch? (before backward)
    if ok:
        loss.backward()
        norm = clip_grad_norm_(...)
        ok = guard.check_grad_norm(norm)          # finite gradient norm? (before the update)
        if ok:
            opt.step(); sched.step(); ema.update(model, step)
    opt.zero_grad(set_to_none=True)               # a skipped step leaves no gradient behind
    figures.update(guard.record(step, ok))        # counts; raises TooManyBadSteps

A skipped step changes nothing but the counters: no optimiser, schedule or EMA update. The
loop's step number (the one the per-step random draws are a function of) still advances, so
the steps after a skipped one draw exactly what they would have drawn.

With several data-parallel ranks every rank must take the same decision (a rank that skips
`backward` while others run it would hang their gradient all-reduce): combine each rank's
`ok` with `agree(ok)` before acting on it.

With a DeepSpeed engine (seen with DeepSpeed 0.19.8, fp32, ZeRO 2 and 3, CPU/gloo): when the
global gradient norm is non-finite, `engine.step()` itself skips the update (weights,
optimiser state and LR schedule untouched, gradients cleared), `engine.was_step_applied()` is
False, `engine.skipped_steps` counts it and `engine.get_global_grad_norm()` is inf; the norm is
all-reduced, so every rank agrees. A NaN loss on any rank gives NaN gradients, hence such a
skip. So there, always run backward and step, and record what the engine did::

    guard.check(loss, rollout=x)                   # only for the reason in messages
    engine.backward(loss); engine.step()
    ok = engine.was_step_applied()
    if not ok:
        guard.check_grad_norm(engine.get_global_grad_norm())
    if ok and ema is not None:
        ema.update(engine.module, step)
    figures.update(guard.record(step, ok))         # same count on every rank: all abort together
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from pipeline import metrics as M

EXIT_OK = 0
EXIT_BAD_INPUT = 2
"""exit status of a run stopped by bad input (config, dataset, model folder), before any work"""
EXIT_ABORTED = 3
"""exit status of a run whose training stopped after too many bad steps in a row"""


class InputError(ValueError):
    """Something the run reads is bad: the message is one line naming it (exit status 2)."""


class TooManyBadSteps(RuntimeError):
    """Training met `limit` bad steps in a row (exit status 3).

    Attributes: `stage` (what was trained, e.g. "stage2 critic"), `step` (the loop step of the
    last bad one), `reason` (why it was bad), `limit` (run.max_bad_steps), `skipped` (bad steps
    in all).
    """

    def __init__(self, stage: str, step: int, reason: str, limit: int, skipped: int):
        self.stage, self.step, self.reason, self.limit, self.skipped = stage, step, reason, limit, skipped
        super().__init__(f"{stage}, step {step}: training aborted after {limit} bad steps in a row "
                         f"(run.max_bad_steps={limit}; {skipped} skipped in all); last: {reason}")

    def __reduce__(self):  # picklable across processes (Ray re-raises it in the driver)
        return type(self), (self.stage, self.step, self.reason, self.limit, self.skipped)


def nonfinite(x: torch.Tensor) -> str | None:
    """None if every value of `x` is finite, else a short description ("3 NaN, 1 Inf of 64")."""
    x = x.detach()
    if not (x.is_floating_point() or x.is_complex()):
        return None
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    nan = int(torch.isnan(x).sum())
    inf = int(bad.sum()) - nan
    kinds = ", ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{kinds} of {x.numel()}"


def agree(ok: bool, device: torch.device | str | None = None) -> bool:
    """`ok` on every rank of the default torch.distributed group (True only if all are ok);
    `ok` itself when torch.distributed is not initialised. A collective: every rank calls it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StepGuard:
    """Decide whether a training step is bad, count bad steps, stop after too many in a row.

    `stage` names what is trained in messages ("teacher", "stage2 critic"); `max_bad_in_a_row`
    is run.max_bad_steps (>= 1). `metric_names` are the names of the two figures `record`
    returns (total skipped steps, bad steps in a row). `warn` gets one line per skipped step
    (default: stderr).

    Checks (`check`, `check_batch`, `check_grad_norm`) return True if fine; on a bad value they
    keep the reason (the first one of the step) and return False. `record(step, ok)` closes
    the step with what happened (`ok`: the update was applied): it counts a skipped one, forgets
    the reason, and raises `TooManyBadSteps` once `max_bad_in_a_row` bad steps came in a row. A
    good step resets the in-a-row count.
    """

    def __init__(self, stage: str, max_bad_in_a_row: int = 5,
                 metric_names: tuple[str, str] = (M.SKIPPED_STEPS, M.BAD_IN_A_ROW),
                 warn: Callable[[str], None] | None = _warn):
        if max_bad_in_a_row < 1:
            raise ValueError(f"max_bad_in_a_row must be >= 1, got {max_bad_in_a_row}")
        self.stage, self.limit, self.metric_names, self.warn = stage, max_bad_in_a_row, metric_names, warn
        self.skipped = 0
        """bad (skipped) steps in all"""
        self.in_a_row = 0
        """bad steps since the last good one"""
        self.reason: str | None = None
        """why the current step is bad (None: nothing wrong seen yet)"""

    def _bad(self, reason: str) -> bool:
        if self.reason is None:
            self.reason = reason
        return False

    def check_batch(self, **tensors: torch.Tensor | None) -> bool:
        """True if every given tensor is finite (None entries are ignored); names the first bad one."""
        for name, x in tensors.items():
            if x is None:
                continue
            what = nonfinite(x)
            if what is not None:
                return self._bad(f"non-finite values in the batch's {name} ({what})")
        return True

    def check(self, loss: torch.Tensor | float, **batch: torch.Tensor | None) -> bool:
        """True if the batch tensors (keyword arguments, by name) and the loss are finite.
        Call it before `backward`: a False step must not be applied."""
        ok = self.check_batch(**batch)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            ok = self._bad(f"non-finite loss ({value})")
        return ok

    def check_grad_norm(self, norm: torch.Tensor | float | None) -> bool:
        """True if the (global, pre-clip) gradient norm is finite; call it before the optimiser step."""
        if norm is None:
            return True
        value = float(norm)
        if not math.isfinite(value):
            return self._bad(f"non-finite gradient norm ({value})")
        return True

    def record(self, step: int, ok: bool) -> dict[str, float]:
        """Close step `step` (`ok`: its update was applied, else it was skipped). Returns the
        figures to log with the step; raises TooManyBadSteps at the `max_bad_in_a_row`-th bad
        step in a row (the reason is the first failed check of the step, if any)."""
        if ok:
            self.in_a_row = 0
            self.reason = None
        else:
            reason = self.reason or "the update was not applied"
            self.skipped += 1
            self.in_a_row += 1
            self.reason = None
            if self.in_a_row >= self.limit:
                raise TooManyBadSteps(self.stage, step, reason, self.limit, self.skipped)
            if self.warn is not None:
                self.warn(f"warning: {self.stage}, step {step}: skipped, {reason} "
                          f"({self.in_a_row} bad in a row, run.max_bad_steps={self.limit}; "
                          f"{self.skipped} skipped in all)")
        return self.figures()

    def figures(self) -> dict[str, float]:
        """{skipped steps in all, bad steps in a row} under `metric_names`."""
        return {self.metric_names[0]: self.skipped, self.metric_names[1]: self.in_a_row}
