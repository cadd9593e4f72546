"""Bad input at every entry point: each is one line on stderr naming the thing, and exit status 2
before any work starts (the run folder is not even made). Bad training steps: skipped and
counted, and exit status 3 with one line naming the stage, the step and the reason after
run.max_bad_steps in a row. Every test is a real run of `pipeline.run.main`, in process."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.flowmap import losses, models
from pipeline.metrics import BAD_IN_A_ROW, CRITIC_SKIPPED_STEPS, SKIPPED_STEPS, read_metrics
from pipeline.run import main

TINY = [
    "run.track=false", "model.size=tiny", "model.shift=3.0", "ray.backend=reference",
    "data.toy.frames=4", "data.toy.height=8", "data.toy.width=8", "data.toy.num_train=64",
    "data.toy.num_heldout=16", "data.toy.embed_dim=16", "data.toy.shard_rows=32",
    "teacher.steps=3", "teacher.batch_size=4", "teacher.optim.warmup=1",
    "stage1.steps=2", "stage1.batch_size=4", "stage2.steps=3", "stage2.batch_size=4",
    "stage2.num_steps_choices=[1, 2]", "run.stages=[teacher]", "run.name=bad",
]


def run(capsys, tmp_path, *args) -> tuple[int, str]:
    """main() on the tiny world; (exit status, stderr)."""
    rc = main([*TINY, f"run.output_dir={tmp_path / 'runs'}", *args])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one `error:` line of stderr (and it is the last line, with no traceback anywhere)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def assert_bad_input(capsys, tmp_path, *args, names: tuple[str, ...]) -> str:
    rc, err = run(capsys, tmp_path, *args)
    line = error_line(err)
    assert rc == 2, err
    for thing in names:
        assert str(thing) in line, (thing, line)
    assert not (tmp_path / "runs" / "bad").exists()  # no work started: not even the run folder
    return line


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override,key", [
    ("bogus.key=1", "bogus: unknown key"),
    ("teacher.nope=1", "teacher.nope: unknown key"),
    ("teacher.steps=abc", "teacher.steps: expected an integer"),
    ("run.track=maybe", "run.track: expected true or false"),
    ("stage2.num_steps_choices=4", "stage2.num_steps_choices: expected a list"),
    ("ray.max_policy_lag=-1", "ray.max_policy_lag: must be >= 0"),
    ("ray.lag_target=fresh", "ray.lag_target: must be"),
    ("ray.rollout_actors=0", "ray.rollout_actors: must be >= 1"),
    ("ray.learners=0", "ray.learners: must be >= 1"),
    ("stage2.num_steps_choices=[2, 0, 4]", "stage2.num_steps_choices"),
    ("eval.steps=[1, 0]", "eval.steps"),
    ("run.max_bad_steps=0", "run.max_bad_steps: must be >= 1"),
    ("data.validate=some", "data.validate"),
])
def test_bad_config_key_or_value(capsys, tmp_path, override, key):
    assert_bad_input(capsys, tmp_path, override, names=(key,))
    assert not (tmp_path / "runs").exists()  # a config error stops before even the toy data


@pytest.mark.parametrize("overrides,names", [
    (["stage2.lora_rank=-1"], ["stage2.lora_rank: must be >= 0"]),
    (["stage2.lora_rank=2.5"], ["stage2.lora_rank: expected an integer"]),
    (["consistency.lora_alpha=-1"], ["consistency.lora_alpha: must be >= 0"]),
    (["stage2.lora_targets=to_q"], ["stage2.lora_targets: expected a list"]),
    (["stage2.lora_rank=4", "stage2.lora_targets=[]"], ["stage2.lora_targets: must be a non-empty list"]),
    (["stage2.lora_rank=4", "stage2.lora_targets=[to_q, attn1.to_qq]"],
     ["stage2.lora_targets: ['attn1.to_qq'] name no layer of the student"]),
    (["consistency.lora_rank=4", "consistency.lora_targets=[norm2]"],
     ["consistency.lora_targets:", "blocks.0.norm2", "not a linear layer"]),
    (["stage2.lora_rank=4", "stage2.lora_targets=[delta_embedder.linear_1]"],
     ["stage2.lora_targets:", "select no layer of WanTransformer3DModel (the critic)"]),
])
def test_bad_lora_config_is_named(capsys, tmp_path, overrides, names):
    assert_bad_input(capsys, tmp_path, *overrides, names=tuple(names))


def test_lora_config_that_fits_both_networks_is_taken():
    cfg = load_config(None, [*TINY, "stage2.lora_rank=4", "stage2.lora_targets=[attn1.to_q, ffn.net.2]"])
    assert (cfg.stage2.lora_rank, cfg.stage2.lora_targets) == (4, ["attn1.to_q", "ffn.net.2"])
    assert cfg.consistency.lora_rank == 0  # its own section


# ----------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan") / "teacher"
    models.build_teacher("tiny", seed=0).save_pretrained(folder)
    return folder


def _broken(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights, config = dst / "diffusion_pytorch_model.safetensors", dst / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no weights":
        weights.unlink()
    elif how == "garbage config":
        config.write_text("{not json")
    elif how == "wrong class":
        config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "AutoencoderKLWan"}))
    elif how == "student class":
        shutil.rmtree(dst)
        models.student_from_teacher(models.load_transformer(src)).save_pretrained(dst)
    elif how == "wrong shapes":
        config.write_text(json.dumps({**json.loads(config.read_text()), "ffn_dim": 64}))
    return dst


def test_missing_teacher_folder(capsys, tmp_path):
    assert_bad_input(capsys, tmp_path, f"model.teacher_path={tmp_path / 'nowhere'}",
                     names=("model.teacher_path", tmp_path / "nowhere", "does not exist"))


@pytest.mark.parametrize("how,says", [
    ("truncated", "Unable to load weights"),
    ("no weights", "no file named"),
    ("garbage config", "not valid JSON"),
    ("wrong class", "AutoencoderKLWan"),
    ("student class", "expected a WanTransformer3DModel"),
    ("wrong shapes", "expected shape"),
])
def test_malformed_teacher_folder(capsys, tmp_path, wan_folder, how, says):
    folder = _broken(wan_folder, tmp_path / "teacher", how)
    assert_bad_input(capsys, tmp_path, f"model.teacher_path={folder}", names=("model.teacher_path", folder, says))


def test_teacher_that_does_not_fit_the_dataset(capsys, tmp_path):
    folder = tmp_path / "wide"
    models.build_teacher({"text_dim": 24}, seed=0).save_pretrained(folder)
    assert_bad_input(capsys, tmp_path, f"model.teacher_path={folder}",
                     names=("model.teacher_path", "prompt embeddings of width 16", "text_dim 24"))


def test_dataset_that_does_not_fit_model_size(capsys, tmp_path):
    assert_bad_input(capsys, tmp_path, "data.toy.embed_dim=8", names=("width 8", "model.size=tiny", "text_dim 16"))


def test_a_broken_finished_stage_in_the_run_folder(capsys, tmp_path):
    assert run(capsys, tmp_path)[0] == 0  # a finished teacher stage
    weights = tmp_path / "runs" / "bad" / "teacher" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\0" * 100)
    rc, err = run(capsys, tmp_path, "run.stages=[teacher, stage1]")
    line = error_line(err)
    assert rc == 2
    assert "teacher" in line and str(weights.parent) in line and "to train it again" in line
    assert not (tmp_path / "runs" / "bad" / "student_stage1").exists()


def test_a_stage_whose_input_model_is_nowhere(capsys, tmp_path):
    assert_bad_input(capsys, tmp_path, "run.stages=[stage2]",
                     names=("run.stages", "stage2 needs the student_stage1 model"))


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from pipeline.stages import prepare_data

    out = tmp_path_factory.mktemp("toy")
    return prepare_data(load_config(None, [*TINY, f"run.output_dir={out}"]))


def _copy(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = shutil.copytree(dataset, tmp_path / "data")
    return data, data / "train" / "part-00001.parquet"


def _rewrite(shard: Path, edit) -> None:
    table = pq.read_table(shard)
    pq.write_table(edit(table), shard)


def _set_row(table: pa.Table, column: str, row: int, edit) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = edit(values[row])
    return table.set_column(table.schema.get_field_index(column), column,
                            pa.array(values, type=table.schema.field(column).type))


def test_missing_dataset_folder(capsys, tmp_path):
    assert_bad_input(capsys, tmp_path, f"data.path={tmp_path / 'nodata'}",
                     names=("data.path", tmp_path / "nodata", "dataset folder not found"))


@pytest.mark.parametrize("validate", ["full", "schema"])
def test_unreadable_parquet_shard(capsys, tmp_path, dataset, validate):
    data, shard = _copy(dataset, tmp_path)
    shard.write_bytes(b"this is not a parquet file" * 10)
    assert_bad_input(capsys, tmp_path, f"data.path={data}", f"data.validate={validate}",
                     names=("data.path", shard, "not a readable Parquet file"))


@pytest.mark.parametrize("validate", ["full", "schema"])
def test_shard_missing_a_column(capsys, tmp_path, dataset, validate):
    data, shard = _copy(dataset, tmp_path)
    _rewrite(shard, lambda t: t.drop_columns(["prompt_embeds"]))
    assert_bad_input(capsys, tmp_path, f"data.path={data}", f"data.validate={validate}",
                     names=("data.path", shard, "missing column 'prompt_embeds'"))


@pytest.mark.parametrize("validate", ["full", "schema"])
def test_shard_with_a_wrong_column_type(capsys, tmp_path, dataset, validate):
    data, shard = _copy(dataset, tmp_path)
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("sample_id"), "sample_id",
                                           t.column("sample_id").cast(pa.float64())))
    assert_bad_input(capsys, tmp_path, f"data.path={data}", f"data.validate={validate}",
                     names=("data.path", shard, "column 'sample_id' has Arrow type double"))


def test_shard_row_with_a_wrong_shape(capsys, tmp_path, dataset):
    data, shard = _copy(dataset, tmp_path)
    _rewrite(shard, lambda t: _set_row(t, "latents", 5, lambda b: b[:-8]))
    assert_bad_input(capsys, tmp_path, f"data.path={data}",
                     names=("data.path", f"{shard}, row 5", "latents has"))


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_dataset_with_non_finite_values(capsys, tmp_path, dataset, value, kind):
    data, shard = _copy(dataset, tmp_path)

    def poison(blob: bytes) -> bytes:
        x = np.frombuffer(blob, dtype="<f4").copy()
        x[7] = value
        return x.tobytes()

    _rewrite(shard, lambda t: _set_row(t, "latents", 3, poison))
    assert_bad_input(capsys, tmp_path, f"data.path={data}",
                     names=("data.path", f"{shard}, row 3", f"non-finite values ({kind})"))


def test_a_good_dataset_folder_runs(capsys, tmp_path, dataset):
    data, _ = _copy(dataset, tmp_path)
    for validate in ("full", "schema"):
        rc, err = run(capsys, tmp_path, f"data.path={data}", f"data.validate={validate}")
        assert rc == 0, err


# ----------------------------------------------------------------------------- bad training steps


def _nan_at(monkeypatch, name: str, bad_calls):
    """Make losses.<name> return NaN (keeping the graph) at the given 0-based call numbers."""
    real, calls = getattr(losses, name), []

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        bad = len(calls) in bad_calls
        calls.append(bad)
        if not bad:
            return out
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    monkeypatch.setattr(losses, name, patched)
    return calls


def _records(tmp_path, stage):
    return [r for r in read_metrics(tmp_path / "runs" / "bad" / "metrics.jsonl") if r["stage"] == stage]


def test_nan_loss_steps_are_skipped_and_counted_and_training_goes_on(capsys, tmp_path, monkeypatch):
    _nan_at(monkeypatch, "flow_matching_loss", {2, 3})
    rc, err = run(capsys, tmp_path, "teacher.steps=6", "run.max_bad_steps=3")
    assert rc == 0, err
    recs = _records(tmp_path, "teacher")
    assert [r["step"] for r in recs] == list(range(6))  # a skipped step keeps its number; none is redone
    assert [r[SKIPPED_STEPS] for r in recs] == [0, 0, 1, 2, 2, 2]
    assert [r[BAD_IN_A_ROW] for r in recs] == [0, 0, 1, 2, 0, 0]
    assert [np.isnan(r["grad_norm/teacher"]) for r in recs] == [False, False, True, True, False, False]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "teacher, step 2: skipped, non-finite loss" in warnings[0]
    assert (tmp_path / "runs" / "bad" / "teacher" / "DONE").is_file()


def test_nan_loss_in_a_row_aborts_with_exit_3(capsys, tmp_path, monkeypatch):
    _nan_at(monkeypatch, "flow_matching_loss", set(range(1, 100)))
    rc, err = run(capsys, tmp_path, "teacher.steps=20", "run.max_bad_steps=3")
    line = error_line(err)
    assert rc == 3
    assert line.startswith("error: teacher, step 3: training aborted after 3 bad steps in a row")
    assert "run.max_bad_steps=3" in line and "non-finite loss (nan)" in line
    assert [r["step"] for r in _records(tmp_path, "teacher")] == [0, 1, 2]  # stopped at the 3rd bad step
    assert not (tmp_path / "runs" / "bad" / "teacher").exists()


def test_aborted_tracked_run_ends_failed_in_mlflow(capsys, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    _nan_at(monkeypatch, "flow_matching_loss", set(range(100)))
    rc, err = run(capsys, tmp_path, "teacher.steps=10", "run.max_bad_steps=2", "run.track=true")
    assert rc == 3 and "teacher, step 1: training aborted" in error_line(err)
    run_id = json.loads((tmp_path / "runs" / "bad" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, f"teacher/{SKIPPED_STEPS}")] == [1]


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("-inf"), "Inf")])
def test_non_finite_batch_is_skipped_then_aborts(capsys, tmp_path, monkeypatch, value, kind):
    from pipeline import reference

    real, calls = reference.TrainData.batch, []

    def batch(self, index, drop=None):
        x, cond = real(self, index, drop)
        calls.append(1)
        if len(calls) == 2 or len(calls) >= 4:  # steps 1, 3, 4, 5, ...
            x = x.clone()
            x[0, 0, 0, 0, 0] = value
        return x, cond

    monkeypatch.setattr(reference.TrainData, "batch", batch)
    rc, err = run(capsys, tmp_path, "teacher.steps=20", "run.max_bad_steps=3")
    line = error_line(err)
    assert rc == 3
    assert "teacher, step 5: training aborted after 3 bad steps in a row" in line
    assert f"non-finite values in the batch's x (1 {kind} of" in line
    assert [r[SKIPPED_STEPS] for r in _records(tmp_path, "teacher")] == [0, 1, 1, 2, 3]


def test_stage1_and_stage2_steps_are_guarded(capsys, tmp_path, monkeypatch):
    # stage 2: the generator's DMD loss is NaN at step 1 (skipped, counted); the critic trains on
    calls = _nan_at(monkeypatch, "dmd_generator_loss", {1})
    rc, err = run(capsys, tmp_path, "run.stages=[teacher, stage1, stage2]", "teacher.steps=1", "stage1.steps=1",
                  "stage2.steps=2", "stage2.num_steps_choices=[1]", "stage2.batch_size=2")
    assert rc == 0, err
    recs = _records(tmp_path, "stage2")
    assert len(calls) == 2 and [r[SKIPPED_STEPS] for r in recs] == [0, 1]
    assert [r[CRITIC_SKIPPED_STEPS] for r in recs] == [0, 0]
    assert "stage2 student, step 1: skipped, non-finite loss" in err
    # stage 1 (a fresh run name): every loss NaN -> abort naming the stage
    _nan_at(monkeypatch, "forward_flowmap_loss", set(range(100)))
    rc, err = run(capsys, tmp_path, "run.stages=[teacher, stage1]", "run.name=bad1", "run.max_bad_steps=2",
                  "stage1.steps=5")
    assert rc == 3 and "error: stage1 student, step 1: training aborted after 2 bad steps" in error_line(err)


def test_non_finite_gradient_norm_is_a_bad_step(capsys, tmp_path, monkeypatch):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    real = losses.flow_matching_loss
    monkeypatch.setattr(losses, "flow_matching_loss", lambda *a, **k: NanGrad.apply(real(*a, **k)))
    rc, err = run(capsys, tmp_path, "teacher.steps=5", "run.max_bad_steps=2")
    assert rc == 3 and "teacher, step 1: training aborted" in error_line(err)
    assert "non-finite gradient norm (nan)" in err
