"""The step logic shared by the reference and the Ray roles (pipeline/steps.py): per-learner slicing of
what travels through the object store, and the trajectory record (no Ray needed)."""

import pickle

import pytest
import torch

from pipeline.steps import Trajectory, rank_rows, split_rows


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


def test_a_rollout_part_joined_with_its_target_part_is_the_whole_record():
    x_old, x_crit, y = (torch.randn(2, 4, 4, 8, 8) for _ in range(3))
    rollout = Trajectory("stage2", 7, (2, 4), num_steps=3, k=1, student_version=6, x_old=x_old, x_crit=x_crit)
    target = Trajectory("stage2", 7, (2, 4), num_steps=3, k=1, student_version=6, critic_version=7, y=y)
    whole = pickle.loads(pickle.dumps(rollout)).joined(pickle.loads(pickle.dumps(target)))
    assert (whole.step, whole.rows, whole.num_steps, whole.k) == (7, (2, 4), 3, 1)
    assert (whole.student_version, whole.critic_version) == (6, 7)
    assert torch.equal(whole.x_old, x_old) and torch.equal(whole.x_crit, x_crit) and torch.equal(whole.y, y)
    assert rollout.y is None and rollout.critic_version is None  # the parts are left as they were


@pytest.mark.parametrize("field,value", [("step", 8), ("rows", (0, 2)), ("stage", "consistency")])
def test_a_target_of_another_step_or_rank_is_refused(field, value):
    rollout = Trajectory("stage2", 7, (2, 4), 3, 1, 6, x_old=torch.zeros(2, 1), x_crit=torch.zeros(2, 1))
    target = Trajectory(**{**dict(stage="stage2", step=7, rows=(2, 4), num_steps=3, k=1, student_version=6,
                                  critic_version=7, y=torch.zeros(2, 1)), field: value})
    with pytest.raises(ValueError, match="does not fit the rollout of stage2 step 7 rows \\(2, 4\\)"):
        rollout.joined(target)
