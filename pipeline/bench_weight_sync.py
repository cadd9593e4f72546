"""`python -m pipeline.bench weight_sync [--size wan2.1-1.3b] [--repeats R]`: one weight sync at a real size.

What the on-policy stage does after every learner step, on this machine's object store, with random
weights of `--size` (a `model.size` preset) in `--dtype` (bf16: the pipeline's dtype on GPUs):

    learner (this process)                      WeightStore actor            follower actor
    pack(student), pack(critic), each bucket  --publish(v, index+refs)-->   holds v, drops v-1
      ray.put as soon as it is full                                        <--latest()-- pull():
                                                                           ray.get(buckets) (zero copy),
                                                                           the views become its weights

The calls are the pipeline's own: `weightsync.pack(state, sink=ray.put)` and `WeightStore.publish` as
learner rank 0 makes them (`learners.onpolicy.OnPolicyLearner.publish`), and `WeightFollower.pull` in
an actor that follows the student and the critic like a colocated rollout+scorer actor. The follower's
networks are the diffusers classes built on the meta device (no weights of their own: the first
version's views become them); the source states are random bits (a sync does not look at values),
made straight from the architecture's shapes.

First, before Ray holds a byte, one plain torch copy of the same tensors in this process per repeat
(`clone`, the reference the issue sets, each freed before the next) and a copy into warm memory
(`copy_into`). Then per repeat (after one untimed warm-up sync): publish seconds (pack + put + the
store's call), load seconds (inside the actor), end to end (publish + the actor's pull as the driver
sees it); medians over the repeats. `--lag 0` (the default run's policy lag) measures the path
that holds one version: the follower lets go after its task and the learner releases the store's
version before writing the next; `--lag 1` the double-buffered one. Memory: the proportional set size
(PSS: shared pages split among the processes that map them, so the object store's shared memory
counts once) summed over this process and all its descendants (Ray's raylet with its object store,
GCS, workers, the actors), polled every 50 ms, peak while syncs run. LoRA: the same for the
adapters only (ranks `--lora-ranks`) on the same base networks. At sizes under 512 MB the path
before issue 16 (state dicts pickled into the store, the store's own `ray.put`, `ray.get` and
`load_state_dict` in the actor) runs interleaved with the new one, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import torch

FIGURES = {
    "bytes": "tensor bytes per sync (student + critic)",
    "sync_s": "end-to-end seconds of a sync: publish (pack + put + store) and the follower's load (median)",
    "copy_s": "seconds of one torch clone of the same tensors in one process (median); ratio = sync_s / copy_s",
    "peak_rss_bytes": "peak PSS of the whole process tree during syncs (peak_over_bytes: that / bytes)",
    "lora_sync_s": "end-to-end seconds of an adapter-only sync per LoRA rank (lora_bytes: its bytes)",
    "legacy_sync_s": "the path before issue 16 at sizes < 512 MB, interleaved (legacy_over_new: its ratio)",
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
LEGACY_MAX_BYTES = 512 * 2**20
POLL_S = 0.05


def _say(text: str) -> None:
    print(f"[weight_sync] {text}", flush=True)


def _median(xs):
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- the networks


def meta_networks(size: str | dict, dtype: torch.dtype, lora_rank: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, critic) of `size` on the meta device in `dtype`: the AnyFlow student and the Wan critic;
    with `lora_rank`, the pipeline's default LoRA targets added to both, the adapters on the CPU (empty)."""
    from accelerate import init_empty_weights
    from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

    from diffusers.utils import logging as diffusers_logging

    from pipeline.flowmap import models

    diffusers_logging.set_verbosity_error()  # not its advice on keeping norms in float32: every tensor is synced
    arch = models.arch_config(size)
    with init_empty_weights():
        nets = (AnyFlowTransformer3DModel(**models.student_arch(arch)), WanTransformer3DModel(**arch))
    nets = tuple(n.to(dtype).eval().requires_grad_(False) for n in nets)
    return nets if lora_rank == 0 else tuple(_with_adapters(n, lora_rank, dtype) for n in nets)


