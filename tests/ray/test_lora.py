"""LoRA on Ray (stage2.lora_rank > 0): at max_policy_lag=0 the Ray stage with adapters reproduces the
one-process reference with adapters step for step, every weight sync carries the adapters' bytes only,
the stage's result is the merged plain network, and a learner restored from a LoRA checkpoint goes on
exactly as the reference does."""

import pytest
import torch

from pipeline import reference, steps
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split
from pipeline.flowmap import lora

pytestmark = pytest.mark.ray

STEPS = 6
RANK = 2
COMPARED = ("loss/student", "loss/dmd", "loss/critic")


def _config(tiny_world, name, *extra):
    base, *_ = tiny_world
    return load_config(None, [*base, f"run.name={name}", f"stage2.steps={STEPS}", f"stage2.lora_rank={RANK}",
                              "stage2.lora_alpha=4", "ray.learners=1", *extra])


@pytest.fixture(scope="module")
def lora_reference(tiny_world):
    """The reference with the same adapters (one torch thread, like the learner): per-step figures and
    the merged (student EMA, critic)."""
    _, data_dir, teacher, student = tiny_world
    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    figures = []
    with steps.torch_threads(1):
        nets = reference.train_stage2(_config(tiny_world, "lora-reference"), "stage2", student, teacher, data,
                                      lambda s, i, f: figures.append(f))
    return figures, nets


def _assert_matches(got: list[dict], lora_reference, student: torch.nn.Module, critic: torch.nn.Module, tiny_world):
    want, (ref_student, ref_critic) = lora_reference
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        for k in COMPARED:
            assert abs(g[k] - w[k]) <= 1e-5 * max(abs(w[k]), 1e-12), (step, k, g[k], w[k])
    _, _, teacher, start_student = tiny_world
    for mine, theirs, start in ((student, ref_student, start_student), (critic, ref_critic, teacher)):
        assert not lora.has_adapters(mine)
        theirs, start = theirs.state_dict(), start.state_dict()
        assert set(mine.state_dict()) == set(start)
        for key, value in mine.state_dict().items():
            assert (value - theirs[key]).abs().max() <= 1e-5, key
        moved = [k for k in start if not torch.equal(theirs[k], start[k])]
        assert moved and all(k.endswith(".weight") for k in moved)  # trained, but only the adapted layers


def _adapter_bytes(net: torch.nn.Module, targets) -> int:
    """rank x (in + out) fp32 values for every linear layer whose name ends with a target (counted on the
    plain network, independently of pipeline.flowmap.lora)."""
    return sum(4 * RANK * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets))


def _state_bytes(net: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in net.state_dict().values())


def test_a_learner_restored_from_a_lora_checkpoint_goes_on_like_the_reference_and_syncs_only_adapters(
        ray_cluster, tiny_world, lora_reference, learner_fault_run):
    """Under ZeRO-3 (parameters partitioned, adapters included) at lag 0: learner rank 0 fails after step 4;
    Ray Train restores the group from the checkpoint of step 3 (adapters, their AdamW moments and EMA on
    the frozen base), and every step still equals the reference's, before the failure and after it: with
    fresh adapters or moments the steps after the restart would differ. Every weight sync carries the
    adapters only. (LoRA under ZeRO-2 is checked on one DeepSpeed engine in
    tests/learners/test_checkpoint.py; a Ray session of its own cost the suite about 35 s.)"""
    cfg = _config(tiny_world, "lora-z3-learner-fault", "ray.zero_stage=3", "run.checkpoint_every=3",
                  "run.learner_restarts=1")
    figures, out = learner_fault_run(cfg, after_step=4)
    _assert_matches(figures, lora_reference, out.nets["student"], out.nets["critic_stage2"],
                    tiny_world)
    # what travelled per version: the adapters of student and critic, a small fraction of the full state
    _, _, teacher, student = tiny_world
    targets = cfg.stage2.lora_targets
    adapters = _adapter_bytes(student, targets) + _adapter_bytes(teacher, targets)
    full = _state_bytes(student) + _state_bytes(teacher)
    store = out.stats["stage2"]["store"]
    assert store["bytes_per_version"] == adapters
    assert adapters < full / 5, (adapters, full)
