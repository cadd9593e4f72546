"""Causal (FAR) stage 2 on Ray against the one-process reference: at policy lag 0 the rollout fleet (the
student's chunk-by-chunk rollouts through its own KV cache) and the learners (the differentiable rollout
recomputed through the DeepSpeed engine, teacher-forced co-training) reproduce the reference step for
step, on two learners at the reference's global batch, in one session with stage 1 and the causal
consistency baseline."""

import pytest

from pipeline import distributed, reference, steps
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split

pytestmark = pytest.mark.ray

STEPS = 6
COMPARED = ("loss/student", "loss/dmd", "loss/cotrain", "loss/critic")
FAR = ["model.causal=true", "model.far.chunk_partition=[1, 1, 2]", "model.far.full_chunk_limit=2",
       "model.far.compressed_patch_size=[1, 4, 4]"]
"""the Ray tests' 4-frame world in three chunks; the third sees the first one compressed"""


def _config(tiny_world, name, *extra):
    base, *_ = tiny_world
    return load_config(None, [*base, *FAR, f"run.name={name}", f"stage2.steps={STEPS}", *extra])


def test_far_stages_in_one_session_on_two_learners_match_the_reference(ray_cluster, tiny_world):
    """Teacher-forced stage 1 on the learner group (the number of chunks drawn alike on every rank), then
    stage 2 from its student (the fleet's chunk-by-chunk rollouts through the student's own KV cache, the
    learners' differentiable rollout recomputed through the DeepSpeed engine, teacher-forced co-training),
    then the causal consistency baseline, all at lag 0 on two learners at the reference's global batch,
    against the one-process reference step for step. Two learners split every batch, so the one-learner
    path is the same code on a whole batch; one session keeps the suite's start-up cost to one."""
    _, data_dir, teacher, _ = tiny_world
    cfg = _config(tiny_world, "far-session", "ray.learners=2", "stage1.steps=6", "stage1.batch_size=4",
                  "stage1.optim.warmup=2", "consistency.steps=4", "consistency.batch_size=4",
                  "consistency.num_steps_choices=[2, 3]")
    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    stages = ("stage1", "stage2", "consistency")
    want = {s: [] for s in stages}
    log = lambda s, i, f: want[s].append(f)  # noqa: E731
    with steps.torch_threads(1):
        ref_stage1 = reference.train_stage1(cfg, teacher, data, log)
        ref_student, ref_critic = reference.train_stage2(cfg, "stage2", ref_stage1, teacher, data, log)
        ref_consistency, _ = reference.train_stage2(cfg, "consistency", ref_stage1, teacher, data, log)
    got = {s: [] for s in stages}
    out = distributed.train_session(cfg, list(stages), {"teacher": teacher}, data_dir,
                                    lambda s, i, f: got[s].append(f))
    keys = {"stage1": ("loss/stage1", "far/num_chunks"), "stage2": COMPARED, "consistency": COMPARED}
    assert [len(got[s]) for s in stages] == [len(want[s]) for s in stages] == [6, STEPS, 4]
    for stage, compared in keys.items():
        for step, (g, w) in enumerate(zip(got[stage], want[stage])):
            for k in compared:
                assert abs(g[k] - w[k]) <= 1e-5 * max(abs(w[k]), 1e-12), (stage, step, k, g[k], w[k])
    assert all(f["rollout/drift"] <= 1e-4 for f in got["stage2"]), [f["rollout/drift"] for f in got["stage2"]]
    assert {f["far/num_chunks"] for f in got["stage1"]} == {2, 3}
    for name, ref in (("student_stage1", ref_stage1), ("student", ref_student), ("critic_stage2", ref_critic),
                      ("consistency", ref_consistency)):
        assert type(out.nets[name]).__name__ == type(ref).__name__, name
        ref = ref.state_dict()
        for key, value in out.nets[name].state_dict().items():
            assert (value - ref[key]).abs().max() <= 1e-5, (name, key)
    assert type(out.nets["student"]).__name__ == "AnyFlowFARTransformer3DModel"