def _with_adapters(net: torch.nn.Module, rank: int, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig

    from pipeline.flowmap import lora
    from pipeline.weightsync import _replace

    layers = lora.target_layers(net, lora.DEFAULT_TARGETS)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=layers, lora_dropout=0.0, bias="none"),
                    adapter_name=lora.ADAPTER)
    for name, p in lora.adapter_parameters(net).items():
        _replace(net, name, torch.empty(p.shape, dtype=dtype))
    return net


def synced_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a version carries of `net` (its adapters if it has any, else its state) as random bits."""
    from pipeline.flowmap import lora

    source = lora.adapter_parameters(net) if lora.has_adapters(net) else net.state_dict()
    return {k: _random_bits(v.shape, v.dtype) for k, v in source.items()}


def _random_bits(shape, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.reshape(-1).view(torch.uint8).random_(0, 256)
    return t


def digest(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per tensor: the sum of its bytes and its first and last 16 bytes (a cheap bit-exactness check)."""
    out = {}
    for k, v in state.items():
        b = v.detach().reshape(-1).view(torch.uint8)
        out[k] = [int(b.sum(dtype=torch.int64)), *b[:16].tolist(), *b[-16:].tolist()]
    return out


class SyncFollower:
    """The bench's follower actor: the student and the critic of `size`, each kept at the WeightStore's
    newest version by the pipeline's `WeightFollower.pull` (slots 0 and 1)."""

    def __init__(self, store, size, dtype: str, lora_rank: int = 0):
        from actors.rollout import WeightFollower

        self.roles = []
        for slot, net in enumerate(meta_networks(size, DTYPES[dtype], lora_rank)):
            role = WeightFollower()
            role.store = store
            role._follow(net, slot, reports_restart=False)
            self.roles.append(role)

    def pull(self) -> dict:
        t0 = time.perf_counter()
        for role in self.roles:
            role.pull()
        return {"load_s": time.perf_counter() - t0, "versions": [r.version for r in self.roles]}

    def release(self) -> None:
        """What a follower does after its task at policy lag 0: let go of the version's shared memory."""
        for role in self.roles:
            role.release()

    def digests(self) -> list[dict]:
        from pipeline.flowmap import lora

        return [digest(lora.adapter_parameters(r._followed) if r._adapters_only else r._followed.state_dict())
                for r in self.roles]


class LegacyStore:
    """The WeightStore's publish and latest as they were before issue 16: state dicts arrive pickled as
    call arguments and the store `ray.put()`s them itself."""

    def __init__(self):
        self.refs = None

    def publish(self, version: int, student: dict, critic: dict) -> None:
        import ray

        self.refs = (version, [ray.put(student), ray.put(critic)])

    def latest(self):
        return self.refs


