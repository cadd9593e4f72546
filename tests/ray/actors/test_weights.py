"""WeightStore: numbered versions it owns, only the newest few kept, wait_for, learner figures."""

import pytest
import torch

from actors.weights import WeightStore
from pipeline.weightsync import unpack

pytestmark = pytest.mark.ray


def _state(v: float) -> dict:
    return {"w": torch.full((2, 2), v)}


def test_latest_is_the_newest_version_and_only_the_newest_few_are_kept(ray_cluster):
    ray = ray_cluster
    store = ray.remote(WeightStore).remote(keep=2)
    for v in range(4):
        ray.get(store.publish.remote(v, _state(v), _state(-v)))
    version, refs = ray.get(store.latest.remote())
    assert version == 3 and all(isinstance(r, ray.ObjectRef) for r in refs)
    assert unpack(ray.get(refs[0]))["w"][0, 0] == 3 and unpack(ray.get(refs[1]))["w"][0, 0] == -3
    assert ray.get(store.stats.remote())["held_versions"] == [2, 3]
    with pytest.raises(ray.exceptions.RayTaskError, match="not newer"):
        ray.get(store.publish.remote(3, _state(0), _state(0)))


def test_wait_for_returns_once_the_version_is_published(ray_cluster):
    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    ray.get(store.publish.remote(0, _state(0), _state(0)))
    assert ray.get(store.wait_for.remote(0), timeout=10) == 0
    waiting = store.wait_for.remote(2)
    ray.get(store.publish.remote(1, _state(1), _state(1)))
    assert not ray.wait([waiting], timeout=0.3)[0]
    ray.get(store.publish.remote(2, _state(2), _state(2)))
    assert ray.get(waiting, timeout=10) == 2


def test_figures_since_returns_the_reported_steps_in_order(ray_cluster):
    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    for step in (0, 1, 2):
        ray.get(store.report.remote(step, {"loss/student": float(step)}))
    assert list(ray.get(store.figures_since.remote(1))) == [1, 2]
    assert ray.get(store.figures_since.remote(0)) == {1: {"loss/student": 1.0}, 2: {"loss/student": 2.0}}
