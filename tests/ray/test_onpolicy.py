"""The on-policy stage on Ray against the one-process reference (the pipeline's correctness oracle),
its lag bound, its buffer bound, refs-only driver, and the fail-fast resource check."""

import dataclasses
import time

import pytest
import torch

from pipeline import distributed, onpolicy
from pipeline.config import load_config
from pipeline.data.schema import read_meta
from tests.ray.conftest import reference_stage2

pytestmark = pytest.mark.ray

STEPS = 20
COMPARED = ("loss/student", "loss/dmd", "loss/critic")


def _config(tiny_world, name, *extra, steps=STEPS):
    base, *_ = tiny_world
    return load_config(None, [*base, f"run.name={name}", f"stage2.steps={steps}", *extra])


@pytest.fixture(scope="module")
def reference_run(tiny_world):
    """The reference's per-step figures and (student EMA, critic) at the global batch the Ray runs use."""
    _, data_dir, teacher, student = tiny_world
    cfg = _config(tiny_world, "reference")
    return reference_stage2(cfg, data_dir, student, teacher)


class GetSpy:
    """Wraps `ray.get` in the driver and records every tensor it ever returned."""

    def __init__(self, get):
        self.get, self.shapes = get, []

    def __call__(self, *args, **kwargs):
        out = self.get(*args, **kwargs)
        self._walk(out)
        return out

    def _walk(self, x):
        if torch.is_tensor(x):
            self.shapes.append(tuple(x.shape))
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # a steps.Trajectory, say
            for f in dataclasses.fields(x):
                self._walk(getattr(x, f.name))
        elif isinstance(x, dict):
            for v in x.values():
                self._walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                self._walk(v)


def _run_ray(tiny_world, ray_cluster, monkeypatch, name, *extra, steps=STEPS):
    _, data_dir, teacher, student = tiny_world
    cfg = _config(tiny_world, name, *extra, steps=steps)
    spy = GetSpy(ray_cluster.get)
    monkeypatch.setattr(ray_cluster, "get", spy)
    records = []
    result = distributed.run(cfg, "stage2", student, teacher, data_dir, lambda s, i, f: records.append((s, i, f)))
    monkeypatch.undo()
    assert [i for _, i, _ in records] == list(range(steps)) and {s for s, _, _ in records} == {"stage2"}
    return cfg, result, [f for _, _, f in records], spy


def _assert_matches_reference(ray_figures, reference_run, result):
    ref_figures, (ref_student, ref_critic) = reference_run
    worst = {k: 0.0 for k in COMPARED}
    for step, (got, want) in enumerate(zip(ray_figures, ref_figures, strict=True)):
        for k in COMPARED:
            rel = abs(got[k] - want[k]) / max(abs(want[k]), 1e-12)
            worst[k] = max(worst[k], rel)
            assert rel <= 1e-5, (step, k, got[k], want[k])
        # at lag 0 the buffered rollout is the learner's own, to float precision
        assert got["rollout/drift"] <= 1e-4, (step, got["rollout/drift"])
    for mine, theirs in ((result.student, ref_student), (result.critic, ref_critic)):
        theirs = theirs.state_dict()
        for key, value in mine.state_dict().items():
            assert (value - theirs[key]).abs().max() <= 1e-5, key
    print("worst relative difference over", len(ray_figures), "steps:", worst)


def _assert_refs_only(cfg, result, spy, data_dir):
    latent = tuple(read_meta(data_dir)["latent_shape"])
    trajectories = [s for s in spy.shapes if s[-len(latent):] == latent]
    assert not trajectories, f"the driver fetched trajectory-shaped tensors: {trajectories[:3]}"
    assert result.buffer_stats["held_types"] == ["ObjectRef"]
    assert result.buffer_stats["peak_depth"] <= cfg.ray.buffer_capacity


def _stage2_result(out) -> distributed.Result:
    """A session's stage-2 nets and its buffer and store stats, in the form `_run_ray` returns."""
    stats = out.stats["stage2"]
    return distributed.Result(out.nets["student"], out.nets["critic_stage2"], stats["buffer"], stats["store"])


def test_lag0_colocated_rollout_and_scorer_actors_match_reference(ray_cluster, tiny_world, reference_run, monkeypatch):
    """`ray.colocate=true`: two actors that each roll out and score their steps, no scorer pool."""
    fleets = []
    launch = onpolicy.launch_fleet
    monkeypatch.setattr(onpolicy, "launch_fleet", lambda *a, **k: fleets.append(launch(*a, **k)) or fleets[-1])
    cfg, result, figures, spy = _run_ray(tiny_world, ray_cluster, monkeypatch, "lag0-colocated",
                                         "ray.colocate=true", "ray.rollout_actors=2", "ray.rollout_cpus=1",
                                         "ray.learners=1")
    _assert_matches_reference(figures, reference_run, result)
    assert all(f["rollout/lag_max"] == 0 and f["score/seconds"] > 0 for f in figures)
    _assert_refs_only(cfg, result, spy, tiny_world[1])
    (fleet,) = fleets
    assert len(fleet.rollouts) == 2 and fleet.scorers == []


