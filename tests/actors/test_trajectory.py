"""Per-learner slicing of what travels through the object store (no Ray needed)."""

import pickle

import pytest
import torch

from actors.trajectory import rank_rows, split_rows


def test_rank_rows_partition_the_batch_in_rank_order():
    assert [rank_rows(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="does not split evenly"):
        rank_rows(6, 4, 0)


def test_split_rows_gives_compact_slices_that_pickle_only_their_rows():
    x = torch.arange(8 * 1000, dtype=torch.float32).view(8, 1000)
    parts = split_rows(x, 2)
    assert torch.equal(torch.cat(parts), x)
    # a pickled view would carry the whole storage; a compact slice carries its own rows only
    assert len(pickle.dumps(parts[0])) < 0.6 * len(pickle.dumps(x[:4]))
