"""The learners' co-training data: the train split read once through Ray Data, in the reference's row order."""

import pytest

from learners.onpolicy import read_train_split, train_split_of
from pipeline.data.schema import read_null_embed, read_split

pytestmark = pytest.mark.ray


def test_train_split_through_ray_data_matches_read_split_row_for_row(ray_cluster, tiny_world):
    _, data_dir, _, _ = tiny_world
    ours = train_split_of(read_train_split(str(data_dir)), str(data_dir), read_null_embed(data_dir))
    ref = read_split(data_dir, "train")
    assert ours.latents.shape == ref.latents.shape
    assert (ours.latents == ref.latents).all() and (ours.prompt_embeds == ref.prompt_embeds).all()
    assert ours.null_embed.shape == (1, *read_null_embed(data_dir).shape)