class LegacyFollower:
    """`ray.get` of the pickled state dicts and `load_state_dict` into real (CPU) networks, as before."""

    def __init__(self, store, size, dtype: str):
        self.store = store
        self.nets = [n.to_empty(device="cpu") for n in meta_networks(size, DTYPES[dtype])]

    def pull(self) -> dict:
        import ray

        t0 = time.perf_counter()
        _, refs = ray.get(self.store.latest.remote())
        for net, ref in zip(self.nets, refs):
            net.load_state_dict(ray.get(ref))
        return {"load_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- memory


class TreeMemoryPoller(threading.Thread):
    """Peak PSS summed over this process and every descendant, sampled every `interval_s` while `active`."""

    def __init__(self, interval_s: float = POLL_S):
        super().__init__(name="weight-sync-memory", daemon=True)
        self.interval_s, self.active, self.peak, self.samples = interval_s, False, 0, 0
        self._halt = threading.Event()

    @staticmethod
    def tree_pss() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    def sample(self) -> None:
        self.peak = max(self.peak, self.tree_pss())
        self.samples += 1

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            if self.active:
                self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# ----------------------------------------------------------------------------- the runs


def copy_figures(states: list[dict]) -> dict:
    """Seconds of one torch clone of every tensor, and of a copy of each into one warm scratch buffer."""
    t0 = time.perf_counter()
    clones = [{k: v.clone() for k, v in s.items()} for s in states]
    clone_s = time.perf_counter() - t0
    del clones
    largest = max(v.numel() * v.element_size() for s in states for v in s.values())
    scratch = torch.empty(largest, dtype=torch.uint8)
    scratch.fill_(0)  # warm: its pages are mapped before the timing
    t0 = time.perf_counter()
    for s in states:
        for v in s.values():
            b = v.reshape(-1).view(torch.uint8)
            scratch[:b.numel()].copy_(b)
    return {"copy_s": clone_s, "copy_into_s": time.perf_counter() - t0}


def sync_once(ray, store, follower, version: int, states: list[dict], lag: int = 0, scratch=None) -> dict:
    """One sync through the pipeline's path; its publish, load and end-to-end seconds. At policy lag 0
    (the default run's) the follower has let go after its task and learner rank 0 releases the store's
    version before writing the next (`OnPolicyLearner.publish`), so only one version is ever held; at
    lag >= 1 the old version stays in use while the new one is written (two held)."""
    from pipeline import weightsync

    if lag == 0:
        ray.get(follower.release.remote())  # the end of the follower's previous task, not timed
    t0 = time.perf_counter()
    if lag == 0:
        ray.get(store.release.remote())
    # 1. learner rank 0: pack each network, each bucket put as soon as it is full; hand the store the index
    packed = [weightsync.pack(s, sink=ray.put, scratch=scratch) for s in states]
    t_put = time.perf_counter()
    ray.get(store.publish.remote(version, *packed))
    del packed
    t1 = time.perf_counter()
    # 2. the follower pulls the newest version (zero-copy get; the views become its weights)
    loaded = ray.get(follower.pull.remote())
    t2 = time.perf_counter()
    if loaded["versions"] != [version, version]:
        raise RuntimeError(f"the follower loaded {loaded['versions']}, expected version {version}")
    return {"pack_put_s": t_put - t0, "publish_s": t1 - t0, "load_s": loaded["load_s"], "sync_s": t2 - t0,
            "pull_call_s": t2 - t1}


def legacy_sync_once(ray, store, follower, version: int, states: list[dict]) -> float:
    t0 = time.perf_counter()
    ray.get(store.publish.remote(version, *states))
    ray.get(follower.pull.remote())
    return time.perf_counter() - t0


def run_full(ray, args, poller: TreeMemoryPoller, states: list[dict], copies: list[dict]) -> dict:
    """The timed syncs of `states` (the plain-copy figures `copies` were measured before Ray held anything,
    so no clone sits beside the store's versions)."""
    from actors.weights import WeightStore
    from pipeline import weightsync

    nbytes = sum(weightsync.nbytes_of(s) for s in states)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    follower = ray.remote(SyncFollower).options(num_cpus=1).remote(store, args.size, args.dtype)
    scratch = weightsync.scratch_bucket()  # learner rank 0's reusable bucket
    legacy = nbytes < LEGACY_MAX_BYTES
    if legacy:
        old_store = ray.remote(LegacyStore).options(num_cpus=0).remote()
        old_follower = ray.remote(LegacyFollower).options(num_cpus=1).remote(old_store, args.size, args.dtype)
        legacy_sync_once(ray, old_store, old_follower, 0, states)
    sync_once(ray, store, follower, 0, states, args.lag, scratch)  # warm-up: the first version fills the meta networks
    baseline = TreeMemoryPoller.tree_pss()
    runs, legacy_s = [], []
    for r in range(1, args.repeats + 1):
        poller.active = True
        runs.append(sync_once(ray, store, follower, r, states, args.lag, scratch))
        poller.active = False
        poller.sample()  # at least one sample per sync, however short (the new version is still held)
        if legacy:
            legacy_s.append(legacy_sync_once(ray, old_store, old_follower, r, states))
        _say(f"repeat {r}/{args.repeats}: sync {runs[-1]['sync_s']:.3f} s (publish {runs[-1]['publish_s']:.3f}, "
             f"load {runs[-1]['load_s']:.3f}), peak so far {poller.peak / nbytes:.2f}x the bytes"
             + (f", before issue 16 {legacy_s[-1]:.3f} s" if legacy else ""))
    exact = ray.get(follower.digests.remote()) == [digest(s) for s in states]
    if not exact:
        raise RuntimeError("the follower's weights differ from the published ones")
    packed = weightsync.plan(states[0])[1], weightsync.plan(states[1])[1]
    med = {k: _median([x[k] for x in runs]) for k in runs[0]}
    copy_s, copy_into_s = _median([c["copy_s"] for c in copies]), _median([c["copy_into_s"] for c in copies])
    out = {"bytes": nbytes, "tensors": sum(len(s) for s in states), "buckets": sum(len(b) for b in packed),
           **med, "sync_values": [x["sync_s"] for x in runs], "copy_s": copy_s, "copy_values": [c["copy_s"] for c in copies],
           "copy_into_s": copy_into_s, "ratio": med["sync_s"] / copy_s, "ratio_copy_into": med["sync_s"] / copy_into_s,
           "bit_exact": exact, "baseline_rss_bytes": baseline}
    if legacy:
        out.update(legacy_sync_s=_median(legacy_s), legacy_values=legacy_s,
                   legacy_over_new=_median(legacy_s) / med["sync_s"])
        ray.kill(old_follower)
        ray.kill(old_store)
    for actor in (follower, store):
        ray.kill(actor)
    return out


def run_lora(ray, args, rank: int) -> dict:
    from actors.weights import WeightStore
    from pipeline import weightsync

    states = [synced_state(n) for n in meta_networks(args.size, DTYPES[args.dtype], rank)]
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    follower = ray.remote(SyncFollower).options(num_cpus=1).remote(store, args.size, args.dtype, rank)
    scratch = weightsync.scratch_bucket()
    sync_once(ray, store, follower, 0, states, args.lag, scratch)
    runs = [sync_once(ray, store, follower, r, states, args.lag, scratch) for r in range(1, args.repeats + 1)]
    if ray.get(follower.digests.remote()) != [digest(s) for s in states]:
        raise RuntimeError(f"LoRA rank {rank}: the follower's adapters differ from the published ones")
    for actor in (follower, store):
        ray.kill(actor)
    out = {"bytes": sum(weightsync.nbytes_of(s) for s in states), "sync_s": _median([x["sync_s"] for x in runs]),
           "publish_s": _median([x["publish_s"] for x in runs]), "load_s": _median([x["load_s"] for x in runs])}
    _say(f"LoRA rank {rank}: {out['bytes'] / 2**20:.0f} MiB, sync {out['sync_s']:.3f} s")
    return out


def needed_memory(size, dtype: torch.dtype, lag: int = 0) -> tuple[int, int]:
    """(bytes per sync, object-store bytes the bench sets: the versions held at once (one at policy lag 0,
    two at lag >= 1: the one a follower still uses and the new one), plus two buckets and 256 MiB of slack)."""
    from pipeline.weightsync import BUCKET_BYTES

    nbytes = 0
    for net in meta_networks(size, dtype):
        nbytes += sum(v.numel() * v.element_size() for v in net.state_dict().values())
    return nbytes, (1 if lag == 0 else 2) * nbytes + 2 * BUCKET_BYTES + 256 * 2**20


def _start_ray(ray, store_bytes: int, tries: int = 3) -> None:
    """A local Ray of 2 CPUs with an object store of `store_bytes`; on a loaded machine its start can time
    out (the raylet waits 30 s for its agents), so it is tried again."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False, log_to_driver=False, object_store_memory=store_bytes)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            if attempt == tries or "timed out during startup" not in str(e):
                raise
            _say(f"Ray did not start ({e}); trying again ({attempt}/{tries})")
            ray.shutdown()


def bench(args: argparse.Namespace) -> dict:
    import psutil
    import ray

    from pipeline import weightsync

    nbytes, store_bytes = needed_memory(args.size, DTYPES[args.dtype], args.lag)
    # the source states, the store's versions, the follower's none of its own; 1.5 GiB for the processes
    need = nbytes + store_bytes + int(1.5 * 2**30)
    if psutil.virtual_memory().available < need and not args.force:
        raise SystemExit(f"error: --size {args.size} needs about {need / 2**30:.1f} GiB available, the machine has "
                         f"{psutil.virtual_memory().available / 2**30:.1f} GiB (wait, pick a smaller --size, or --force)")
    states = [synced_state(n) for n in meta_networks(args.size, DTYPES[args.dtype])]
    _say(f"{args.size}: {sum(len(s) for s in states)} tensors, "
         f"{sum(weightsync.nbytes_of(s) for s in states) / 2**30:.2f} GiB per sync in {args.dtype}")
    # the plain copy first, each clone freed before the next and before Ray holds a byte
    copies = []
    for r in range(1, args.repeats + 1):
        copies.append(copy_figures(states))
        _say(f"copy {r}/{args.repeats}: clone {copies[-1]['copy_s']:.3f} s, into warm memory "
             f"{copies[-1]['copy_into_s']:.3f} s")
    _say(f"starting Ray with a {store_bytes / 2**30:.2f} GiB object store (policy lag {args.lag}: "
         f"{'one version' if args.lag == 0 else 'two versions'} held at once)")
    _start_ray(ray, store_bytes)
    poller = TreeMemoryPoller()
    poller.start()
    try:
        full = run_full(ray, args, poller, states, copies)
        del states
        lora = {rank: run_lora(ray, args, rank) for rank in args.lora_ranks}
    finally:
        poller.stop()
        ray.shutdown()
    return {"bench": "weight_sync", "model_size": args.size if isinstance(args.size, str) else json.dumps(args.size),
            "dtype": args.dtype, "repeats": args.repeats, "policy_lag": args.lag, **full,
            "peak_rss_bytes": poller.peak, "peak_over_bytes": poller.peak / full["bytes"],
            "peak_rss_method": f"sum of PSS over this process and all descendants, every {POLL_S} s during syncs and once after each "
                               f"({poller.samples} samples)",
            "object_store_memory_bytes": store_bytes, "torch_threads": torch.get_num_threads(),
            "lora_bytes": {str(r): f["bytes"] for r, f in lora.items()},
            "lora_sync_s": {str(r): f["sync_s"] for r, f in lora.items()},
            "lora_publish_s": {str(r): f["publish_s"] for r, f in lora.items()},
            "lora_load_s": {str(r): f["load_s"] for r, f in lora.items()}}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _size(text: str) -> str | dict:
    """A `model.size` preset name, or a JSON object of architecture overrides on `tiny` (a custom size)."""
    from pipeline.flowmap.models import SIZE_PRESETS

    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--size {text!r}: not a JSON object ({e})") from None
    if text not in SIZE_PRESETS:
        raise argparse.ArgumentTypeError(f"--size {text!r}: choose from {', '.join(SIZE_PRESETS)} or a JSON object")
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m pipeline.bench weight_sync", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=__doc__.split("\n\n")[1],
                epilog="figures:\n" + "\n".join(f"  {k}: {v}" for k, v in FIGURES.items()))
    p.add_argument("--size", type=_size, default="wan2.1-1.3b", help="model.size preset (default wan2.1-1.3b)")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs (default 3); figures are medians")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weights' dtype (default bfloat16)")
    p.add_argument("--lora-ranks", default="64,256", help="LoRA ranks of the adapter-only syncs (comma list; '' none)")
    p.add_argument("--lag", type=int, default=0, choices=[0, 1],
                   help="policy lag of the path measured: 0 (the default run's; one version held) or 1 (two held)")
    p.add_argument("--force", action="store_true", help="run even if the machine seems short of memory")
    args = p.parse_args(argv)
    try:
        args.lora_ranks = [int(r) for r in args.lora_ranks.split(",") if r.strip()]
    except ValueError:
        p.error(f"--lora-ranks {args.lora_ranks!r}: a comma list of positive integers")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: need at least 1")
    if any(r < 1 for r in args.lora_ranks):
        p.error(f"--lora-ranks {args.lora_ranks}: every rank must be >= 1")
    return args


def main(argv: list[str]) -> int:
    figures = bench(parse_args(argv))
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0
