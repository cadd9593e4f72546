"""What the driver's loops on Ray share: the learner group's `fit()` thread, waiting on a ref without
missing the learners' failure, and the torch threads of a pool member.

Used by the session (pipeline/distributed.py) and the on-policy stage it drives (pipeline/onpolicy.py);
it imports neither, so the two need not import each other.
"""

from __future__ import annotations

import threading

import ray

POLL_S = 0.2


def threads_for(cpus: float) -> int:
    """Torch threads of a pool member that reserved `cpus` CPUs: rounded, at least 1."""
    return max(1, int(round(cpus)))


class FitThread(threading.Thread):
    """`trainer.fit()` in the background; its error, if any, is re-raised by the driver loop."""

    def __init__(self, trainer):
        super().__init__(name="learners", daemon=True)
        self.trainer, self.error = trainer, None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the learners failed: {self.error}") from self.error


def wait(ref: ray.ObjectRef, fit: FitThread):
    """`ray.get(ref)`, but raise at once if the learners fail meanwhile (`fit.check()`: a FitThread, or
    the session's `distributed.Watch` around it)."""
    while True:
        ready, _ = ray.wait([ref], timeout=POLL_S)
        if ready:
            return ray.get(ref)
        fit.check()
