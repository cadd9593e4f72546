"""The weight sync on GPUs (skipped without CUDA): buckets packed on a GPU through the object store into a
follower on a GPU (one GPU), and the NCCL broadcast from a publisher to a follower (two GPUs: NCCL puts
one rank per device). Both must arrive bit-exact. UNRUN on this project's CPU machines so far."""

import socket

import pytest
import torch

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _source(seed: int, device: str) -> dict:
    from pipeline.flowmap import models

    net = models.build_teacher("toy", seed=seed).to(torch.bfloat16)
    return {k: v.to(device) for k, v in net.state_dict().items()}


def _bits(state: dict) -> dict:
    return {k: v.detach().cpu().reshape(-1).view(torch.uint8) for k, v in state.items()}


class _GpuFollower:
    """The real `WeightFollower` on a toy Wan network in bf16 on this actor's GPU (slot 1: the critic)."""

    def __init__(self, store):
        from actors.rollout import WeightFollower
        from pipeline.flowmap import models

        self.role = WeightFollower()
        self.role.store = store
        net = models.build_teacher("toy", seed=99).to(torch.bfloat16).cuda().eval().requires_grad_(False)
        self.role._follow(net, 1, reports_restart=False)

    def pull(self) -> int:
        self.role.pull()
        return self.role.version

    def join(self, host: str, port: int, rank: int, world: int) -> None:
        self.role.join_broadcast(host, port, rank, world)

    def receive(self, version: int, layouts: list) -> int:
        self.role.receive_broadcast(version, layouts)
        return self.role.version

    def bits(self) -> dict:
        return _bits(self.role._followed.state_dict())


class _Publisher:
    """Learner rank 0's side of a broadcast: the state on its GPU, packed and sent bucket by bucket."""

    def __init__(self, seed: int):
        self.state = _source(seed, "cuda")

    def open(self, host: str, port: int, world: int) -> None:
        from pipeline.weightsync import NcclBroadcast

        self.group = NcclBroadcast(host, port, 0, world, "cuda")

    def layouts(self) -> list:
        from pipeline.weightsync import Packed, plan

        return [Packed(*plan(self.state)), Packed(*plan(self.state))]  # [student, critic]: the same net twice

    def send(self) -> None:
        from pipeline.weightsync import pack

        for _ in range(2):
            pack(self.state, to_numpy=False, sink=self.group.send)

    def bits(self) -> dict:
        return _bits(self.state)


def test_a_gpu_packed_state_reaches_a_gpu_follower_through_the_object_store_bit_exact(ray_cluster):
    from actors.weights import WeightStore
    from pipeline.weightsync import pack

    ray = ray_cluster
    store = ray.remote(WeightStore).remote()
    follower = ray.remote(_GpuFollower).options(num_gpus=1).remote(store)
    state = _source(5, "cuda")
    ray.get(store.publish.remote(0, pack(state, sink=ray.put), pack(state, sink=ray.put)))
    assert ray.get(follower.pull.remote()) == 0
    got, want = ray.get(follower.bits.remote()), _bits(state)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: two GPUs")
def test_the_nccl_broadcast_delivers_the_buckets_bit_exact(ray_cluster):
    ray = ray_cluster
    publisher = ray.remote(_Publisher).options(num_gpus=1).remote(7)
    follower = ray.remote(_GpuFollower).options(num_gpus=1).remote(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.get([publisher.open.remote("127.0.0.1", port, 2), follower.join.remote("127.0.0.1", port, 1, 2)])
    layouts = ray.get(publisher.layouts.remote())
    assert ray.get([publisher.send.remote(), follower.receive.remote(3, layouts)])[1] == 3
    got, want = ray.get(follower.bits.remote()), ray.get(publisher.bits.remote())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
