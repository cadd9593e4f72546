"""The causal (FAR) run in one process, on a tiny world: every stage through `python -m pipeline.run --config
toy-far`, eval.json with fd per chunk, the exported AnyFlowFARPipeline folder, and the step functions the
reference loop calls (teacher-forced stage-1 loss, chunk-by-chunk rollouts, the number-of-chunks draw)."""

import json

import pytest
import torch
from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel

from pipeline import steps
from pipeline.config import load_config
from pipeline.evaluate import FD_PER_CHUNK, read_eval
from pipeline.flowmap import draws, far, losses, models
from pipeline.flowmap.schedule import t_weight
from pipeline.metrics import FAR_NUM_CHUNKS, read_metrics
from pipeline.run import main

CP = [2, 2, 2]  # with full_chunk_limit 2, the third chunk sees the first one compressed
TINY_FAR = [
    "run.track=false", "model.size=tiny", "model.teacher_path=", "ray.backend=reference",
    "data.toy.frames=6", "data.toy.height=8", "data.toy.width=8", "data.toy.num_train=64",
    "data.toy.num_heldout=16", "data.toy.embed_dim=16", "data.toy.shard_rows=32",
    f"model.far.chunk_partition={CP}", "model.far.full_chunk_limit=2", "model.far.compressed_patch_size=[1, 4, 4]",
    "teacher.steps=30", "teacher.batch_size=8", "teacher.optim.warmup=5",
    "stage1.steps=12", "stage1.batch_size=8", "stage1.optim.warmup=5",
    "stage2.steps=4", "stage2.batch_size=4", "stage2.num_steps_choices=[1, 2, 3]",
    "consistency.steps=3", "consistency.batch_size=4", "consistency.num_steps_choices=[2, 3]",
    "eval.num_samples=16", "eval.steps=[1, 2, 4]", "eval.ode_ref_steps=8", "eval.video_prompts=1",
]
"""`--config toy-far` made tiny: the tiny model on 6-frame 8x8 clips in three 2-frame chunks"""


