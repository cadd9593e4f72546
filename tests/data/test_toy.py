"""The toy world: determinism, content that matches the prompt, embeddings, the dataset."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.data import schema, toy
from pipeline.data.toy import ToyWorldConfig

SMALL = ToyWorldConfig(num_train=40, num_heldout=12, shard_rows=16)
TOY16 = ToyWorldConfig(**toy.TOY16)
"""the toy16 world (8 frames of 16x16, all five motions, bars of 1.6 r): the default until 2026-12-08"""


def centre_of_mass(clip: torch.Tensor) -> torch.Tensor:
    """(F, 2) centre (x, y) in pixels of the channel energy of each frame of an (F, C, H, W) clip, on the
    torus: the angle of the energy-weighted mean of exp(2 pi i position / size) on each axis."""
    energy = clip.square().sum(1).double()  # (F, H, W)
    centre = []
    for axis, size in ((1, clip.shape[3]), (2, clip.shape[2])):  # x: sum over rows; y: sum over columns
        marginal = energy.sum(axis)  # (F, size)
        angle = 2 * torch.pi * (torch.arange(size, dtype=torch.float64) + 0.5) / size
        phase = torch.atan2((marginal * angle.sin()).sum(1), (marginal * angle.cos()).sum(1))
        centre.append((phase / (2 * torch.pi) * size) % size)
    return torch.stack(centre, 1).float()


def wrapped(d: torch.Tensor, size: int) -> torch.Tensor:
    """Offsets on a torus of circumference `size`: the nearest image."""
    return (d + size / 2) % size - size / 2


# --------------------------------------------------------------------------- config


def test_default_config_values():
    cfg = ToyWorldConfig()
    assert (cfg.frames, cfg.channels, cfg.height, cfg.width) == (4, 4, 12, 12)
    assert (cfg.num_train, cfg.num_heldout, cfg.seed) == (2048, 256, 0)
    assert (cfg.embed_len, cfg.embed_dim, cfg.embed_seed, cfg.shard_rows) == (8, 32, 0, 512)
    assert cfg.travel == 0.4 and cfg.motions == ["right", "down", "still"] and cfg.bar_length == 1.2
    assert (TOY16.frames, TOY16.height, TOY16.width, TOY16.motions, TOY16.bar_length) == (
        8, 16, 16, list(toy.MOTIONS), 1.6)


@pytest.mark.parametrize("field, value", [("frames", 0), ("width", -1), ("seed", -1),
                                          ("embed_len", 3), ("shard_rows", 1.5), ("travel", 0.0),
                                          ("travel", 0.9), ("travel", "far"), ("travel", True),
                                          ("motions", []), ("motions", ["sideways"]),
                                          ("motions", ["left", "left"]), ("motions", "left"),
                                          ("bar_length", 0.5), ("bar_length", 2.5), ("bar_length", "long")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"ToyWorldConfig.{field} must be"):
        ToyWorldConfig(**{field: value})


# --------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_seed_dependent():
    ids = np.arange(32)
    a, prompts_a = toy.render_videos(SMALL, ids)
    b, prompts_b = toy.render_videos(SMALL, ids)
    assert torch.equal(a, b) and prompts_a == prompts_b
    c, prompts_c = toy.render_videos(dataclasses.replace(SMALL, seed=1), ids)
    assert not torch.equal(a, c) and prompts_a != prompts_c


def test_clip_depends_only_on_its_sample_id():
    batch, prompts = toy.render_videos(SMALL, np.arange(20))
    clip, prompt = toy.render_video(SMALL, 13)
    assert torch.equal(clip, batch[13]) and prompt == prompts[13]


@pytest.mark.parametrize("cfg, shape", [(ToyWorldConfig(), (4, 4, 12, 12)), (TOY16, (8, 4, 16, 16))],
                         ids=["default", "toy16"])
def test_shapes_and_value_ranges_of_the_default_world(cfg, shape):
    latents, prompts = toy.render_videos(cfg, np.arange(cfg.num_train))
    assert latents.shape == (2048, *shape) and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    assert abs(latents.mean().item()) < 0.05
    assert 0.9 < latents.std().item() < 1.1
    per_channel = latents.transpose(0, 2).reshape(4, -1)
    assert per_channel.mean(1).abs().max() < 0.05 and (per_channel.std(1) - 1).abs().max() < 0.15
    bound = toy.SHAPE_GAIN * toy.colour_table(4).abs().max()
    assert latents.abs().max() <= bound + 1e-5
    assert set(prompts) == {toy.prompt_for(c, s, m) for c in toy.COLOURS for s in toy.SHAPES
                            for m in cfg.motions}


def test_other_sizes_render():
    cfg = ToyWorldConfig(frames=1, channels=6, height=8, width=24)
    clip, _ = toy.render_video(cfg, 0)
    assert clip.shape == (1, 6, 8, 24) and torch.isfinite(clip).all()


@pytest.mark.parametrize("motion, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1),
                                                ("down", 1, 1), ("still", None, 0)])
def test_shape_moves_the_way_the_prompt_says(motion, axis, sign):
    cfg = TOY16  # the prompt sets the motion, whichever motions the world draws from
    for sample_id in range(12):
        shape = toy.SHAPES[sample_id % 4]
        prompt = f"green {shape} " + ("standing still" if motion == "still" else f"moving {motion}")
        clip, got = toy.render_video(cfg, sample_id, prompt=prompt)
        assert got == prompt
        steps = wrapped(centre_of_mass(clip).diff(dim=0), 16)  # (F - 1, 2) pixel steps per frame, on the torus
        if axis is None:
            assert steps.abs().max() < 1e-3
        else:
            assert (sign * steps[:, axis] > 0.6).all(), (prompt, steps)
            assert steps[:, 1 - axis].abs().max() < 0.05, (prompt, steps)  # pixel sampling only: no border clips
            assert 0.3 * 16 < sign * (steps[:, axis].sum()) < 0.5 * 16  # 0.4 of the frame +-20 %


def test_travel_sets_the_distance_moved():
    for travel in (0.2, 0.6):
        clip, _ = toy.render_video(dataclasses.replace(TOY16, travel=travel), 5, prompt="red circle moving down")
        moved = wrapped(centre_of_mass(clip).diff(dim=0), 16)[:, 1].sum() / 16
        assert 0.8 * travel - 0.01 < moved < 1.2 * travel + 0.01


def test_motions_restricts_the_draw_and_keeps_every_other_attribute():
    ids = np.arange(600)
    every = toy._clip_params(ToyWorldConfig(motions=list(toy.MOTIONS)), ids)
    some = toy._clip_params(ToyWorldConfig(motions=["right", "down", "still"]), ids)
    kept = [toy.MOTIONS.index(m) for m in ("right", "down", "still")]
    counts = np.bincount(some["motion"], minlength=len(toy.MOTIONS))
    assert set(np.flatnonzero(counts)) == set(kept) and counts[kept].min() > 0.8 * len(ids) / 3
    for key in every.keys() - {"motion"}:  # colour, shape, size, travel and position do not move
        assert np.array_equal(every[key], some[key]), key
    _, prompts = toy.render_videos(ToyWorldConfig(motions=["up"]), ids[:20])
    assert all(p.endswith("moving up") for p in prompts)


def test_bar_length_changes_the_bars_alone():
    ids = np.arange(200)
    base = ToyWorldConfig(bar_length=1.6)  # the bars of a world without the key
    short = ToyWorldConfig()
    a, prompts = toy.render_videos(base, ids)
    b, _ = toy.render_videos(short, ids)
    assert short.bar_length == 1.2  # the default
    bar = np.array([" bar " in p for p in prompts])
    assert bar.any() and torch.equal(a[~bar], b[~bar])
    # a bar's lit width along x shrinks by 1.2 / 1.6 (soft edges: within a pixel), its height does not
    width = lambda x: (x.abs().sum(2) > 0.5 * x.abs().sum(2).amax((-2, -1), keepdim=True)).sum(-1).amax(-1)
    wa, wb = width(a[bar]).double().mean(), width(b[bar]).double().mean()
    assert abs(float(wb / wa) - 0.75) < 0.1, (float(wa), float(wb))


def test_positions_are_uniform_and_shapes_wrap_around_the_border():
    cfg = TOY16
    latents, _ = toy.render_videos(cfg, np.arange(cfg.num_train))
    # translation invariance: every pixel is lit about equally often over the world
    lit = (latents.abs().sum(2) > 1e-3).double().mean((0, 1))  # (H, W)
    assert lit.min() > 0.85 * lit.mean() and lit.max() < 1.15 * lit.mean()
    # mid-clip positions fill the frame: each quarter of it holds about a quarter of the clips
    centres = torch.stack([centre_of_mass(clip)[cfg.frames // 2] for clip in latents[:512]])
    for axis in (0, 1):
        counts = torch.histc(centres[:, axis], bins=4, min=0, max=16)
        assert counts.min() > 0.75 * 128 and counts.max() < 1.25 * 128, counts
    # a shape on the left border shows up on both sides, and is one piece on the torus
    for sample_id in range(40):
        clip, _ = toy.render_video(cfg, sample_id, prompt="red square standing still")
        frame = clip[0].abs().sum(0)  # (H, W)
        if frame[:, 0].max() > 0.5 and frame[:, -1].max() > 0.5:
            break
    else:
        pytest.fail("no square straddles the left/right border in 40 clips")
    middle = torch.roll(frame, shifts=8, dims=1)  # the border is now the middle column
    cols = (middle > 1e-3).any(0).nonzero().flatten()
    assert cols.max() - cols.min() + 1 == len(cols) < 16


def test_pixels_have_the_prompts_colour():
    table = toy.colour_table(4)
    for c, colour in enumerate(toy.COLOURS):
        clip, _ = toy.render_video(SMALL, 3, prompt=f"{colour} circle moving up")
        pixels = clip.permute(0, 2, 3, 1).reshape(-1, 4)
        lit = pixels[pixels.norm(dim=1) > 0]
        assert len(lit) > 0
        direction = torch.nn.functional.normalize(lit, dim=1) @ torch.nn.functional.normalize(table[c], dim=0)
        assert torch.allclose(direction, torch.ones(len(lit)), atol=1e-5)
        peak = lit.norm(dim=1).max()
        assert torch.isclose(peak, toy.SHAPE_GAIN * table[c].norm(), rtol=1e-5)


def test_shapes_differ_and_edges_are_soft():
    clips = [toy.render_video(SMALL, 0, prompt=f"red {s} standing still")[0] for s in toy.SHAPES]
    for i in range(len(clips)):
        for j in range(i + 1, len(clips)):
            assert (clips[i] - clips[j]).abs().max() > 0.5
    values = torch.cat([c[:, 0].flatten() for c in clips]) / (toy.SHAPE_GAIN * toy.colour_table(4)[0, 0])
    partial = ((values > 0.02) & (values < 0.98)).sum()
    assert partial > 0.1 * (values > 0.02).sum()  # a good share of lit pixels are on soft edges


def test_colour_table_is_centred_and_distinct():
    for channels in (2, 3, 4, 7):
        table = toy.colour_table(channels)
        assert table.shape == (4, channels)
        assert torch.allclose(table.mean(0), torch.zeros(channels), atol=1e-6)
        assert torch.allclose(table.square().mean(0), torch.ones(channels), atol=1e-5)
        assert torch.cdist(table, table).add(100 * torch.eye(4)).min() > 0.5


# --------------------------------------------------------------------------- prompts and embeddings


def test_prompt_embeddings_are_word_vectors_padded_with_zeros():
    cfg = ToyWorldConfig()
    e = toy.embed_prompt("red square moving left", cfg)
    assert e.shape == (8, 32) and e.dtype == torch.float32
    assert (e[:4].norm(dim=1) > 1).all() and torch.equal(e[4:], torch.zeros(4, 32))
    assert torch.equal(toy.embed_prompt("  Red SQUARE moving   left ", cfg), e)
    other = toy.embed_prompt("red square moving right", cfg)
    assert torch.equal(other[:3], e[:3]) and not torch.equal(other[3], e[3])
    prompts = [toy.prompt_for(c, s, m) for c in toy.COLOURS for s in toy.SHAPES for m in toy.MOTIONS]
    flat = toy.embed_prompts(prompts, cfg).flatten(1)
    assert torch.cdist(flat, flat).add(100 * torch.eye(len(prompts))).min() > 1.0
    assert not torch.equal(toy.embed_prompt("red square moving left",
                                            dataclasses.replace(cfg, embed_seed=1)), e)


def test_null_embedding_is_all_padding():
    cfg = ToyWorldConfig()
    assert torch.equal(toy.null_embed(cfg), torch.zeros(8, 32))
    assert torch.equal(toy.embed_prompt("", cfg), toy.null_embed(cfg))


def test_bad_prompts_are_rejected():
    cfg = ToyWorldConfig()
    with pytest.raises(ValueError, match=r"words \['purple'\] not in the toy vocabulary"):
        toy.embed_prompt("purple square moving left", cfg)
    with pytest.raises(ValueError, match="has 9 words, embed_len is 8"):
        toy.embed_prompt("red " * 9, cfg)
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        toy.render_video(cfg, 0, prompt="square red moving left")


# --------------------------------------------------------------------------- the dataset


def test_dataset_round_trip_and_contents(tmp_path):
    folder = toy.make_toy_dataset(tmp_path / "toy", SMALL)
    summary = schema.validate_dataset(folder)
    assert summary["splits"]["train"]["rows"] == 40 and summary["splits"]["train"]["shards"] == 3
    assert summary["splits"]["heldout"]["rows"] == 12
    train = schema.read_split(folder, "train")
    latents, prompts = toy.render_videos(SMALL, np.arange(40))
    assert torch.equal(train.latents, latents) and train.prompts == prompts
    assert torch.equal(train.prompt_embeds, toy.embed_prompts(prompts, SMALL))
    assert torch.equal(train.sample_ids, torch.arange(40)) and set(train.sources) == {"toy"}
    assert torch.equal(schema.read_null_embed(folder), toy.null_embed(SMALL))
    meta = schema.read_meta(folder)
    assert meta["generator"]["name"] == "toy" and meta["generator"]["seed"] == 0
    assert meta["generator"]["config"] == dataclasses.asdict(SMALL)
    assert meta["vocabulary"] == toy.vocabulary()


def test_heldout_is_disjoint_from_train(tmp_path):
    folder = toy.make_toy_dataset(tmp_path / "toy", SMALL)
    train, heldout = schema.read_split(folder, "train"), schema.read_split(folder, "heldout")
    assert set(heldout.sample_ids.tolist()) == set(range(40, 52))
    distance = torch.cdist(heldout.latents.flatten(1), train.latents.flatten(1))
    assert distance.min() > 1.0
    words = set(toy.vocabulary()["words"])
    assert all(set(p.split()) <= words for p in heldout.prompts)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = toy.make_toy_dataset(tmp_path / "a", SMALL)
    b = toy.make_toy_dataset(tmp_path / "b", SMALL)
    c = toy.make_toy_dataset(tmp_path / "c", dataclasses.replace(SMALL, seed=5))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 + 1 + 2  # train shards, heldout shard, null prompt, dataset.json
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not torch.equal(schema.read_split(a, "train").latents, schema.read_split(c, "train").latents)


def test_make_skips_when_current_and_rebuilds_otherwise(tmp_path, monkeypatch):
    folder = toy.make_toy_dataset(tmp_path / "toy", SMALL)
    calls = []
    real_write = schema.write_dataset
    monkeypatch.setattr(schema, "write_dataset", lambda *a, **k: calls.append(1) or real_write(*a, **k))
    toy.make_toy_dataset(folder, SMALL)
    assert calls == []
    bigger = dataclasses.replace(SMALL, num_train=20, shard_rows=8)
    toy.make_toy_dataset(folder, bigger)
    assert calls == [1] and schema.read_meta(folder)["num_rows"]["train"] == 20
    assert len(schema.shard_paths(folder, "train")) == 3
    schema.shard_paths(folder, "train")[0].write_bytes(b"damaged")
    toy.make_toy_dataset(folder, bigger)
    assert calls == [1, 1]
    schema.validate_dataset(folder)


def test_default_dataset_builds_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    folder = toy.make_toy_dataset(tmp_path / "toy")
    seconds = time.perf_counter() - start
    summary = schema.validate_dataset(folder)
    assert summary["splits"]["train"]["rows"] == 2048 and summary["splits"]["heldout"]["rows"] == 256
    assert summary["latent_shape"] == [4, 4, 12, 12] and summary["embed_shape"] == [8, 32]
    assert abs(summary["splits"]["train"]["latent_std"] - 1) < 0.1
    assert seconds < 15, f"default toy dataset took {seconds:.1f} s"


def test_data_package_imports_neither_ray_nor_mlflow():
    code = ("import sys, pipeline.data, pipeline.data.schema, pipeline.data.toy; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
