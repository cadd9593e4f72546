"""WeightStore: numbered versions of the student and critic weights, and the learners' figures.

Version `v` holds the weights after `v` optimiser steps (version 0: the initial weights the
driver publishes). Learner rank 0 publishes version `step + 1` after each step; rollout and
scorer actors pull the newest version before their next call; the driver waits on
`wait_for(i - max_policy_lag)` before it starts the rollouts of step `i` (the lag bound).

A version is the student's and the critic's state packed into byte buckets
(`pipeline.weightsync.Packed`: an index and the refs of a few flat numpy buffers in the object
store, no pickled tensor), so a follower's `ray.get` of the buckets is a zero-copy view of shared
memory. Learner rank 0 packs and `ray.put()`s each bucket itself as soon as it is full (one copy,
at most one bucket of extra memory) and hands the store the small Packed; the store never
touches the bytes. Those objects are the learner's: if it dies they are lost, and followers wait
(`latest_after`) for the restarted learner group's rewind, which republishes. Plain state dicts
(tests, tools) are packed and put by the store itself. Only the newest `keep` versions are held
(default 1: a follower that took the refs of an older one borrows them, which keeps that
version alive until it lets go, so nothing older is needed); an older version is freed as soon
as no follower holds it. Strictly on-policy (policy lag 0) nobody reads version `v` once the
learners have taken step `v`'s targets, so learner rank 0 calls `release()` before it writes
`v + 1` and the followers let go after each task: host memory then holds one version, not two
(the old one while the new one is written; issue 16). `latest` waits while nothing is held.

A plain class; `ray.remote` is applied where it is launched (pipeline/onpolicy.py). Its
methods are coroutines so `wait_for` can block callers without blocking the store.
"""

from __future__ import annotations

import asyncio
import time

import ray

from pipeline import weightsync


class WeightStore:
    def __init__(self, keep: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._refs: dict[int, list[weightsync.Packed]] = {}
        self._version = -1
        self._figures: dict[int, dict] = {}
        self._result: list[ray.ObjectRef] | None = None
        self._changed: asyncio.Condition | None = None
        self._put_seconds = 0.0
        self._bytes_per_version = 0
        self._published_at: dict[int, float] = {}
        """version -> wall-clock time (time.time()) at which it was published"""
        self._put_seconds_total = 0.0

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop, on first use
            self._changed = asyncio.Condition()
        return self._changed

    async def publish(self, version: int, student_state: dict | weightsync.Packed,
                      critic_state: dict | weightsync.Packed,
                      figures: dict | None = None, rewind: bool = False, nbytes: int | None = None) -> None:
        """Hold version `version` (must be newer than the last); `figures` are those of step `version - 1`.
        Each state is a `weightsync.Packed` whose buckets are already in the object store (the learner's
        way) or a plain state dict, which the store packs and puts itself. `nbytes`: the tensor bytes
        (default: counted from the index).
        `rewind`: a restarted learner group goes back to `version`; newer versions are forgotten."""
        if version <= self._version and not rewind:
            raise ValueError(f"version {version} is not newer than the held version {self._version}")
        for newer in [v for v in self._refs if v >= version]:
            del self._refs[newer]
        t0 = time.perf_counter()
        held = [s if isinstance(s, weightsync.Packed) else weightsync.pack(s, sink=ray.put)
                for s in (student_state, critic_state)]
        self._refs[version] = held
        self._put_seconds = time.perf_counter() - t0
        self._put_seconds_total += self._put_seconds
        self._published_at[version] = time.time()
        self._bytes_per_version = nbytes if nbytes is not None else sum(p.nbytes for p in held)
        for old in sorted(self._refs)[:-self.keep]:
            del self._refs[old]
        self._version = version
        if figures is not None:
            self._figures[version - 1] = figures
        async with self._cond():
            self._cond().notify_all()

    async def report(self, step: int, figures: dict) -> None:
        """The learners' figures of step `step` (losses, times), kept for `figures_since`."""
        self._figures[step] = dict(figures)

    async def release(self) -> None:
        """Forget every held version now: the learner is about to write the next one and no follower will
        read these again (policy lag 0). Until that publish, `latest` waits."""
        self._refs.clear()

    async def latest(self) -> tuple[int, list[weightsync.Packed]]:
        """(newest version, [student Packed, critic Packed]); their bucket refs come back unresolved.
        After a `release`, waits for the next publish."""
        if self._version < 0:
            raise RuntimeError("no weights published yet")
        async with self._cond():
            await self._cond().wait_for(lambda: self._version in self._refs)
        return self._version, list(self._refs[self._version])

    async def latest_after(self, stale: list) -> tuple[int, list[weightsync.Packed]]:
        """`latest()` once its refs are not `stale` any more: a follower whose `ray.get` found the objects
        lost (their publisher, a learner, died) waits here for the restarted learners' republish."""
        async with self._cond():
            await self._cond().wait_for(lambda: self._refs.get(self._version, stale) != list(stale))
        return self._version, list(self._refs[self._version])

    async def version(self) -> int:
        return self._version

    async def wait_for(self, min_version: int) -> int:
        """Return the newest version once it is >= `min_version`."""
        async with self._cond():
            await self._cond().wait_for(lambda: self._version >= min_version)
        return self._version

    async def figures_since(self, step: int) -> dict[int, dict]:
        """The learners' figures of every step >= `step` published so far (older ones are forgotten)."""
        for old in [s for s in self._figures if s < step]:
            del self._figures[old]
        return {s: f for s, f in sorted(self._figures.items())}

    async def finish(self, student_ema_state: dict, critic_state: dict) -> None:
        """The stage's result (student EMA and critic), read by the driver with `result()`."""
        self._result = [ray.put(student_ema_state), ray.put(critic_state)]

    async def result(self) -> list[ray.ObjectRef] | None:
        return self._result

    async def stats(self) -> dict:
        """Newest and held versions, the last publish's seconds in the store (packing and `ray.put` when it
        was given state dicts, else ~0) and bytes (student + critic tensors), their total, and when each version was published (wall clock)."""
        return {"version": self._version, "held_versions": sorted(self._refs), "put_seconds": self._put_seconds,
                "bytes_per_version": self._bytes_per_version, "put_seconds_total": self._put_seconds_total,
                "publishes": len(self._published_at), "published_at": dict(self._published_at)}
