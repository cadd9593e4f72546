"""Learner checkpoints with real DeepSpeed engines (one gloo rank in this process): a resumed engine
steps exactly like the one that never stopped, under ZeRO-2 and ZeRO-3, with and without LoRA
(then the files hold the adapters only); bad checkpoints are named."""

import json
import math
import os
import socket

import pytest
import torch

from pipeline.config import OptimConfig
from pipeline.flowmap import lora, models
from pipeline.flowmap.models import StudentFn

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ[k] = v
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


OPTIM = OptimConfig(lr=3e-3, warmup=4, ema=0.9, ema_start=1)
LORA = lora.LoraSettings(rank=2, alpha=4.0)


def _engine(zero: int, settings: lora.LoraSettings | None = None):
    from learners import deepspeed_setup as ds

    student = models.student_from_teacher(models.build_teacher("tiny", seed=0))
    return ds.wrap(student, OPTIM, zero, 2, keep_ema=True, lora=settings,
                   lora_init=lora.init_generator(0, "stage2", "student"))


def _trainable(engine, ema):
    from learners.checkpoint import Trainable

    fn = StudentFn(engine)
    x, t, cond = torch.zeros(1, 4, 4, 8, 8), torch.full((1,), 0.5), torch.zeros(1, 8, 16)
    return {"student": Trainable(engine, ema, lambda: fn(x, t, t, cond))}


def _step(engine, ema, step: int):
    g = torch.Generator().manual_seed(step)
    x, cond = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 8, 16, generator=g)
    t, r = torch.rand(2, generator=g), torch.rand(2, generator=g) * 0.5
    loss = (StudentFn(engine)(x, t, r, cond) - x).square().mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine.module, step)
    return loss.item()


@pytest.mark.parametrize("zero", [2, 3])
def test_a_resumed_engine_steps_exactly_like_the_uninterrupted_one(process_group, tmp_path, zero):
    from learners import checkpoint
    from learners import deepspeed_setup as ds

    engine, ema = _engine(zero)
    losses = [_step(engine, ema, i) for i in range(3)]
    checkpoint.save(tmp_path / "ck", _trainable(engine, ema), {"stage": "stage1", "step": 3}, zero, 0)
    losses += [_step(engine, ema, i) for i in range(3, 6)]
    with ds.full_params(engine, zero):
        want = ds.state_dict_of(engine)
    want_ema = {k: v.clone() for k, v in ema.state_dict().items()}

    engine2, ema2 = _engine(zero)
    meta = checkpoint.load(tmp_path / "ck", _trainable(engine2, ema2), zero, 0)
    assert meta["step"] == 3 and meta["stage"] == "stage1"
    resumed = [_step(engine2, ema2, i) for i in range(3, 6)]
    assert resumed == losses[3:]
    with ds.full_params(engine2, zero):
        got = ds.state_dict_of(engine2)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k in want_ema:
        assert torch.equal(ema2.state_dict()[k], want_ema[k]), k


@pytest.mark.parametrize("zero", [2, 3])
def test_a_resumed_lora_engine_gets_back_its_adapters_and_moments_and_steps_exactly_like_the_uninterrupted_one(
        process_group, tmp_path, zero):
    from learners import checkpoint
    from learners import deepspeed_setup as ds
    from safetensors.torch import load_file

    engine, ema = _engine(zero, LORA)
    adapters = set(lora.adapter_parameters(engine.module))
    losses = [_step(engine, ema, i) for i in range(3)]
    folder = checkpoint.save(tmp_path / "ck", _trainable(engine, ema), {"stage": "stage2", "step": 3}, zero, 0)
    # the files hold the adapters (and their moments) only: the base weights are the stage's input
    assert set(load_file(folder / "student.safetensors")) == adapters
    assert set(load_file(folder / "student.ema.safetensors")) == adapters
    assert set(load_file(folder / "student.optim.safetensors")) == {f"{a}::{m}" for a in adapters
                                                                    for m in checkpoint.MOMENTS}
    losses += [_step(engine, ema, i) for i in range(3, 6)]
    with ds.full_params(engine, zero):
        want = lora.adapter_state_dict(engine.module)
    want_ema = lora.adapter_state_dict(ema.model)

    engine2, ema2 = _engine(zero, LORA)  # fresh adapters (B = 0): the resumed losses need the checkpoint's
    checkpoint.load(folder, _trainable(engine2, ema2), zero, 0)
    assert [_step(engine2, ema2, i) for i in range(3, 6)] == losses[3:]
    with ds.full_params(engine2, zero):
        got = lora.adapter_state_dict(engine2.module)
    assert all(torch.equal(got[k], want[k]) for k in want)
    got_ema = lora.adapter_state_dict(ema2.model)
    assert all(torch.equal(got_ema[k], want_ema[k]) for k in want_ema)
    # a stage configured without LoRA (or with another rank) does not take this checkpoint
    for settings in (None, lora.LoraSettings(rank=3, alpha=4.0)):
        with pytest.raises(checkpoint.CheckpointError, match="trained with LoRA adapters rank 2"):
            checkpoint.load(folder, _trainable(*_engine(zero, settings)), zero, 0)


