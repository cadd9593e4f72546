"""Weight sync buckets: a state dict flattened into a few large byte buffers and a small index.

    pack(state)   -> Packed(index, buckets)   one copy of the bytes (on the tensors' device, then one
                                              device-to-host copy per bucket for a GPU state);
    pack(state, sink=ray.put)                 each bucket put as soon as it is full: Packed(index, refs)
    unpack(p)     -> {name: tensor view}      no copy: each tensor is a view into its bucket
    load_into(model, p)                       copy_ into the model, or (CPU, same dtype and shape) make
                                              the views its parameters (no copy at all)

A bucket is a flat `uint8` numpy array (tensors of one dtype, laid out one after another at
64-byte aligned offsets); the index says, per tensor, (name, dtype, shape, bucket, offset). The
bytes are carried raw, so every dtype (bf16 too, which numpy lacks) arrives bit-exact. Ray
serialises numpy arrays out of band: `ray.put(bucket)` writes a bucket once into the object
store without pickling a tensor (one object per bucket, a few per state), and `ray.get` in another process returns the buckets as
read-only views of the shared memory (zero copy). The same buckets travel by NCCL broadcast
between GPUs (`NcclBroadcast`), one collective per bucket.

Pure torch + numpy: no Ray import (the Ray roles call these; `pipeline/flowmap` stays apart).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

ALIGN = 64
"""byte alignment of every tensor inside a bucket (a cache line; any dtype's view is aligned)"""
BUCKET_BYTES = 512 * 2**20
"""a bucket is closed once it holds this many bytes (one tensor larger than this gets a bucket of its
own): a few large buffers per dtype at the 1.3B shape, and a bounded temporary on a GPU broadcast"""


@dataclass
class Entry:
    name: str
    dtype: str
    """the torch dtype's name without `torch.`, e.g. `bfloat16`"""
    shape: tuple[int, ...]
    bucket: int
    offset: int
    """byte offset inside the bucket"""
    nbytes: int


@dataclass
class Packed:
    """A state dict as byte buckets plus the index that finds each tensor in them."""

    index: list[Entry]
    buckets: list = field(default_factory=list)
    """flat uint8 numpy arrays (CPU), uint8 torch tensors on a GPU before they are sent, or the
    object refs of numpy buckets put in Ray's object store (one object per bucket)"""

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors themselves (without the alignment padding)."""
        return sum(e.nbytes for e in self.index)

    def with_buckets(self, buckets: list) -> Packed:
        """The same index over other buckets (e.g. the arrays `ray.get` returns for the refs held here)."""
        if len(buckets) != len(self.buckets):
            raise ValueError(f"{len(buckets)} buckets for an index of {len(self.buckets)}")
        return Packed(self.index, list(buckets))

    def layout(self) -> Packed:
        """The index and the bucket sizes only (what a broadcast receiver needs to allocate)."""
        return Packed(self.index, [int(b.numel()) if torch.is_tensor(b) else int(len(b)) for b in self.buckets])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a packed state")
    return dtype


def plan(state: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> tuple[list[Entry], list[int]]:
    """The index of `state` in buckets (one run of buckets per dtype, in order of first appearance; the
    index itself in the state's order) and each bucket's size in bytes."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in state.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    index, sizes = [], []
    for dtype, names in by_dtype.items():
        sizes.append(0)
        for name in names:
            t = state[name]
            nbytes = t.numel() * t.element_size()
            if sizes[-1] and sizes[-1] + nbytes > bucket_bytes:
                sizes.append(0)
            index.append(Entry(name, str(dtype).removeprefix("torch."), tuple(t.shape), len(sizes) - 1, sizes[-1],
                               nbytes))
            sizes[-1] += -(-nbytes // ALIGN) * ALIGN
    order = {name: i for i, name in enumerate(state)}
    return sorted(index, key=lambda e: order[e.name]), sizes


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (a contiguous copy first if it is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@torch.no_grad()
def pack(state: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES, to_numpy: bool = True,
         sink: Callable | None = None, scratch: np.ndarray | None = None) -> Packed:
    """`state` as byte buckets: one copy of every tensor into its bucket, made on the tensors' device;
    with `to_numpy` each bucket ends as a CPU numpy array (one device-to-host copy per bucket from a
    GPU), else as a uint8 tensor on that device (what a broadcast sends). Buckets are filled one at a
    time and each is handed to `sink` as soon as it is full (e.g. `ray.put`: the Packed then holds the
    refs, and at most one bucket of extra memory exists at once).

    `scratch` (a flat uint8 numpy array, e.g. `scratch_bucket()` kept by the caller across syncs): the
    CPU buckets are written into it instead of fresh memory, so every sync after the first writes into
    pages that are already mapped (a fresh 5 GiB of buckets costs more in page faults than in copying
    on a VM). Only with a `sink` that copies what it is given before returning (`ray.put` does): the
    next bucket overwrites it. A bucket larger than `scratch` gets fresh memory."""
    if not state:
        return Packed([], [])
    if scratch is not None and (sink is None or not to_numpy):
        raise ValueError("pack: scratch needs a sink that copies the bucket (e.g. ray.put) and to_numpy")
    device = next(iter(state.values())).device
    if any(t.device != device for t in state.values()):
        raise ValueError(f"pack: every tensor must be on one device, got {sorted({str(t.device) for t in state.values()})}")
    index, sizes = plan(state, bucket_bytes)
    entries: list[list[Entry]] = [[] for _ in sizes]
    for e in index:
        entries[e.bucket].append(e)
    buckets = []
    for size, members in zip(sizes, entries):
        host = None
        if to_numpy:  # numpy-owned memory: Ray serialises it out of band
            host = scratch[:size] if scratch is not None and size <= len(scratch) else np.empty(size, dtype=np.uint8)
        flat = torch.from_numpy(host) if host is not None and device.type == "cpu" else \
            torch.empty(size, dtype=torch.uint8, device=device)
        for e in members:
            flat[e.offset:e.offset + e.nbytes].copy_(_bytes_of(state[e.name]))
        if host is not None and device.type != "cpu":
            torch.from_numpy(host).copy_(flat)  # one device-to-host copy per bucket
        bucket = host if to_numpy else flat
        buckets.append(bucket if sink is None else sink(bucket))
        del bucket, flat, host
    return Packed(index, buckets)


def scratch_bucket(bucket_bytes: int = BUCKET_BYTES) -> np.ndarray:
    """A reusable bucket for `pack(..., scratch=)`: one bucket of memory held across syncs."""
    return np.empty(bucket_bytes, dtype=np.uint8)


def unpack(packed: Packed, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor}: views into the buckets (no copy); read-only when the buckets are (e.g. straight
    from `ray.get`), so load them with `load_into` or copy them before writing."""
    flats = []
    for b in packed.buckets:
        if isinstance(b, np.ndarray):
            with warnings.catch_warnings():  # read-only shared memory: the views are never written
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                b = torch.from_numpy(b)
        flats.append(b if device is None else b.to(device))
    return {e.name: flats[e.bucket][e.offset:e.offset + e.nbytes].view(_dtype(e.dtype)).view(e.shape)
            for e in packed.index}


def transport_for(learner_gpus: float, follower_gpus: list[float]) -> str:
    """`nccl` when the learners and every follower pool (rollout, scorer) run on GPUs, else `object_store`."""
    return "nccl" if learner_gpus > 0 and follower_gpus and all(g > 0 for g in follower_gpus) else "object_store"


def nbytes_of(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@torch.no_grad()
def load_into(model: torch.nn.Module, packed: Packed, alias: bool = True) -> list[str]:
    """Load a packed state into `model` (strict: the same keys and shapes); returns the names of the
    tensors that became views of the buckets instead of being copied (what `release` lets go of).

    With `alias`, a parameter or buffer that lives on the CPU (or on the meta device, not yet
    materialised) and has the packed tensor's dtype and shape is *replaced* by the view (no copy; it
    keeps the shared-memory object alive until the next load replaces it). Such a model must be
    read-only (a frozen follower); everything else is copied in (`copy_`, e.g. into GPU weights)."""
    views = unpack(packed)
    own = model.state_dict(keep_vars=True)
    if set(views) != set(own):
        extra, missing = sorted(set(views) - set(own)), sorted(set(own) - set(views))
        raise ValueError(f"packed state does not fit the model: unexpected {extra[:3]}, missing {missing[:3]}")
    aliased = []
    for name, view in views.items():
        target = own[name]
        if target.shape != view.shape:
            raise ValueError(f"{name}: packed shape {tuple(view.shape)}, the model's is {tuple(target.shape)}")
        if alias and target.device.type in ("cpu", "meta") and target.dtype == view.dtype:
            _replace(model, name, view)
            aliased.append(name)
        else:
            if target.device.type == "meta":
                raise ValueError(f"{name}: the model's tensor is on the meta device (no memory) and cannot be "
                                 f"aliased ({target.dtype} here, {view.dtype} packed): materialise the model first")
            target.copy_(view)
    return aliased


def release(model: torch.nn.Module, names: list[str]) -> None:
    """Let go of the bucket views `load_into` made the tensors `names` of `model` (they become meta
    tensors of the same shape and dtype, no memory), so the version's shared memory can be freed before
    the next one is written; the next `load_into` aliases the new buckets in their place."""
    own = model.state_dict(keep_vars=True)
    for name in names:
        t = own[name]
        _replace(model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _replace(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


@torch.no_grad()
def load_bucket(targets: dict[str, torch.Tensor], layout: Packed, bucket: int, flat: torch.Tensor) -> None:
    """Copy the tensors of bucket `bucket` (its bytes in `flat`, on any device) into `targets` (a model's
    `state_dict(keep_vars=True)`, or adapters): a broadcast receiver loads each bucket as it arrives."""
    for e in layout.index:
        if e.bucket == bucket:
            targets[e.name].copy_(flat[e.offset:e.offset + e.nbytes].view(_dtype(e.dtype)).view(e.shape))


class NcclBroadcast:
    """One process group over NCCL for the weight sync: rank 0 (learner rank 0) sends the buckets of
    the student and the critic, ranks 1.. (the rollout and scorer actors, one GPU each) receive every
    bucket; one broadcast per bucket, streamed (the sender packs a bucket, sends it, reuses the memory;
    a receiver loads each bucket into its network as it arrives, or drops one of a network it does
    not follow), so neither side needs more than a bucket of extra GPU memory.

    The group is its own (a `ProcessGroupNCCL` on a TCP store that rank 0 hosts at `host:port`), so it
    lives beside the learners' data-parallel group without joining it. Every member must take part in
    every broadcast, in the same order: the WeightStore hands the receivers the layouts (index and
    bucket sizes) before rank 0 sends. UNRUN on this project's CPU machines:
    tests/ray/test_weightsync_gpu.py and cluster/gpu_check.sh exercise it where GPUs are present."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device | str = "cuda",
                 timeout_s: float = 600.0):
        from datetime import timedelta

        import torch.distributed as dist

        if world_size < 2:
            raise ValueError(f"a broadcast group needs a sender and at least one receiver, got world_size={world_size}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        self.group = dist.ProcessGroupNCCL(dist.PrefixStore("weightsync", store), rank, world_size,
                                           dist.ProcessGroupNCCL.Options())
        self._store = store  # rank 0 hosts it: keep it alive as long as the group
        self._scratch = None

    def _broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([flat], opts).wait()

    def send(self, flat: torch.Tensor) -> None:
        """Rank 0: broadcast one bucket (a uint8 tensor on this GPU); use as `pack(..., to_numpy=False,
        sink=group.send)`."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 of the weight-sync group sends")
        self._broadcast(flat)
        torch.cuda.current_stream(self.device).synchronize()  # the bucket's memory may be reused next

    def recv(self, layouts: list[Packed], targets: list[dict[str, torch.Tensor] | None]) -> None:
        """Ranks 1..: receive every bucket of `layouts` (one per network, in the sender's order) and load
        network j's into `targets[j]` (None: a network this member does not follow; its bytes are dropped)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 of the weight-sync group sends, it does not receive")
        largest = max((int(n) for layout in layouts for n in layout.buckets), default=0)
        if self._scratch is None or self._scratch.numel() < largest:
            self._scratch = torch.empty(largest, dtype=torch.uint8, device=self.device)
        for layout, target in zip(layouts, targets):
            for b, size in enumerate(layout.buckets):
                flat = self._scratch[:int(size)]
                self._broadcast(flat)
                if target is not None:
                    load_bucket(target, layout, b, flat)
        torch.cuda.current_stream(self.device).synchronize()
