"""pipeline.weightsync: byte buckets that carry every dtype bit-exact, views without copies, and loading
into a model by copy or by aliasing (no Ray here; the object-store path is tests/ray/actors/test_weights.py)."""

import numpy as np
import pytest
import torch

from pipeline.weightsync import ALIGN, Packed, load_into, pack, plan, release, unpack


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(5, generator=g),
        "b.weight": torch.randn(3, 3, generator=g).to(torch.float16),
        "b.scale": torch.tensor(2.5, dtype=torch.float64),  # zero-dimensional
        "c.index": torch.randint(-9, 9, (4, 2), generator=g),
        "c.mask": torch.rand(6, generator=g) > 0.5,
        "d.weight": torch.randn(3, 9, generator=g).to(torch.bfloat16).t(),  # not contiguous
        "d.empty": torch.zeros(0, 4),
        # bf16 payloads whose raw bits are NaN and negative zero: a float round trip would change them
        "e.bits": torch.tensor([0x7FC1, -32768, 0x0001, -1], dtype=torch.int16).view(torch.bfloat16),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_pack_then_unpack_returns_every_tensor_bit_exact_with_its_dtype_and_shape():
    state = _mixed_state()
    packed = pack(state)
    back = unpack(packed)
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t)), name
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_buckets_are_flat_byte_arrays_one_run_per_dtype_with_aligned_offsets():
    state = _mixed_state()
    packed = pack(state, bucket_bytes=64)
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1 for b in packed.buckets)
    dtypes_of = {}
    for e in packed.index:
        assert e.offset % ALIGN == 0 and e.offset + e.nbytes <= len(packed.buckets[e.bucket])
        dtypes_of.setdefault(e.bucket, set()).add(e.dtype)
    assert all(len(d) == 1 for d in dtypes_of.values())  # never two dtypes in one bucket
    # without a size cap: exactly one bucket per dtype
    assert len(pack(state).buckets) == len({t.dtype for t in state.values()})


def test_a_bucket_closes_at_the_size_cap_and_a_larger_tensor_gets_its_own():
    state = {"a": torch.zeros(100, dtype=torch.uint8), "b": torch.zeros(100, dtype=torch.uint8),
             "big": torch.zeros(1000, dtype=torch.uint8), "c": torch.zeros(10, dtype=torch.uint8)}
    index, sizes = plan(state, bucket_bytes=256)
    assert [e.bucket for e in index] == [0, 0, 1, 2]
    assert sizes == [256, 1024, 64]


def test_unpack_views_the_buckets_without_copying():
    packed = pack({"w": torch.arange(6, dtype=torch.float32)})
    view = unpack(packed)["w"]
    packed.buckets[0][:4] = np.frombuffer(np.float32(42).tobytes(), dtype=np.uint8)
    assert view[0] == 42


def test_unpack_of_read_only_buckets_gives_read_only_views_without_a_warning(recwarn):
    packed = pack(_mixed_state())
    for b in packed.buckets:
        b.setflags(write=False)  # as `ray.get` returns them
    back = unpack(packed)
    assert torch.equal(back["a.bias"], _mixed_state()["a.bias"])
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def _net(seed: int, dtype=torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).to(dtype)
    net.register_buffer("scale", torch.full((2,), float(seed)))
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("alias", [True, False])
def test_load_into_makes_the_model_compute_exactly_what_the_source_computes(alias):
    src, dst = _net(1), _net(2)
    packed = pack(src.state_dict())
    aliased = load_into(dst, packed, alias=alias)
    assert aliased == (list(src.state_dict()) if alias else [])
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(_bits(a), _bits(b)), name
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    assert torch.equal(src(x), dst(x))
    # aliased weights are the buckets' memory; copied ones are the model's own
    shares = dst[0].weight.data_ptr() == unpack(packed)["0.weight"].data_ptr()
    assert shares == alias
    assert not any(p.requires_grad for p in dst.parameters())


def test_load_into_copies_when_the_dtype_differs_and_rejects_a_state_that_does_not_fit():
    src, dst = _net(1, torch.float32), _net(2, torch.float64)
    # float64 weights: copied (and converted) in; the float32 buffer `scale` matches and is aliased
    assert load_into(dst, pack(src.state_dict())) == ["scale"]
    assert torch.equal(dst[0].weight, src[0].weight.double()) and dst[0].weight.dtype == torch.float64
    with pytest.raises(ValueError, match="missing"):
        load_into(dst, pack({k: v for k, v in src.state_dict().items() if k != "scale"}))
    bad = {**src.state_dict(), "0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="0.weight: packed shape"):
        load_into(dst, pack(bad))


def test_load_into_fills_a_model_built_on_the_meta_device():
    src = _net(3)
    with torch.device("meta"):
        dst = _net(4)
    load_into(dst, pack(src.state_dict()))
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert torch.equal(src(x), dst(x))


def test_release_lets_go_of_the_bucket_views_and_the_next_load_aliases_the_new_buckets():
    src1, src2, dst = _net(1), _net(2), _net(3)
    first = pack(src1.state_dict())
    names = load_into(dst, first)
    release(dst, names)
    assert all(t.is_meta for t in dst.state_dict().values())
    assert not any(t.data_ptr() == v.data_ptr() for t, v in zip(dst.state_dict().values(), unpack(first).values()))
    second = pack(src2.state_dict())
    assert load_into(dst, second) == names
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert torch.equal(src2(x), dst(x))
    # a copied (not aliased) tensor is the model's own: release leaves it alone
    src, dst = _net(1, torch.float32), _net(2, torch.float64)
    release(dst, load_into(dst, pack(src.state_dict())))
    assert dst[0].weight.device.type == "cpu" and torch.equal(dst[0].weight, src[0].weight.double())
    assert dst.scale.is_meta


def test_a_packed_state_survives_pickle_protocol_5_out_of_band_bit_exact():
    """What Ray does with it: the buckets leave as out-of-band buffers, the index is pickled."""
    import pickle

    state = _mixed_state()
    buffers = []
    data = pickle.dumps(pack(state), protocol=5, buffer_callback=buffers.append)
    assert sum(memoryview(b).nbytes for b in buffers) >= sum(t.numel() * t.element_size() for t in state.values())
    assert len(data) < 4096  # the index only, no tensor bytes
    back = unpack(pickle.loads(data, buffers=buffers))
    assert all(torch.equal(_bits(back[k]), _bits(t)) for k, t in state.items())


def test_layout_carries_the_index_and_bucket_sizes_only():
    packed = pack(_mixed_state())
    layout = packed.layout()
    assert isinstance(layout, Packed) and layout.index == packed.index
    assert layout.buckets == [len(b) for b in packed.buckets]
