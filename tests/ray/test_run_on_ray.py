"""The stages with `ray.backend=ray`: the on-policy stage runs on the fleet inside a normal run."""

import re

import pytest

from pipeline.config import load_config
from pipeline.evaluate import read_eval
from pipeline.metrics import LAG_MAX, read_metrics
from pipeline.stages import run_stages


@pytest.mark.ray
def test_a_run_with_the_ray_backend_trains_evaluates_and_exports(ray_cluster, tiny_world, capsys):
    base, _, _, _ = tiny_world
    cfg = load_config(None, [*base, "run.name=ray_e2e", "run.track=false", "teacher.steps=4", "teacher.batch_size=4",
                             "stage1.steps=3", "stage1.batch_size=4", "stage2.steps=4",
                             "run.stages=[teacher, stage1, stage2, eval, export]", "eval.num_samples=8",
                             "eval.steps=[1, 2]", "eval.ode_ref_steps=4", "eval.video_prompts=0"])
    run_dir = run_stages(cfg)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "stage2"]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r[LAG_MAX] == 0 for r in records)
    assert set(read_eval(run_dir)["models"]) == {"teacher", "student_stage1", "student", "data"}
    assert (run_dir / "student" / "model_index.json").is_file()
    _assert_console_tells_what_ran_on_ray(capsys.readouterr().out)


def _assert_console_tells_what_ran_on_ray(out: str) -> None:
    """Every stage trains in the first stage's Ray session: the teacher's line names the stages it ran and
    each one's seconds, and each later stage's line repeats its own (not "done in 0s" alone)."""
    first = re.search(r"^== teacher done in (\d+)s: one Ray session trained teacher, stage1, stage2 \(learner "
                      r"start-up (\d+)s, teacher (\d+)s, stage1 (\d+)s, stage2 (\d+)s\)$", out, re.M)
    assert first, out
    total, startup, *each = map(int, first.groups())
    assert startup + sum(each) <= total + 4  # parts of the teacher stage's time, each rounded to a second
    for stage, seconds in zip(("stage1", "stage2"), each[1:]):
        assert re.search(rf"^== {stage} done in \d+s: trained in the Ray session above, in {seconds}s$", out, re.M), out
