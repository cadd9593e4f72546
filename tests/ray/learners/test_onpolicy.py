"""The learners' row stream through Ray Data (learners/feed.py): each rank's shard, as Ray Train's DataConfig
hands it out, brings exactly its rows of every step, in step order, equal to the whole split's."""

import pytest
import torch

from learners.feed import RankShards, StepPlan, StreamedRows, row_bytes
from pipeline import steps
from pipeline.config import load_config
from pipeline.data.schema import read_meta, read_null_embed, read_split

pytestmark = pytest.mark.ray


def test_each_rank_shard_streams_its_rows_of_every_step_in_order(ray_cluster, tiny_world):
    base, data_dir, _, _ = tiny_world
    cfg = load_config(None, [*base, "stage1.steps=4", "stage1.batch_size=4", "stage2.steps=3",
                             "stage2.cotrain_weight=0.5", "run.name=feed-shards"])
    stages, world = ["stage1", "stage2"], 2
    meta, split, null = read_meta(data_dir), read_split(data_dir, "train"), read_null_embed(data_dir)
    n = meta["num_rows"]["train"]
    whole = steps.TrainData(split.latents, split.prompt_embeds, null[None])
    # a read task per step (a tiny block size) within the pipeline's read-ahead budget
    cfg.data.stream_block_mb, cfg.ray.learners = 1e-4, world
    plan = StepPlan(cfg, stages, None, row_bytes(str(data_dir)), num_rows=n)
    assert plan.steps_per_block() == 1
    shards = RankShards(cfg, str(data_dir), n, plan).configure({"rows": plan()}, world, None, None)
    for rank in range(world):
        rows = steps.rank_rows(4, world, rank)
        fed = StreamedRows.from_shard(shards[rank]["rows"], meta["latent_shape"], meta["embed_shape"], n, null,
                                      torch.device("cpu"), stages, prefetch=2)
        for stage in stages:
            for step in range(getattr(cfg, stage).steps):
                fed.at(stage, step)
                if stage == "stage1":
                    d = steps.supervised_draws(cfg, stage, step, n, fed.latent_shape)
                    index, drop = d.index[slice(*rows)], d.drop[slice(*rows)]
                else:
                    index, drop = (x[slice(*rows)] for x in (lambda c: (c.index, c.drop))(
                        steps.stage2_draws(cfg, stage, step, n, fed.latent_shape)[2]))
                (x, cond), (want_x, want_cond) = fed.batch(index, drop), whole.batch(index, drop)
                assert torch.equal(x, want_x) and torch.equal(cond, want_cond)
        assert fed.skipped == 0 and fed.max_held_rows <= 3 * (rows[1] - rows[0])
