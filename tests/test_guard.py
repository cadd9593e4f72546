"""The step guard (pipeline/guard.py) on its own, and inside reference.Trainee: what is a bad step,
what a skipped step leaves untouched, the in-a-row count, the abort, and finding the abort
behind wrappers (as Ray re-raises a worker's error)."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch

from pipeline import metrics as M
from pipeline.config import OptimConfig
from pipeline.guard import StepGuard, TooManyBadSteps, agree, nonfinite
from pipeline.reference import Trainee
from pipeline.run import _aborted

NAN, INF = float("nan"), float("inf")


def test_checks_name_the_first_reason_and_a_good_step_resets_the_row():
    g = StepGuard("teacher", max_bad_in_a_row=3, warn=None)
    assert g.check(torch.tensor(1.0), x=torch.zeros(2), cond=None)
    assert g.record(0, True) == {M.SKIPPED_STEPS: 0, M.BAD_IN_A_ROW: 0}
    assert not g.check(torch.tensor(NAN), x=torch.tensor([1.0, INF, NAN]))
    assert g.reason == "non-finite values in the batch's x (1 NaN, 1 Inf of 3)"
    assert g.record(1, False) == {M.SKIPPED_STEPS: 1, M.BAD_IN_A_ROW: 1}
    assert g.reason is None
    assert g.check(2.0) and not g.check_grad_norm(torch.tensor(INF))
    assert g.record(2, False) == {M.SKIPPED_STEPS: 2, M.BAD_IN_A_ROW: 2}
    assert g.check(torch.tensor(0.5)) and g.check_grad_norm(3.0) and g.check_grad_norm(None)
    assert g.record(3, True) == {M.SKIPPED_STEPS: 2, M.BAD_IN_A_ROW: 0}


def test_record_counts_what_happened_and_a_skip_without_a_failed_check_still_has_a_reason():
    lines = []
    g = StepGuard("s", warn=lines.append)
    g.check(torch.tensor(INF))
    assert g.record(0, True) == {M.SKIPPED_STEPS: 0, M.BAD_IN_A_ROW: 0} and g.reason is None  # it was applied
    assert g.record(1, False) == {M.SKIPPED_STEPS: 1, M.BAD_IN_A_ROW: 1}  # e.g. DeepSpeed skipped it
    assert "s, step 1: skipped, the update was not applied" in lines[0]


def test_abort_at_exactly_max_bad_in_a_row_names_stage_step_and_reason():
    lines = []
    g = StepGuard("stage2 critic", max_bad_in_a_row=3, warn=lines.append)
    for step in range(2):
        g.check(torch.tensor(NAN))
        g.record(step, False)
    assert len(lines) == 2 and lines[1].startswith("warning: stage2 critic, step 1: skipped, non-finite loss (nan)")
    g.check(torch.tensor(NAN))
    with pytest.raises(TooManyBadSteps) as info:
        g.record(7, False)
    err = info.value
    assert (err.stage, err.step, err.limit, err.skipped) == ("stage2 critic", 7, 3, 3)
    assert str(err) == ("stage2 critic, step 7: training aborted after 3 bad steps in a row "
                        "(run.max_bad_steps=3; 3 skipped in all); last: non-finite loss (nan)")
    assert "\n" not in str(err)
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (Ray workers)
    assert type(again) is TooManyBadSteps and str(again) == str(err)


def test_max_one_aborts_at_the_first_bad_step_and_zero_is_refused():
    g = StepGuard("t", max_bad_in_a_row=1, warn=None)
    with pytest.raises(TooManyBadSteps, match="t, step 0"):
        g.record(0, False)
    with pytest.raises(ValueError):
        StepGuard("t", max_bad_in_a_row=0)


def test_nonfinite_and_agree_without_distributed():
    assert nonfinite(torch.ones(3)) is None and nonfinite(torch.arange(3)) is None
    assert nonfinite(torch.tensor([INF, -INF, 0.0])) == "2 Inf of 3"
    assert agree(True) is True and agree(False) is False


def _trainee(max_bad=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optim = OptimConfig(lr=0.1, warmup=3, ema=0.5, ema_start=0, grad_clip=1.0)
    return Trainee(model, optim, StepGuard("teacher", max_bad, warn=None))


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * NAN


@pytest.mark.parametrize("bad", ["loss", "grad", "batch"])
def test_a_skipped_trainee_step_changes_nothing_but_the_counters(bad):
    t = _trainee()
    x = torch.randn(8, 4)
    t.apply(t.model(x).square().mean(), 0, x=x)  # one good step: AdamW state, schedule, EMA all moved
    before = (copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.opt.state_dict()),
              copy.deepcopy(t.ema.state_dict()), t.sched.last_epoch)
    loss = t.model(x).square().mean()
    if bad == "loss":
        loss = loss * NAN
    elif bad == "grad":
        loss = _NanGrad.apply(loss)
    batch = x.clone()
    if bad == "batch":
        batch[3, 1] = NAN
    norm = t.apply(loss, 1, x=batch)
    assert t.guard.figures() == {M.SKIPPED_STEPS: 1, M.BAD_IN_A_ROW: 1}
    assert norm != norm  # NaN: no backward (bad loss or batch), or the non-finite norm itself
    after = (t.model.state_dict(), t.opt.state_dict(), t.ema.state_dict(), t.sched.last_epoch)
    for a, b in zip(before[0].values(), after[0].values()):
        assert torch.equal(a, b)
    for a, b in zip(before[2].values(), after[2].values()):
        assert torch.equal(a, b)
    state_a, state_b = before[1]["state"], after[1]["state"]
    for k in state_a:
        for name in state_a[k]:
            assert torch.equal(torch.as_tensor(state_a[k][name]), torch.as_tensor(state_b[k][name]))
    assert before[3] == after[3]  # the warm-up schedule did not advance
    assert all(p.grad is None for p in t.model.parameters())  # nothing left for the next step
    assert t.step == 2  # the loop's step (what the draws are a function of) moves on
    t.apply(t.model(x).square().mean(), 2, x=x)  # a good step again: applied, row reset
    assert t.guard.figures() == {M.SKIPPED_STEPS: 1, M.BAD_IN_A_ROW: 0}
    assert not torch.equal(before[0]["weight"], t.model.weight.detach())


def test_trainee_aborts_after_max_bad_steps_in_a_row():
    t = _trainee(max_bad=2)
    x = torch.randn(8, 4)
    t.apply(t.model(x).sum() * NAN, 0, x=x)
    with pytest.raises(TooManyBadSteps, match="teacher, step 1: training aborted after 2 bad steps"):
        t.apply(t.model(x).sum() * NAN, 1, x=x)


def test_the_abort_is_found_behind_wrappers():
    inner = TooManyBadSteps("stage2 student", 4, "non-finite loss (nan)", 5, 9)
    try:
        try:
            raise inner
        except TooManyBadSteps as exc:
            raise RuntimeError("worker failed\nTraceback ...") from exc
    except RuntimeError as outer:
        found = _aborted(outer)
    assert str(found) == str(inner)

    class RayLikeError(Exception):  # Ray keeps the worker's exception as `.cause`
        def __init__(self, cause):
            self.cause = cause

    class TrainLikeError(Exception):  # Ray Train keeps per-worker errors in `.worker_failures`
        worker_failures = {0: RayLikeError(inner)}

    assert str(_aborted(TrainLikeError("x"))) == str(inner)

    class DualError(RayLikeError, TooManyBadSteps):  # like RayTaskError.as_instanceof_cause()
        def __str__(self):
            return "ray.exceptions.RayTaskError(TooManyBadSteps)\nTraceback ..."

    assert str(_aborted(DualError(inner))) == str(inner)
    assert _aborted(RuntimeError("other")) is None


def test_guard_imports_without_ray_mlflow_deepspeed():
    code = ("import sys\nfor m in ('ray', 'mlflow', 'deepspeed'):\n    sys.modules[m] = None\n"
            "import pipeline.guard, pipeline.flowmap.optim\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
