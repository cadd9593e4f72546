"""ReplayBuffer: object refs of the rollouts plus their metadata, never the bytes.

One entry per on-policy step: for each learner rank, the refs of its slice of the rollout
(`x_old`, `x_crit`) and of the scorer's target (`y`), plus metadata (step, N, k, student and
critic versions, creation time, bytes). Refs arrive wrapped in lists so Ray hands them over
unresolved; the tensors stay in the object store (owned by the driver that submitted the
tasks) and go straight from the producing actor to the learner that takes them.

Capacity is a number of steps. `put` on a full buffer is an error: the driver calls
`wait_room()` first, so rollouts are paced, never dropped. An entry leaves the buffer when
every learner rank has taken its slice.

A plain class; `ray.remote` is applied where it is launched. Its methods are coroutines so
`take` and `wait_room` can block their callers without blocking the buffer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import ray


@dataclass
class Entry:
    step: int
    slices: list[list[ray.ObjectRef]]
    """per learner rank: [rollout slice ref, target slice ref]"""
    meta: dict
    taken: set[int] = field(default_factory=set)


class ReplayBuffer:
    def __init__(self, capacity: int, num_learners: int):
        if capacity < 1 or num_learners < 1:
            raise ValueError(f"capacity and num_learners must be >= 1, got {capacity}, {num_learners}")
        self.capacity, self.num_learners = capacity, num_learners
        self._entries: dict[int, Entry] = {}
        self._changed: asyncio.Condition | None = None
        self._peak = 0
        self._puts = 0
        self._bytes_per_trajectory: float | None = None
        self._bytes_per_step = 0
        self._held_types: set[str] = set()
        self._meta_totals: dict[str, list[float]] = {}
        """numeric metadata field -> [count, sum, max] over every entry whose metadata arrived"""
        self._filling: set[asyncio.Task] = set()

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop, on first use
            self._changed = asyncio.Condition()
        return self._changed

    async def put(self, step: int, slices: list[list[ray.ObjectRef]], meta: dict,
                  pending_meta: list[ray.ObjectRef] = ()) -> int:
        """Hold the refs of `step` (`slices[rank]` = [rollout ref, target ref]); returns the depth.

        `pending_meta`: refs of small metadata dicts still being made (the rollout's and the
        scorer's: N, k, versions, bytes); merged into the entry's metadata when they resolve.
        """
        if len(self._entries) >= self.capacity:
            raise RuntimeError(f"buffer full ({self.capacity} steps): call wait_room() before put()")
        if step in self._entries:
            raise ValueError(f"step {step} is already in the buffer")
        if len(slices) != self.num_learners:
            raise ValueError(f"expected slices for {self.num_learners} learners, got {len(slices)}")
        self._held_types.update(type(r).__name__ for refs in slices for r in refs)
        self._entries[step] = Entry(step, slices, dict(meta))
        self._puts += 1
        self._peak = max(self._peak, len(self._entries))
        if pending_meta:
            task = asyncio.get_running_loop().create_task(self._fill_meta(self._entries[step], list(pending_meta)))
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)
        async with self._cond():
            self._cond().notify_all()
        return len(self._entries)

    async def _fill_meta(self, entry: Entry, refs: list[ray.ObjectRef]) -> None:
        try:
            metas = await asyncio.gather(*refs)
        except Exception as exc:  # the producer failed; the learner that takes the entry will see why
            entry.meta["error"] = repr(exc)
            return
        nbytes = sum(m.get("bytes", 0) for m in metas)
        for m in metas:
            entry.meta.update({k: v for k, v in m.items() if k != "bytes"})
        entry.meta["bytes"] = nbytes
        if nbytes and entry.meta.get("rows"):
            self._bytes_per_trajectory = nbytes / entry.meta["rows"]
        self._bytes_per_step = max(self._bytes_per_step, nbytes)
        for k, v in entry.meta.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                count_sum_max = self._meta_totals.setdefault(k, [0, 0.0, float("-inf")])
                count_sum_max[0] += 1
                count_sum_max[1] += v
                count_sum_max[2] = max(count_sum_max[2], v)

    async def wait_room(self) -> int:
        """Return the depth once it is below capacity (the driver's pacing)."""
        async with self._cond():
            await self._cond().wait_for(lambda: len(self._entries) < self.capacity)
        return len(self._entries)

    async def take(self, step: int, rank: int) -> list[ray.ObjectRef]:
        """Rank `rank`'s [rollout ref, target ref] of `step`, once it is there."""
        async with self._cond():
            await self._cond().wait_for(lambda: step in self._entries)
            entry = self._entries[step]
            if rank in entry.taken:
                raise ValueError(f"rank {rank} already took step {step}")
            entry.taken.add(rank)
            if len(entry.taken) == self.num_learners:
                del self._entries[step]
                self._cond().notify_all()
            return entry.slices[rank]

    async def reset(self) -> None:
        """Forget every entry (a restarted learner group: the driver makes the rollouts again from the
        step it resumes at; the refs dropped here free their objects)."""
        self._entries.clear()
        async with self._cond():
            self._cond().notify_all()

    async def depth(self) -> int:
        return len(self._entries)

    async def meta(self, step: int) -> dict | None:
        entry = self._entries.get(step)
        return None if entry is None else dict(entry.meta)

    async def stats(self, settle_s: float = 5.0) -> dict:
        """Peak depth, puts, bytes per trajectory and per step (the largest; tensor bytes, as the producers
        said), the types ever held, and `meta`: {field: {"count", "mean", "max"}} of every numeric
        metadata field over the entries whose metadata arrived (seconds, network calls, N, k, ...).
        Waits up to `settle_s` for metadata still arriving."""
        if self._filling:
            await asyncio.wait(list(self._filling), timeout=settle_s)
        meta = {k: {"count": n, "mean": total / n, "max": peak} for k, (n, total, peak) in self._meta_totals.items()}
        return {"depth": len(self._entries), "peak_depth": self._peak, "capacity": self.capacity,
                "puts": self._puts, "bytes_per_trajectory": self._bytes_per_trajectory,
                "bytes_per_step": self._bytes_per_step, "held_types": sorted(self._held_types), "meta": meta}
