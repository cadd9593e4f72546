"""The stages with `ray.backend=ray`: the on-policy stage runs on the fleet inside a normal run."""

import pytest

from pipeline.config import load_config
from pipeline.evaluate import read_eval
from pipeline.metrics import LAG_MAX, read_metrics
from pipeline.stages import run_stages


@pytest.mark.ray
def test_a_run_with_the_ray_backend_trains_evaluates_and_exports(ray_cluster, tiny_world):
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