def test_lag1_runs_within_its_bound_and_the_buffer_within_capacity(ray_cluster, tiny_world, monkeypatch):
    """Lag 1 with the recentred off-policy target, two learners under ZeRO-3."""
    cfg, result, figures, spy = _run_ray(tiny_world, ray_cluster, monkeypatch, "lag1",
                                         "ray.rollout_actors=2", "ray.learners=2", "ray.zero_stage=3",
                                         "ray.max_policy_lag=1", "ray.buffer_capacity=2", "ray.lag_target=recentred",
                                         steps=10)
    lags = [f["rollout/lag_max"] for f in figures]
    assert max(lags) <= 1 and max(lags) > 0, lags
    # a rollout one version old is visibly not the learner's own (lag 0 keeps drift <= 1e-4, float noise)
    drifts = [f["rollout/drift"] for f in figures]
    assert max(d for d, lag in zip(drifts, lags) if lag > 0) > 1e-3, drifts
    assert max(f["buffer/depth"] for f in figures) <= 2
    assert all(torch.isfinite(torch.tensor(f["loss/student"])) for f in figures)
    _assert_refs_only(cfg, result, spy, tiny_world[1])


def test_a_request_beyond_the_cluster_fails_within_seconds_naming_ask_and_cluster(ray_cluster, tiny_world):
    _, data_dir, teacher, student = tiny_world
    cfg = _config(tiny_world, "too-big", "ray.learners=4", "ray.learner_cpus=2")
    t0 = time.perf_counter()
    with pytest.raises(distributed.ClusterTooSmall) as err:
        distributed.run(cfg, "stage2", student, teacher, data_dir, lambda *a: None)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "4 learners x (2 CPU, 0 GPU)" in msg and "the cluster has 4 CPUs and 0 GPUs" in msg, msg


def test_two_learners_through_a_learner_failure_match_the_reference_at_the_same_global_batch(
        ray_cluster, tiny_world, reference_run, learner_fault_run):
    """Two learners (each half of the reference's batch, data-parallel); rank 0 fails after step 7, Ray
    Train restores the group from the checkpoint of step 5, the driver rewinds its rollouts to step 5,
    every step is logged once and equals the reference's, before the failure and after it.
    (One session for both checks: each Ray session costs the suite about 30 s of start-up.)"""
    cfg = _config(tiny_world, "lag0-l2-learner-fault", "ray.rollout_actors=1", "ray.scorer_actors=1",
                  "ray.learners=2", "run.checkpoint_every=5", "run.learner_restarts=1")
    figures, out = learner_fault_run(cfg, after_step=7)
    assert all(f["rollout/lag_max"] == 0 for f in figures)
    result = _stage2_result(out)
    _assert_matches_reference(figures, reference_run, result)
    assert result.buffer_stats["held_types"] == ["ObjectRef"]


def test_two_rollout_actors_match_the_reference_through_killed_rollout_and_scorer_actors(
        ray_cluster, tiny_world, reference_run, monkeypatch):
    """Two rollout actors, one scorer, one learner at lag 0. `ray.kill` a rollout actor and the scorer
    mid-run: Ray makes them again, the calls they ran are retried, every step is trained once, the
    restarts are counted, and the run still equals the reference step for step, with the driver
    holding refs only. (One session for both checks: each Ray session costs the suite about 30 s.)"""
    import threading

    from pipeline.metrics import ACTOR_RESTARTS
    from pipeline.onpolicy import fleet_name

    _, data_dir, teacher, student = tiny_world
    cfg = _config(tiny_world, "lag0-actor-faults", "ray.rollout_actors=2", "ray.actor_restarts=2")
    records, killed = [], []
    prefix = fleet_name(cfg, "stage2")

    def killer():
        for at, name in ((4, f"{prefix}-rollout-1"), (9, f"{prefix}-scorer-0")):
            deadline = time.monotonic() + 300
            while len(records) < at and time.monotonic() < deadline:
                time.sleep(0.05)
            ray_cluster.kill(ray_cluster.get_actor(name), no_restart=False)
            killed.append((name, len(records)))

    thread = threading.Thread(target=killer, daemon=True)
    spy = GetSpy(ray_cluster.get)
    monkeypatch.setattr(ray_cluster, "get", spy)
    thread.start()
    out = distributed.train_session(cfg, ["stage2"], {"student_stage1": student, "teacher": teacher}, data_dir,
                                    lambda s, i, f: records.append((i, f)), fresh=True)
    monkeypatch.undo()
    thread.join(timeout=10)
    assert [name for name, _ in killed] == [f"{prefix}-rollout-1", f"{prefix}-scorer-0"], killed
    assert [i for i, _ in records] == list(range(STEPS))
    assert records[-1][1][ACTOR_RESTARTS] == 2, [f[ACTOR_RESTARTS] for _, f in records]
    result = _stage2_result(out)
    figures = [f for _, f in records]
    _assert_matches_reference(figures, reference_run, result)
    assert all(f["rollout/lag_max"] == 0 for f in figures)
    _assert_refs_only(cfg, result, spy, data_dir)
