"""Causal (FAR) stage 2 on Ray against the one-process reference: at policy lag 0 the rollout fleet (the
student's chunk-by-chunk rollouts through its own KV cache) and the learners (the differentiable rollout
recomputed through the DeepSpeed engine, teacher-forced co-training) reproduce the reference step for
step, with one learner and with two at the same global batch."""

import pytest
import torch

from pipeline import distributed, reference, steps
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split
from tests.ray.conftest import reference_stage2

pytestmark = pytest.mark.ray

STEPS = 6
COMPARED = ("loss/student", "loss/dmd", "loss/cotrain", "loss/critic")
FAR = ["model.causal=true", "model.far.chunk_partition=[1, 1, 2]", "model.far.full_chunk_limit=2",
       "model.far.compressed_patch_size=[1, 4, 4]"]
"""the Ray tests' 4-frame world in three chunks; the third sees the first one compressed"""


def _config(tiny_world, name, *extra):
    base, *_ = tiny_world
    return load_config(None, [*base, *FAR, f"run.name={name}", f"stage2.steps={STEPS}", *extra])


@pytest.fixture(scope="module")
def far_nets(tiny_world):
    _, _, teacher, student = tiny_world
    return teacher, steps.far_student_from(_config(tiny_world, "far"), student)


@pytest.fixture(scope="module")
def far_reference(tiny_world, far_nets):
    _, data_dir, _, _ = tiny_world
    teacher, student = far_nets
    cfg = _config(tiny_world, "far-reference")
    return reference_stage2(cfg, data_dir, student, teacher)


@pytest.mark.parametrize("learners", [1, 2])
def test_far_stage2_lag0_matches_the_reference(ray_cluster, tiny_world, far_nets, far_reference, learners):
    _, data_dir, _, _ = tiny_world
    teacher, student = far_nets
    cfg = _config(tiny_world, f"far-ray-{learners}", f"ray.learners={learners}")
    records = []
    result = distributed.run(cfg, "stage2", student, teacher, data_dir, lambda s, i, f: records.append((s, i, f)))
    assert [i for _, i, _ in records] == list(range(STEPS))
    ref_figures, (ref_student, ref_critic) = far_reference
    for step, ((_, _, got), want) in enumerate(zip(records, ref_figures, strict=True)):
        for k in COMPARED:
            assert abs(got[k] - want[k]) <= 1e-5 * max(abs(want[k]), 1e-12), (step, k, got[k], want[k])
        assert got["rollout/drift"] <= 1e-4, (step, got["rollout/drift"])
    assert type(result.student).__name__ == "AnyFlowFARTransformer3DModel"
    for mine, theirs in ((result.student, ref_student), (result.critic, ref_critic)):
        theirs = theirs.state_dict()
        for key, value in mine.state_dict().items():
            assert (value - theirs[key]).abs().max() <= 1e-5, key


def test_far_stage1_and_causal_consistency_in_one_session_match_the_reference(ray_cluster, tiny_world):
    """Teacher-forced stage 1 on the learner group (the number of chunks drawn alike on every rank), then the
    causal consistency baseline on the fleet, against the reference's stage 1 and consistency."""
    _, data_dir, teacher, _ = tiny_world
    cfg = _config(tiny_world, "far-session", "ray.learners=2", "stage1.steps=6", "stage1.batch_size=4",
                  "stage1.optim.warmup=2", "consistency.steps=4", "consistency.batch_size=4",
                  "consistency.num_steps_choices=[2, 3]")
    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    want = {"stage1": [], "consistency": []}
    torch.set_num_threads(1)
    log = lambda s, i, f: want[s].append(f)  # noqa: E731
    ref_stage1 = reference.train_stage1(cfg, teacher, data, log)
    ref_consistency, _ = reference.train_stage2(cfg, "consistency", ref_stage1, teacher, data, log)
    got = {"stage1": [], "consistency": []}
    out = distributed.train_session(cfg, ["stage1", "consistency"], {"teacher": teacher}, data_dir,
                                    lambda s, i, f: got[s].append(f))
    keys = {"stage1": ("loss/stage1", "far/num_chunks"), "consistency": COMPARED}
    for stage, compared in keys.items():
        assert len(got[stage]) == len(want[stage]) > 0
        for step, (g, w) in enumerate(zip(got[stage], want[stage])):
            for k in compared:
                assert abs(g[k] - w[k]) <= 1e-5 * max(abs(w[k]), 1e-12), (stage, step, k, g[k], w[k])
    assert {f["far/num_chunks"] for f in got["stage1"]} == {2, 3}
    for name, ref in (("student_stage1", ref_stage1), ("consistency", ref_consistency)):
        ref = ref.state_dict()
        for key, value in out.nets[name].state_dict().items():
            assert (value - ref[key]).abs().max() <= 1e-5, (name, key)
