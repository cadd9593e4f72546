"""The one-process pipeline end to end on a tiny toy world: every stage, outputs, export, reproducibility."""

import json

import pytest
import torch
from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel

from pipeline import reference, steps
from pipeline.config import load_config
from pipeline.data.schema import read_null_embed, read_split
from pipeline.evaluate import read_eval
from pipeline.metrics import read_metrics
from pipeline.stages import prepare_data, run_stages
from pipeline.flowmap import draws, losses, models
from pipeline.flowmap.models import StudentFn, VelocityFn
from pipeline.flowmap.simulate import anystep_sample

TINY = [
    "run.track=false", "model.size=tiny", "model.shift=3.0", "ray.backend=reference",
    "data.toy.frames=4", "data.toy.height=8", "data.toy.width=8", "data.toy.num_train=64",
    "data.toy.num_heldout=16", "data.toy.embed_dim=16", "data.toy.shard_rows=32",
    "teacher.steps=40", "teacher.batch_size=8", "teacher.optim.warmup=5", "teacher.optim.ema=0.9",
    "stage1.steps=30", "stage1.batch_size=8", "stage1.optim.warmup=5",
    "stage2.steps=6", "stage2.batch_size=4", "stage2.num_steps_choices=[1, 2, 3]",
    "consistency.steps=4", "consistency.batch_size=4",
    "eval.num_samples=16", "eval.steps=[1, 2, 3]", "eval.ode_ref_steps=8", "eval.video_prompts=2",
]


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"run.output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), "run.name=tiny")
    return cfg, run_stages(cfg)


def _losses(records, stage, key):
    return [r[key] for r in records if r["stage"] == stage]


def test_every_stage_writes_the_contract_outputs(finished_run):
    cfg, run_dir = finished_run
    for name in ("config.yaml", "eval.json", "eval.png", "metrics.jsonl", "student/model_index.json"):
        assert (run_dir / name).is_file(), name
    result = read_eval(run_dir)
    assert result["steps"] == [1, 2, 3]
    assert set(result["models"]) == {"teacher", "student_stage1", "student", "consistency", "data"}
    for per_metric in result["models"].values():
        assert set(per_metric) == {"ode_error", "fd", "motion_error"}
        assert all(len(v) == 3 for v in per_metric.values())
    data = result["models"]["data"]  # the floor: a second sample of the world, the same at every step
    assert data["ode_error"] == [None] * 3 and data["motion_error"] == [0.0] * 3 and len(set(data["fd"])) == 1
    assert len(list((run_dir / "videos").glob("*.gif"))) >= 2 * 4
    records = read_metrics(run_dir / "metrics.jsonl")
    for stage, count in (("teacher", 40), ("stage1", 30), ("stage2", 6), ("consistency", 4)):
        assert len([r for r in records if r["stage"] == stage]) == count


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("world"), "teacher.steps=60", "stage1.steps=60",
                      "stage2.steps=30", "stage2.critic_optim.lr=0.001")
    data_dir = prepare_data(cfg)
    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    return cfg, data


def _fixed_batch(cfg, data, stage, fractions, n=32):
    # a fixed evaluation batch (step 10**6 is never a training step)
    d = draws.data_draws(123, stage, 10**6, n, len(data.latents), data.latent_shape, cfg.model.shift, 0.0,
                         fractions)
    x, cond = data.batch(d.index)
    return x, cond, d


@torch.no_grad()
def _teacher_loss(model, cfg, data):
    x, cond, d = _fixed_batch(cfg, data, "teacher", None)
    return losses.flow_matching_loss(VelocityFn(model), x, cond, d.t, d.eps).item()


@torch.no_grad()
def _stage1_loss(model, cfg, data):
    x, cond, d = _fixed_batch(cfg, data, "stage1", steps.stage1_fractions(cfg))
    return losses.forward_flowmap_loss(StudentFn(model), x, cond, data.null_embed, d.t, d.r, d.eps,
                                       steps.stage1_settings(cfg))[0].item()


