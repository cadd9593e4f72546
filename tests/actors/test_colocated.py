"""The colocated rollout+scorer actor reports a restart of its process once (no Ray needed: the
classes are built directly, and Ray's "this actor was reconstructed" flag is stood in for)."""

import torch

from actors import rollout
from actors.colocated import RolloutScorer
from pipeline.config import load_config
from pipeline.flowmap import models


def _colocated(monkeypatch, reconstructed: bool) -> RolloutScorer:
    monkeypatch.setattr(rollout, "_was_reconstructed", lambda: reconstructed)
    teacher = models.build_teacher("tiny", seed=0)
    student = models.student_from_teacher(teacher)
    cfg = load_config(None, ["model.size=tiny"])
    embeds = torch.zeros(4, 8, teacher.config.text_dim)
    return RolloutScorer(cfg, None, dict(student.config), dict(teacher.config), teacher.state_dict(), embeds,
                         embeds[0], (teacher.config.in_channels, 2, 8, 8))


def test_a_restarted_colocated_actor_counts_one_restart_not_one_per_role(monkeypatch):
    actor = _colocated(monkeypatch, reconstructed=True)
    assert (actor.roller._restarted(), actor.scorer._restarted()) == (1, 0)
    assert (actor.roller._restarted(), actor.scorer._restarted()) == (0, 0)  # reported on the first call only


def test_a_fresh_colocated_actor_counts_no_restart(monkeypatch):
    actor = _colocated(monkeypatch, reconstructed=False)
    assert (actor.roller._restarted(), actor.scorer._restarted()) == (0, 0)
