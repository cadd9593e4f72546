"""Hub: what the driver and the learner group of one training session hand each other.

One Ray Train worker group trains every stage of a run in turn (teacher, stage 1, stage 2,
consistency), so its start-up is paid once. The Hub is the meeting point:

* networks by name (`put_net` / `net`): the driver puts the ones it loaded from disk, learner
  rank 0 puts each stage's result; a stage's learners wait for the networks they start from;
* the stage's figures (`report` / `figures_since`), logged by the driver;
* the stage's result (`finish` / `result`), saved by the driver as the stage's folder;
* on-policy stages: the driver opens the stage with its WeightStore and ReplayBuffer
  (`open_stage`), the learners wait for them (`stage_handles`) and say which step they start
  from (`begin`): 0, or the step of the checkpoint they resumed from. A learner group that
  Ray Train restarted after a failure calls `begin` again; the driver sees the new
  `generation` and rewinds its rollouts to that step.
* counters (`count` / `counters`): e.g. rollout or scorer actors restarted after a fault.

The Hub `ray.put()`s every state dict it is given, so it owns the copies (a learner that dies
cannot take them with it). A plain class; `ray.remote` is applied where it is launched.
"""

from __future__ import annotations

import asyncio

import ray


class Hub:
    def __init__(self):
        self._nets: dict[str, ray.ObjectRef] = {}
        self._figures: dict[str, dict[int, dict]] = {}
        self._results: dict[str, dict[str, ray.ObjectRef]] = {}
        self._handles: dict[str, tuple] = {}
        self._begun: dict[str, tuple[int, int]] = {}
        self._counters: dict[str, float] = {}
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop, on first use
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._cond():
            self._cond().notify_all()

    async def put_net(self, name: str, state: dict | list) -> None:
        """Hold network `name`'s state dict (or `[ref]` to one already in the object store)."""
        self._nets[name] = state[0] if isinstance(state, list) else ray.put(state)
        await self._notify()

    async def net(self, name: str) -> list[ray.ObjectRef]:
        """`[ref]` to network `name`'s state dict, once someone has put it."""
        async with self._cond():
            await self._cond().wait_for(lambda: name in self._nets)
        return [self._nets[name]]

    async def report(self, stage: str, step: int, figures: dict) -> None:
        self._figures.setdefault(stage, {})[step] = dict(figures)

    async def figures_since(self, stage: str, step: int) -> dict[int, dict]:
        """The figures of `stage`'s steps >= `step` reported so far (older ones are forgotten)."""
        held = self._figures.get(stage, {})
        for old in [s for s in held if s < step]:
            del held[old]
        return dict(sorted(held.items()))

    async def finish(self, stage: str, states: dict[str, dict]) -> None:
        """The stage's result: network name -> state dict; each also becomes a held network."""
        refs = {name: ray.put(state) for name, state in states.items()}
        self._results[stage] = refs
        self._nets.update(refs)
        await self._notify()

    async def result(self, stage: str) -> dict[str, list[ray.ObjectRef]] | None:
        refs = self._results.get(stage)
        return None if refs is None else {name: [ref] for name, ref in refs.items()}

    async def open_stage(self, stage: str, store, buffer) -> None:
        self._handles[stage] = (store, buffer)
        await self._notify()

    async def stage_handles(self, stage: str) -> tuple:
        """(WeightStore, ReplayBuffer) of an on-policy stage, once the driver has opened it."""
        async with self._cond():
            await self._cond().wait_for(lambda: stage in self._handles)
        return self._handles[stage]

    async def begin(self, stage: str, start_step: int) -> int:
        """The learners start (or, after a restart, restart) `stage` at `start_step`; returns the generation."""
        generation = self._begun.get(stage, (-1, -1))[1] + 1
        self._begun[stage] = (start_step, generation)
        await self._notify()
        return generation

    async def begun(self, stage: str) -> tuple[int, int] | None:
        """(start step, generation) of the learners' latest `begin` of `stage`, or None."""
        return self._begun.get(stage)

    async def count(self, name: str, n: float = 1.0) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + n

    async def counters(self) -> dict[str, float]:
        return dict(self._counters)
