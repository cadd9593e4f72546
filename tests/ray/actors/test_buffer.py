"""ReplayBuffer: refs in, refs out (never the bytes), bounded depth, blocking take and wait_room."""

import time

import pytest
import torch

from actors.buffer import ReplayBuffer

pytestmark = pytest.mark.ray


def _pending(ray, ref, timeout=0.3) -> bool:
    ready, _ = ray.wait([ref], timeout=timeout)
    return not ready


def test_take_returns_each_rank_its_refs_unresolved_and_the_entry_leaves_after_all_ranks(ray_cluster):
    ray = ray_cluster
    buf = ray.remote(ReplayBuffer).remote(capacity=2, num_learners=2)
    refs = [[ray.put(torch.full((3,), float(r))), ray.put(torch.full((3,), 10.0 + r))] for r in range(2)]
    assert ray.get(buf.put.remote(0, refs, {"step": 0})) == 1
    for rank in (1, 0):
        got = ray.get(buf.take.remote(0, rank))
        assert all(isinstance(r, ray.ObjectRef) for r in got)
        assert ray.get(got[0]).tolist() == [float(rank)] * 3
    assert ray.get(buf.depth.remote()) == 0
    assert ray.get(buf.stats.remote())["held_types"] == ["ObjectRef"]


def test_a_full_buffer_refuses_put_and_wait_room_blocks_until_a_step_is_taken(ray_cluster):
    ray = ray_cluster
    buf = ray.remote(ReplayBuffer).remote(capacity=1, num_learners=1)
    ray.get(buf.put.remote(0, [[ray.put(0), ray.put(1)]], {}))
    with pytest.raises(ray.exceptions.RayTaskError, match="buffer full"):
        ray.get(buf.put.remote(1, [[ray.put(0), ray.put(1)]], {}))
    room = buf.wait_room.remote()
    assert _pending(ray, room)
    ray.get(buf.take.remote(0, 0))
    assert ray.get(room, timeout=10) == 0
    assert ray.get(buf.stats.remote())["peak_depth"] == 1


def test_take_waits_for_its_step_and_metadata_refs_fill_in_when_ready(ray_cluster):
    ray = ray_cluster
    buf = ray.remote(ReplayBuffer).remote(capacity=3, num_learners=2)
    taken = buf.take.remote(5, 0)
    assert _pending(ray, taken)
    meta = [ray.put({"student_version": 4, "bytes": 64}), ray.put({"critic_version": 4, "bytes": 32})]
    ray.get(buf.put.remote(5, [[ray.put(0), ray.put(1)], [ray.put(2), ray.put(3)]], {"rows": 4}, meta))
    assert len(ray.get(taken, timeout=10)) == 2  # rank 1 has not taken step 5 yet: it stays
    for _ in range(50):
        m = ray.get(buf.meta.remote(5))
        if "bytes" in m:
            break
        time.sleep(0.1)
    assert m["student_version"] == 4 and m["critic_version"] == 4 and m["bytes"] == 96
    assert ray.get(buf.stats.remote())["bytes_per_trajectory"] == 24
    ray.get(buf.take.remote(5, 1))
    assert ray.get(buf.meta.remote(5)) is None