def test_files_are_safetensors_and_json_only(process_group, tmp_path):
    from learners import checkpoint

    engine, ema = _engine(2)
    _step(engine, ema, 0)
    folder = checkpoint.save(tmp_path / "ck", _trainable(engine, ema), {"stage": "teacher", "step": 1}, 2, 0)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["meta.json", "rng.safetensors", "student.ema.safetensors", "student.optim.safetensors",
                     "student.safetensors"]
    assert json.loads((folder / "meta.json").read_text())["networks"]["student"]["optimizer_steps"] == 1


def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error_naming_it(process_group, tmp_path):
    from learners import checkpoint

    engine, ema = _engine(2)
    _step(engine, ema, 0)
    folder = checkpoint.save(tmp_path / "ck", _trainable(engine, ema), {"stage": "teacher", "step": 1}, 2, 0)
    # a truncated weights file
    weights = folder / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="student.safetensors.*corrupt"):
        checkpoint.load(folder, _trainable(*_engine(2)), 2, 0)
    # another format, and no meta at all
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="format 99"):
        checkpoint.read_meta(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{folder}.*no meta.json"):
        checkpoint.read_meta(folder)


def test_a_checkpoint_of_another_architecture_is_refused(process_group, tmp_path):
    from learners import checkpoint
    from learners import deepspeed_setup as ds

    engine, ema = _engine(2)
    _step(engine, ema, 0)
    folder = checkpoint.save(tmp_path / "ck", _trainable(engine, ema), {"stage": "teacher", "step": 1}, 2, 0)
    other = models.student_from_teacher(models.build_teacher({"num_layers": 1}, seed=0))
    e2, ema2 = ds.wrap(other, OPTIM, 2, 2, keep_ema=True)
    with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
        checkpoint.load(folder, _trainable(e2, ema2), 2, 0)


def test_the_run_checks_its_newest_checkpoint_before_any_work(process_group, tmp_path):
    """A truncated tensor file in the newest Ray Train checkpoint stops the run at once with an
    InputError naming the file (exit status 2 at the entry point), instead of a fresh start."""
    from learners import checkpoint
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.guard import InputError

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=resumable"])
    storage = distributed.storage_of(cfg) / "learners"
    engine, ema = _engine(2)
    _step(engine, ema, 0)
    for stamp in ("2026-11-26_10-00-00.000001", "2026-11-26_10-05-00.000001"):
        checkpoint.save(storage / f"checkpoint_{stamp}", _trainable(engine, ema), {"stage": "teacher", "step": 1}, 2, 0)
    newest = storage / "checkpoint_2026-11-26_10-05-00.000001"
    (storage / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own file, not a checkpoint
    assert distributed.check_checkpoint(cfg) == newest
    moments = newest / "student.optim.safetensors"
    moments.write_bytes(moments.read_bytes()[:-10])
    with pytest.raises(InputError, match=f"{moments} is corrupt.*resume from it"):
        distributed.check_checkpoint(cfg)


def test_one_cpu_learner_does_not_build_the_shared_memory_op(process_group):
    # it would all-reduce with nobody; building it costs a fresh machine about a minute of start-up
    engine, ema = _engine(2)
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    assert math.isfinite(_step(engine, ema, 0))  # and it trains without it