def test_each_stage_loss_goes_down_on_a_fixed_batch(tiny_world):
    cfg, data = tiny_world
    quiet = lambda *a: None  # noqa: E731
    # stage 0: flow matching of the teacher from its random initialisation
    before = _teacher_loss(models.build_teacher(cfg.model.size, seed=cfg.model.init_seed), cfg, data)
    teacher = reference.train_teacher(cfg, data, quiet)
    assert _teacher_loss(teacher, cfg, data) < 0.8 * before
    # stage 1: the forward flow-map loss of the converted student
    before = _stage1_loss(models.student_from_teacher(teacher), cfg, data)
    student = reference.train_stage1(cfg, teacher, data, quiet)
    assert _stage1_loss(student, cfg, data) < before
    # stage 2: the critic's flow-matching loss on the student's own samples goes down (the critic
    # tracks the student's distribution); the DMD surrogate is a score difference, not a monotone loss
    records = []
    reference.train_stage2(cfg, "stage2", student, teacher, data, lambda s, i, f: records.append(f))
    critic = [r["loss/critic"] for r in records]
    assert sum(critic[-8:]) < sum(critic[:8]), critic
    assert all(torch.isfinite(torch.tensor([r["loss/dmd"], r["loss/cotrain"]])).all() for r in records)


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    def run(seed):
        cfg = tiny_config(tmp_path, f"run.seed={seed}", "teacher.steps=5", "stage1.steps=3", "stage2.steps=2")
        data_dir = prepare_data(cfg)
        data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
        out = []
        log = lambda s, i, f: out.append((s, i, f["loss/teacher"] if s == "teacher" else  # noqa: E731
                                          f.get("loss/stage1", f.get("loss/student"))))
        teacher = reference.train_teacher(cfg, data, log)
        student = reference.train_stage1(cfg, teacher, data, log)
        reference.train_stage2(cfg, "stage2", student, teacher, data, log)
        return out

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert [x[2] for x in a] != [x[2] for x in c]


def test_exported_student_loads_in_diffusers_and_samples_at_any_step(finished_run):
    cfg, run_dir = finished_run
    pipe = AnyFlowPipeline.from_pretrained(run_dir / "student", tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    alone = AnyFlowTransformer3DModel.from_pretrained(run_dir / "student", subfolder="transformer")
    heldout = read_split(prepare_data(cfg), "heldout")
    cond = heldout.prompt_embeds[:2]
    noise = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in (1, 3):  # an odd step count too
        ref = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=n,
                   output_type="latent").frames.permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            ours = anystep_sample(StudentFn(alone), noise, cond, n, cfg.model.shift)
        assert (ref - ours).abs().max() < 1e-5
    # the whole pipeline, VAE decode included, runs on the toy latents
    video = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=2,
                 output_type="np").frames
    assert video.shape[0] == 2 and video.ndim == 5


def test_running_again_does_not_redo_finished_stages(finished_run, capsys):
    cfg, run_dir = finished_run
    before = len(read_metrics(run_dir / "metrics.jsonl"))
    eval_before = json.loads((run_dir / "eval.json").read_text())
    run_stages(cfg)
    assert len(read_metrics(run_dir / "metrics.jsonl")) == before  # no training step again
    assert json.loads((run_dir / "eval.json").read_text()) == eval_before  # eval recomputes the same numbers


def test_a_tracked_run_lands_in_mlflow_with_metrics_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, "run.track=true", "run.name=tracked", "teacher.steps=3", "run.stages=[teacher]")
    run_dir = run_stages(cfg)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["teacher.steps"] == "3"
    history = client.get_metric_history(run_id, "teacher/loss/teacher")
    assert [m.step for m in history] == [0, 1, 2]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}


def test_a_teacher_folder_replaces_stage_0_also_when_the_teacher_stage_is_not_listed(tmp_path):
    teacher = models.build_teacher("tiny", seed=3)
    teacher.save_pretrained(tmp_path / "my_wan")
    cfg = tiny_config(tmp_path, "run.name=given_teacher", f"model.teacher_path={tmp_path / 'my_wan'}",
                      "stage1.steps=2", "run.stages=[stage1]")
    run_dir = run_stages(cfg)
    assert not (run_dir / "teacher").exists()  # stage 0 neither ran nor was needed
    student = models.load_transformer(run_dir / "student_stage1")
    assert isinstance(student, AnyFlowTransformer3DModel)
