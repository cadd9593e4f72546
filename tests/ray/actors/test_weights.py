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
    assert version == 3 and all(isinstance(b, ray.ObjectRef) for p in refs for b in p.buckets)
    student, critic = (unpack(p.with_buckets(ray.get(p.buckets))) for p in refs)
    assert student["w"][0, 0] == 3 and critic["w"][0, 0] == -3
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


# ----------------------------------------------------------------------------- the sync path, end to end


class _Follower:
    """A follower as the rollout and scorer actors are: the real `WeightFollower.pull` on a diffusers model
    (bf16, the pipeline's GPU dtype) that starts on the meta device (it never holds weights of its own)."""

    def __init__(self, store, slot: int):
        from accelerate import init_empty_weights

        from actors.rollout import WeightFollower
        from pipeline.flowmap import models

        with init_empty_weights():
            net = models.build_teacher("toy").to(torch.bfloat16)
        self.role = WeightFollower()
        self.role.store = store
        self.role._follow(net, slot, reports_restart=False)

    def pull(self) -> int:
        self.role.pull()
        return self.role.version

    def release(self) -> None:
        self.role.release()

    def bits(self) -> dict:
        return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in self.role._followed.state_dict().items()}


def _published_state(seed: int) -> dict:
    from pipeline.flowmap import models

    return {k: v.to(torch.bfloat16) for k, v in models.build_teacher("toy", seed=seed).state_dict().items()}


def _publish(ray, store, version: int, state: dict) -> None:
    """What learner rank 0 does (`learners.onpolicy.OnPolicyLearner.publish`): pack, put each bucket, hand
    the store the index and refs."""
    from pipeline.weightsync import pack

    ray.get(store.publish.remote(version, pack(state, sink=ray.put), pack(state, sink=ray.put)))


def _store_bytes(ray) -> int:
    from ray._private.internal_api import node_stats

    node = next(n for n in ray.nodes() if n.get("Alive"))
    return node_stats(node["NodeManagerAddress"], node["NodeManagerPort"]).store_stats.object_store_bytes_used


def _bits(state: dict) -> dict:
    return {k: v.reshape(-1).view(torch.uint8) for k, v in state.items()}


def test_a_follower_loads_every_version_bit_exact_and_older_versions_are_freed(ray_cluster):
    import time

    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    follower = ray.remote(_Follower).remote(store, 1)
    base = _store_bytes(ray)
    states = [_published_state(seed) for seed in range(3)]
    for version, state in enumerate(states):
        _publish(ray, store, version, state)
        if version == 0:
            version_bytes = _store_bytes(ray) - base
        assert ray.get(follower.pull.remote()) == version
        got = ray.get(follower.bits.remote())
        assert got.keys() == state.keys() and all(torch.equal(got[k], b) for k, b in _bits(state).items())
    assert ray.get(store.stats.remote())["held_versions"] == [2]
    # versions 0 and 1: neither the store nor the follower holds them any more, so their objects go
    deadline = time.monotonic() + 10
    while _store_bytes(ray) - base > version_bytes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < _store_bytes(ray) - base <= version_bytes
    ray.kill(follower)
    ray.kill(store)


def test_a_version_a_follower_still_uses_outlives_the_store_dropping_it(ray_cluster):
    """The follower's weights are views of the version's shared memory: the store letting go of that
    version (two newer ones published) and more objects put in the store must not touch them."""
    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    follower = ray.remote(_Follower).remote(store, 0)
    first = _published_state(10)
    _publish(ray, store, 0, first)
    assert ray.get(follower.pull.remote()) == 0
    for version in (1, 2):
        _publish(ray, store, version, _published_state(10 + version))
    filler = [ray.put(torch.full((1 << 20,), 7, dtype=torch.uint8).numpy()) for _ in range(4)]
    got = ray.get(follower.bits.remote())
    assert all(torch.equal(got[k], b) for k, b in _bits(first).items())
    assert ray.get(follower.pull.remote()) == 2
    del filler
    ray.kill(follower)
    ray.kill(store)


def test_on_policy_release_holds_one_version_while_the_next_is_written(ray_cluster):
    """Policy lag 0: the follower lets go after its task and the learner releases the store's version
    before it writes the next, so the object store never holds two versions; `latest` waits meanwhile.
    (Byte counts are compared as drops and rises around each call: objects of earlier tests may still be
    being freed, which only lowers the count.)"""
    import time

    from pipeline.weightsync import nbytes_of

    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    follower = ray.remote(_Follower).remote(store, 0)
    first = _published_state(20)
    version_bytes = 2 * nbytes_of(first)  # student and critic slots
    _publish(ray, store, 0, first)
    assert ray.get(follower.pull.remote()) == 0
    held = _store_bytes(ray)
    ray.get(follower.release.remote())
    ray.get(store.release.remote())
    deadline = time.monotonic() + 10
    while held - _store_bytes(ray) < version_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    released = _store_bytes(ray)
    assert held - released >= version_bytes, "the released version is still in the object store"
    waiting = store.latest.remote()
    assert not ray.wait([waiting], timeout=0.3)[0], "latest must wait while nothing is held"
    state = _published_state(21)
    _publish(ray, store, 1, state)
    assert ray.get(waiting, timeout=10)[0] == 1
    assert _store_bytes(ray) - released <= 1.05 * version_bytes
    assert ray.get(follower.pull.remote()) == 1
    got = ray.get(follower.bits.remote())
    assert all(torch.equal(got[k], b) for k, b in _bits(state).items())
    ray.kill(follower)
    ray.kill(store)


def test_buckets_packed_through_one_scratch_bucket_arrive_intact(ray_cluster):
    """`pack(..., sink=ray.put, scratch=)` overwrites one buffer bucket after bucket: `ray.put` must have
    copied each before the next is written (small buckets force several through one scratch)."""
    from pipeline.weightsync import pack, scratch_bucket

    ray = ray_cluster
    state = _published_state(30)
    scratch = scratch_bucket(1 << 16)
    packed = pack(state, bucket_bytes=1 << 16, sink=ray.put, scratch=scratch)
    assert len(packed.buckets) > 3
    got = unpack(packed.with_buckets(ray.get(packed.buckets)))
    assert all(torch.equal(a, b) for a, b in zip(_bits(got).values(), _bits(state).values()))