def _config(tmp_path, *extra):
    return load_config("toy-far", [*TINY_FAR, f"run.output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def far_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["--config", "toy-far", *TINY_FAR, f"run.output_dir={out}", "run.name=far"]) == 0
    return _config(out, "run.name=far"), out / "far"


def test_every_causal_stage_writes_the_contract_outputs(far_run):
    cfg, run_dir = far_run
    result = read_eval(run_dir)
    assert result["steps"] == [1, 2, 4]
    assert set(result["models"]) == {"teacher", "student", "student_stage1", "consistency", "data"}
    for per_metric in result["models"].values():
        assert set(per_metric) == {"ode_error", "fd", "motion_error"} and all(len(v) == 3 for v in per_metric.values())
    chunks = result[FD_PER_CHUNK]
    assert chunks["chunk_partition"] == CP
    assert set(chunks["models"]) == {"teacher", "student", "student_stage1", "consistency", "data"}
    for per_step in chunks["models"].values():
        assert len(per_step) == 3 and all(len(row) == len(CP) and all(v > 0 for v in row) for row in per_step)
    records = read_metrics(run_dir / "metrics.jsonl")
    for stage, n in (("teacher", 30), ("stage1", 12), ("stage2", 4), ("consistency", 3)):
        assert len([r for r in records if r["stage"] == stage]) == n
    counts = {r[FAR_NUM_CHUNKS] for r in records if r["stage"] == "stage1"}
    assert counts <= {2, 3} and 2 in counts  # full_chunk_limit, sometimes all chunks
    for name in ("student_stage1", "student_stage2", "consistency"):
        assert json.loads((run_dir / name / "config.json").read_text())["_class_name"] == "AnyFlowFARTransformer3DModel"


@pytest.mark.parametrize("n", [1, 2, 4])
def test_exported_student_samples_in_anyflow_far_pipeline_like_far_sample(far_run, n):
    """The folder loads as the issue's contract says; diffusers' own (flex) processor samples it like the
    project's sampler (dense processor, diffusers padding form) within float noise."""
    cfg, run_dir = far_run
    pipe = AnyFlowFARPipeline.from_pretrained(run_dir / "student", tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    ours = steps.prepared(cfg, AnyFlowFARTransformer3DModel.from_pretrained(run_dir / "student",
                                                                            subfolder="transformer"))
    assert list(pipe.transformer.config.chunk_partition) == CP
    g = torch.Generator().manual_seed(n)
    noise, cond = torch.randn(2, 6, 4, 8, 8, generator=g), torch.randn(2, 8, 16, generator=g)
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=n,
                   guidance_scale=1.0, output_type="latent", height=64, width=64,
                   num_frames=4 * 6 - 3).frames.permute(0, 2, 1, 3, 4)
        x = far.far_sample(ours, noise, cond, n, cfg.model.shift, CP)
    assert ref.abs().mean() > 0.1
    assert (x - ref).abs().max() < 1e-5


def test_a_finished_causal_run_loads_its_models_and_refuses_other_far_settings(far_run, capsys):
    cfg, run_dir = far_run
    base = ["--config", "toy-far", *TINY_FAR, f"run.output_dir={run_dir.parent}", "run.name=far"]
    assert main([*base, "run.stages=[stage2, export]"]) == 0  # loaded (not retrained), exported again
    assert "not trained: student loaded from" in capsys.readouterr().out
    assert main([*base, "run.stages=[export]", "model.far.full_chunk_limit=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "full_chunk_limit" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("override,key", [
    ("model.far.chunk_partition=[2, 2]", "model.far.chunk_partition"),
    ("model.far.compressed_patch_size=[1, 3, 3]", "model.far.compressed_patch_size"),
    ("model.far.long_context_ratio=2", "model.far.long_context_ratio"),
    ("stage2.lora_rank=4", "stage2.lora_rank"),
])
def test_bad_causal_settings_exit_2_with_one_line(tmp_path, capsys, override, key):
    rc = main(["--config", "toy-far", *TINY_FAR, f"run.output_dir={tmp_path}", "run.name=bad", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {key}:") and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the step functions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("cfg"))
    torch.manual_seed(0)
    student = models.student_from_teacher(models.build_teacher("tiny", seed=0))
    with torch.no_grad():  # make u(z, t, r) really depend on r
        for p in student.condition_embedder.delta_embedder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return cfg, steps.far_student_from(cfg, student).eval()


def test_teacher_forced_loss_is_the_meanflow_loss_on_the_noisy_frames(tiny):
    """The packed FlowMapFn (context and clean copy as fixed points) gives exactly the stage-1 loss computed
    by hand from teacher_forced_forward: guidance fusion, central difference with the context fixed,
    weighting and rescaling, averaged over the noisy frames only."""
    cfg, model = tiny
    g = torch.Generator().manual_seed(1)
    b, num_chunks = 4, 3
    x, eps = torch.randn(b, 6, 4, 8, 8, generator=g), torch.randn(b, 6, 4, 8, 8, generator=g)
    cond, null = torch.randn(b, 8, 16, generator=g), torch.zeros(1, 8, 16)
    t = torch.tensor([0.9, 0.6, 0.5, 0.3])
    r = torch.tensor([0.2, 0.6, 0.1, 0.3])  # two free pairs, two diagonal ones
    settings = steps.stage1_settings(cfg)
    w, d = settings.guidance, settings.fd_step
    with torch.no_grad():
        got, figs = far.teacher_forced_flowmap_loss(model, x, cond, null, t, r, eps, num_chunks, CP, 2, settings)

        def u(noisy, tt, rr, c):  # context: chunk 0 clean; noisy: chunks 1, 2
            inputs = far.teacher_forced_inputs(x, torch.zeros_like(noisy), tt, rr, CP, 2)
            inputs.hidden_states[:, 2:] = noisy
            return far.teacher_forced_forward(model, inputs, c)

        clean, noise = x[:, 2:], eps[:, 2:]
        s = t.view(-1, 1, 1, 1, 1)
        z, v = (1 - s) * clean + s * noise, noise - clean
        pred = (u(z, t, r, cond) - (1 - w) * u(z, t, r, null.expand_as(cond))) / w
        dudt = (u(z + d * v, t + d, r, cond) - u(z - d * v, t - d, r, cond)) / (2 * d) / w
        target = v - (t - r).view(-1, 1, 1, 1, 1) * dudt
        per = losses.per_sample_mse(pred, target) * t_weight(t, settings.shift, settings.weight_a, settings.weight_b)
        want = losses.rescale_free_pairs(per, r == t).mean()
    assert got.item() > 0
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert abs(figs["loss_diag"] - per[r == t].mean().item()) <= 1e-5 * figs["loss_diag"]


def test_the_number_of_chunks_is_a_function_of_seed_stage_and_step(tiny):
    cfg, _ = tiny
    got = [steps.num_chunks_of(cfg, "stage1", i) for i in range(200)]
    assert got == [steps.num_chunks_of(cfg, "stage1", i) for i in range(200)]
    assert set(got) == {2, 3} and 0.6 < got.count(2) / 200 < 0.9  # P(2) = 0.5 + 0.5 / 2


def _count_calls(model):
    calls = {"student": 0, "cache": 0}

    def hook(_module, _args, kwargs):
        flag = kwargs.get("kv_cache_flag")
        calls["cache" if flag and flag["is_cache_step"] else "student"] += 1
    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("stage", ["stage2", "consistency"])
def test_student_calls_per_chunk_of_the_stage_rollouts(tiny, stage):
    """Counted on the step function the reference loop calls: per chunk 1 + [k > 0] + [k < N - 1] student
    calls for stage 2 (k + 1 for the consistency form), and a cache write after every chunk but the last."""
    cfg, model = tiny
    data = steps.PromptRows(torch.randn(8, 8, 16), torch.zeros(1, 8, 16))
    seen = set()
    for step in range(6):
        r = draws.rollout_draws(0, stage, step, 2, 8, (6, 4, 8, 8), cfg.model.shift, [1, 2, 3, 4], 0.02, 0.98,
                                consistency=stage == "consistency")
        calls, handle = _count_calls(model)
        try:
            with torch.no_grad():
                x = steps.student_rollout(cfg, model, data, r, stage == "consistency", steps.grad_calls_of(cfg.stage2))
        finally:
            handle.remove()
        n, k = r.num_steps, r.k
        per_chunk = k + 1 if stage == "consistency" else 1 + (k > 0) + (k < n - 1)
        assert calls == {"student": len(CP) * per_chunk, "cache": len(CP) - 1}, (n, k)
        assert x.shape == r.noise.shape and torch.isfinite(x).all()
        seen.add((n, k))
    assert len(seen) >= 3


def test_stage2_rollout_with_k_last_is_the_sampler_and_carries_gradient(tiny):
    cfg, model = tiny
    data = steps.PromptRows(torch.randn(4, 8, 16), torch.zeros(1, 8, 16))
    r = draws.rollout_draws(0, "stage2", 0, 2, 4, (6, 4, 8, 8), cfg.model.shift, [2], 0.02, 0.98)
    r = draws.RolloutDraws(2, 1, r.index, r.noise, r.renoise, r.s, r.eps)
    x = steps.student_rollout(cfg, model, data, r, False, steps.grad_calls_of(cfg.stage2))
    with torch.no_grad():
        ref = far.far_sample(model, r.noise, data.prompt_embeds[r.index], 2, cfg.model.shift, CP)
    assert torch.allclose(x.detach(), ref, atol=1e-6)
    x.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
