"""Weight-sync seconds at a real size on a GPU machine (run by cluster/gpu_check.sh; UNRUN so far: the
project has had no GPU). Prints progress, then one JSON object on its last line.

* `object_store`: learner side on cuda:0 (student + critic packed on the GPU, one device-to-host copy per
  bucket, each bucket `ray.put`), the WeightStore, and a follower actor with both networks on a GPU
  (`WeightFollower.pull`: zero-copy get, copied into the GPU weights); one GPU is enough.
* `nccl` (two GPUs or more): a publisher actor on one GPU broadcasts the same buckets to a follower actor
  on another (`weightsync.NcclBroadcast`), streamed one bucket at a time.

Each: one warm-up, then `--repeats` timed syncs; medians; bit-exactness checked on the last one.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import torch

from pipeline.bench_weight_sync import DTYPES, digest, meta_networks


def gpu_state(net: torch.nn.Module, device: str) -> dict:
    out = {}
    for k, v in net.state_dict().items():
        t = torch.empty(v.shape, dtype=v.dtype, device=device)
        t.reshape(-1).view(torch.uint8).random_(0, 256)
        out[k] = t
    return out


class GpuFollower:
    """Student (slot 0) and critic (slot 1) on this actor's GPU, each kept by the real `WeightFollower`."""

    def __init__(self, store, size, dtype: str):
        from actors.rollout import WeightFollower

        self.roles = []
        for slot, net in enumerate(meta_networks(size, DTYPES[dtype])):
            role = WeightFollower()
            role.store = store
            role._follow(net.to_empty(device="cuda"), slot, reports_restart=False)
            self.roles.append(role)

    def pull(self) -> float:
        t0 = time.perf_counter()
        for role in self.roles:
            role.pull()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def join(self, host: str, port: int, rank: int, world: int) -> None:
        from pipeline.weightsync import NcclBroadcast

        self.group = NcclBroadcast(host, port, rank, world, "cuda")

    def receive(self, layouts: list) -> float:
        t0 = time.perf_counter()
        self.group.recv(layouts, [r._followed.state_dict(keep_vars=True) for r in self.roles])
        return time.perf_counter() - t0

    def digests(self) -> list:
        return [digest({k: v.cpu() for k, v in r._followed.state_dict().items()}) for r in self.roles]


class Publisher:
    def __init__(self, size, dtype: str):
        self.states = [gpu_state(n, "cuda") for n in meta_networks(size, DTYPES[dtype])]

    def open(self, host: str, port: int, world: int) -> None:
        from pipeline.weightsync import NcclBroadcast

        self.group = NcclBroadcast(host, port, 0, world, "cuda")

    def layouts(self) -> list:
        from pipeline.weightsync import Packed, plan

        return [Packed(*plan(s)) for s in self.states]

    def send(self) -> float:
        from pipeline.weightsync import pack

        t0 = time.perf_counter()
        for s in self.states:
            pack(s, to_numpy=False, sink=self.group.send)
        return time.perf_counter() - t0

    def digests(self) -> list:
        return [digest({k: v.cpu() for k, v in s.items()}) for s in self.states]


def object_store_path(ray, args) -> dict:
    from actors.weights import WeightStore
    from pipeline.weightsync import nbytes_of, pack

    states = [gpu_state(n, "cuda:0") for n in meta_networks(args.size, DTYPES[args.dtype])]
    store = ray.remote(WeightStore).remote()
    # the driver's GPU use is outside Ray's accounting, so with one GPU the follower shares it
    follower = ray.remote(GpuFollower).options(num_gpus=1).remote(store, args.size, args.dtype)
    times = []
    for version in range(args.repeats + 1):
        t0 = time.perf_counter()
        packed = [pack(s, sink=ray.put) for s in states]
        ray.get(store.publish.remote(version, *packed))
        load_s = ray.get(follower.pull.remote())
        times.append((time.perf_counter() - t0, load_s))
    exact = ray.get(follower.digests.remote()) == [digest({k: v.cpu() for k, v in s.items()}) for s in states]
    return {"bytes": sum(nbytes_of(s) for s in states), "sync_s": statistics.median(t for t, _ in times[1:]),
            "load_s": statistics.median(x for _, x in times[1:]), "bit_exact": exact}


def nccl_path(ray, args) -> dict:
    publisher = ray.remote(Publisher).options(num_gpus=1).remote(args.size, args.dtype)
    follower = ray.remote(GpuFollower).options(num_gpus=1).remote(None, args.size, args.dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.get([publisher.open.remote("127.0.0.1", port, 2), follower.join.remote("127.0.0.1", port, 1, 2)])
    layouts = ray.get(publisher.layouts.remote())
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        ray.get([publisher.send.remote(), follower.receive.remote(layouts)])
        times.append(time.perf_counter() - t0)
    exact = ray.get(follower.digests.remote()) == ray.get(publisher.digests.remote())
    return {"sync_s": statistics.median(times[1:]), "bit_exact": exact}


def main() -> None:
    import ray

    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check")
    p.add_argument("--size", default="wan2.1-1.3b")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this check is for a GPU machine")
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        out = {"model_size": args.size, "dtype": args.dtype, "gpus": torch.cuda.device_count(),
               "gpu": torch.cuda.get_device_name(0), "object_store": object_store_path(ray, args)}
        print(f"[gpu_check] object store: {out['object_store']}", flush=True)
        if torch.cuda.device_count() >= 2:
            out["nccl"] = nccl_path(ray, args)
            print(f"[gpu_check] nccl: {out['nccl']}", flush=True)
    finally:
        ray.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
