"""Metric names (one namespace, one place) and the run's metric log.

Every per-step figure goes to `<run_dir>/metrics.jsonl` (one JSON object per line:
stage, step, time, figures) and, throttled, to the console as progress with a rate and
an ETA. MLflow tracking reads the same records (pipeline/tracking.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

# losses
LOSS_TEACHER = "loss/teacher"
LOSS_STAGE1 = "loss/stage1"
LOSS_STUDENT = "loss/student"
LOSS_DMD = "loss/dmd"
LOSS_COTRAIN = "loss/cotrain"
LOSS_CRITIC = "loss/critic"
LOSS_STAGE1_DIAG = "loss/stage1_diag"
LOSS_STAGE1_FREE = "loss/stage1_free"
GRAD_NORM_TEACHER = "grad_norm/teacher"
GRAD_NORM_STUDENT = "grad_norm/student"
DMD_PREFIX = "dmd/"
"""DMD diagnostics (`dmd/<name>`, from losses.dmd_generator_loss / the scorer)"""
ROLLOUT_NUM_STEPS = "rollout/num_steps"
ROLLOUT_K = "rollout/k"
FAR_NUM_CHUNKS = "far/num_chunks"
"""chunks kept by a causal (FAR) stage-1 batch (model.causal)"""
ROLLOUT_NFE = "rollout/nfe"
"""student network calls per trajectory of a rollout actor's backward simulation (its metadata's `nfe`)"""
# pipeline figures (Ray)
LAG_MEAN = "rollout/lag_mean"
LAG_MAX = "rollout/lag_max"
BUFFER_DEPTH = "buffer/depth"
CRITIC_LAG = "rollout/critic_lag"
POLICY_DRIFT = "rollout/drift"
"""how far the learner's rollout has moved from the buffered one it is trained against, in units of the DMD
step: rms(x_theta - x_old) / rms(x_old - y) over the global batch; 0 (to float precision) at policy lag 0"""
ROLLOUT_SECONDS = "rollout/seconds"
PULL_SECONDS = "rollout/pull_seconds"
SCORE_SECONDS = "score/seconds"
WAIT_SECONDS = "learner/wait_seconds"
LEARNER_SECONDS = "learner/seconds"
SYNC_SECONDS = "sync/seconds"
STEP_SECONDS = "time/step_seconds"
LEARNER_RESTARTS = "faults/learner_restarts"
"""learner groups restored by Ray Train from a checkpoint (counted by the driver, per stage)"""
ACTOR_RESTARTS = "faults/actor_restarts"
"""rollout and scorer actors restarted by Ray after they died (per stage)"""
# bad steps (pipeline/guard.py): skipped steps in all and bad steps in a row, per trained network
SKIPPED_STEPS = "train/skipped_steps"
BAD_IN_A_ROW = "train/bad_in_a_row"
CRITIC_SKIPPED_STEPS = "train/critic_skipped_steps"
CRITIC_BAD_IN_A_ROW = "train/critic_bad_in_a_row"

_PROGRESS_KEYS = (LOSS_TEACHER, LOSS_STAGE1, LOSS_STUDENT, LOSS_DMD, LOSS_CRITIC, LAG_MAX, BUFFER_DEPTH)


class MetricsLog:
    """Append-only JSONL log of per-step figures with console progress.

    `totals` maps a stage to its number of steps (for the ETA); progress lines are
    printed at most every `every_s` seconds and at the last step of a stage.
    """

    def __init__(self, path: str | Path | None, totals: dict[str, int] | None = None, every_s: float = 10.0,
                 stream=sys.stdout, sinks: list | None = None):
        self.path = Path(path) if path else None
        self.sinks = list(sinks or [])
        """callables that get every record as it is written (MLflow tracking)"""
        self.totals = totals or {}
        self.every_s, self.stream = every_s, stream
        self._started: dict[str, float] = {}
        self._last_print = 0.0
        self.records: list[dict] = []
        self._file = open(self.path, "a") if self.path else None

    def __call__(self, stage: str, step: int, figures: dict) -> None:
        now = time.time()
        self._started.setdefault(stage, now)
        rec = {"stage": stage, "step": step, "time": now,
               **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in figures.items()}}
        self.records.append(rec)
        for sink in self.sinks:
            sink(rec)
        if self._file:
            self._file.write(json.dumps(rec, allow_nan=True) + "\n")
            self._file.flush()
        total = self.totals.get(stage)
        last = total is not None and step + 1 >= total
        if last or now - self._last_print >= self.every_s or step == 0:
            self._last_print = now
            self.stream.write(self._line(stage, step, total, figures, now) + "\n")
            self.stream.flush()

    def _line(self, stage, step, total, figures, now) -> str:
        done = step + 1
        elapsed = now - self._started[stage]
        rate = done / elapsed if elapsed > 0 else float("nan")
        head = f"[{stage}] step {done}" + (f"/{total}" if total else "")
        if total and rate > 0 and math.isfinite(rate):
            head += f"  {rate:.2f} it/s  eta {max(total - done, 0) / rate:.0f}s"
        shown = [f"{k.split('/')[-1]}={figures[k]:.4g}" for k in _PROGRESS_KEYS if k in figures]
        return head + ("  " + " ".join(shown) if shown else "")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, from a crash, is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
