"""Stages 0 and 1 on the Ray Train + DeepSpeed learners against the one-process reference, through a
learner failure (Ray Train restores the group from the newest checkpoint) and a run that stops
and is started again with the same name (it resumes mid-stage)."""

import pytest

from learners.session import FAULT_ENV
from pipeline import distributed, reference
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split

pytestmark = pytest.mark.ray

STEPS = 6
SUPERVISED = ["teacher.steps=6", "teacher.batch_size=4", "stage1.steps=6", "stage1.batch_size=4",
              "teacher.optim.warmup=2", "teacher.optim.ema_start=2", "stage1.optim.warmup=2",
              "stage1.optim.ema_start=2", "run.checkpoint_every=2"]
COMPARED = {"teacher": "loss/teacher", "stage1": "loss/stage1"}


def _config(tiny_world, name, *extra):
    base, *_ = tiny_world
    return load_config(None, [*base, *SUPERVISED, f"run.name={name}", *extra])


@pytest.fixture(scope="module")
def reference_supervised(tiny_world):
    _, data_dir, _, _ = tiny_world
    cfg = _config(tiny_world, "reference")
    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    figures = {"teacher": {}, "stage1": {}}
    log = lambda s, i, f: figures[s].__setitem__(i, f[COMPARED[s]])  # noqa: E731
    teacher = reference.train_teacher(cfg, data, log)
    student = reference.train_stage1(cfg, teacher, data, log)
    return figures, {"teacher": teacher, "student_stage1": student}


def _session(cfg, data_dir, nets=None):
    figures = {"teacher": [], "stage1": []}
    out = distributed.train_session(cfg, ["teacher", "stage1"], nets or {}, data_dir,
                                    lambda s, i, f: figures[s].append((i, f[COMPARED[s]])))
    return figures, out


def _assert_matches(figures, out, reference_supervised, first=0):
    want_figures, want_nets = reference_supervised
    for stage in ("teacher", "stage1"):
        steps = [i for i, _ in figures[stage]]
        start = first if stage == "teacher" else 0
        assert steps == list(range(start, STEPS)), (stage, steps)
        for i, got in figures[stage]:
            want = want_figures[stage][i]
            assert abs(got - want) <= 1e-5 * max(abs(want), 1e-12), (stage, i, got, want)
    for name, want in want_nets.items():
        want = want.state_dict()
        for key, value in out.nets[name].state_dict().items():
            assert (value - want[key]).abs().max() <= 1e-5, (name, key)


def test_two_learners_survive_a_failure_mid_stage_and_match_the_reference(ray_cluster, tiny_world,
                                                                            reference_supervised, tmp_path,
                                                                            monkeypatch):
    """A learner fails after stage-1 step 3; Ray Train restarts the group, which resumes from the
    checkpoint of step 4 (checkpoint_every=2); every step is logged once and equals the reference's."""
    _, data_dir, _, _ = tiny_world
    cfg = _config(tiny_world, "session-fault", "ray.learners=2", "run.learner_restarts=1")
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, f"stage1:3:{marker}")
    figures, out = _session(cfg, data_dir)
    assert marker.exists(), "the fault drill did not fire"
    _assert_matches(figures, out, reference_supervised)


def test_a_stopped_run_started_again_resumes_mid_stage(ray_cluster, tiny_world, reference_supervised, tmp_path,
                                                       monkeypatch):
    _, data_dir, _, _ = tiny_world
    cfg = _config(tiny_world, "session-resume", "run.learner_restarts=0")
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, f"teacher:2:{marker}")
    with pytest.raises(RuntimeError, match="fault drill"):
        _session(cfg, data_dir)
    monkeypatch.delenv(FAULT_ENV)
    figures, out = _session(cfg, data_dir)  # the same run name: resumes from the checkpoint of step 2
    _assert_matches(figures, out, reference_supervised, first=2)
