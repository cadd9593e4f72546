"""The stages of a run, in order, each writing its result into the run folder.

    teacher -> stage1 -> stage2 -> consistency -> eval -> export

A stage whose output folder is complete (it holds a `DONE` marker written last) is loaded,
not redone, so running again with the same run name continues where the last run stopped.
Training itself is delegated to a backend: `pipeline.reference` runs it in this process;
with `ray.backend=ray` the on-policy stages run on the Ray rollout fleet and learners
(`pipeline.onpolicy`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import reference, sampling
from pipeline.config import Config, save_config
from pipeline.data.schema import read_meta, read_null_embed, read_split
from pipeline.data.toy import make_toy_dataset
from pipeline.flowmap import models
from pipeline.evaluate import format_table
from pipeline.metrics import MetricsLog
from pipeline.tracking import Tracker, run_artifacts

DONE = "DONE"
NET_FOLDERS = {"teacher": "teacher", "student_stage1": "student_stage1", "student": "student_stage2",
               "consistency": "consistency"}
"""model name -> its folder in the run (`student/` itself is the exported pipeline folder)"""


@dataclass
class RunState:
    """What the stages hand each other."""

    cfg: Config
    run_dir: Path
    data_dir: Path
    log: MetricsLog
    nets: dict[str, torch.nn.Module] = field(default_factory=dict)
    _train: reference.TrainData | None = None

    @property
    def train(self) -> reference.TrainData:
        if self._train is None:
            self._train = reference.TrainData.from_dataset(read_split(self.data_dir, "train"),
                                                           read_null_embed(self.data_dir))
        return self._train


def prepare_data(cfg: Config) -> Path:
    """The dataset folder: the configured one (validated on read) or the toy world, made once."""
    if cfg.data.path:
        read_meta(cfg.data.path)  # clear error now if it is not a dataset
        return Path(cfg.data.path)
    t = cfg.data.toy
    name = f"toy-{t.frames}x{t.channels}x{t.height}x{t.width}-n{t.num_train}-s{t.seed}"
    return make_toy_dataset(Path(cfg.run.output_dir) / "data" / name, t)


def check_data_fits_model(cfg: Config, data_dir: Path) -> None:
    """Latent channels and prompt-embedding width of the dataset must match the model."""
    meta = read_meta(data_dir)
    arch = models.arch_config(cfg.model.size)
    channels, width = int(meta["latent_shape"][1]), int(meta["embed_shape"][1])
    if channels != arch["in_channels"]:
        raise ValueError(f"dataset {data_dir} has {channels} latent channels but model.size={cfg.model.size} "
                         f"expects {arch['in_channels']}")
    if width != arch["text_dim"]:
        raise ValueError(f"dataset {data_dir} has prompt embeddings of width {width} but model.size="
                         f"{cfg.model.size} expects text_dim {arch['text_dim']} (set data.toy.embed_dim)")


def _done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def _save(model: torch.nn.Module, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / DONE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load(st: RunState, key: str) -> bool:
    """Put the network `key` into `st.nets` if it is there to load (already in memory, the
    configured teacher folder, or a finished stage's folder); False if it must be trained."""
    if key in st.nets:
        return True
    expect = "WanTransformer3DModel" if key == "teacher" else "AnyFlowTransformer3DModel"
    if key == "teacher" and st.cfg.model.teacher_path:
        st.nets[key] = models.load_transformer(st.cfg.model.teacher_path, expect=expect)
        return True
    folder = st.run_dir / NET_FOLDERS[key]
    if not _done(folder):
        return False
    st.nets[key] = models.load_transformer(folder, expect=expect)
    return True


def _need(st: RunState, name: str) -> torch.nn.Module:
    if not _load(st, name):
        raise RuntimeError(f"stage needs the {name} model: run its stage first "
                           f"(add it to run.stages) or point model.teacher_path at one")
    return st.nets[name]


def stage_teacher(st: RunState) -> None:
    if not _load(st, "teacher"):
        st.nets["teacher"] = reference.train_teacher(st.cfg, st.train, st.log)
        _save(st.nets["teacher"], st.run_dir / NET_FOLDERS["teacher"])


def stage_stage1(st: RunState) -> None:
    if not _load(st, "student_stage1"):
        st.nets["student_stage1"] = reference.train_stage1(st.cfg, _need(st, "teacher"), st.train, st.log)
        _save(st.nets["student_stage1"], st.run_dir / NET_FOLDERS["student_stage1"])


def _stage2_like(st: RunState, stage: str, key: str) -> None:
    if _load(st, key):
        return
    if st.cfg.ray.backend == "ray":
        from pipeline import onpolicy  # imports Ray: only when the Ray backend is asked for

        student, critic = onpolicy.train_stage2(st.cfg, stage, _need(st, "student_stage1"), _need(st, "teacher"),
                                                st.data_dir, st.log)
    else:
        student, critic = reference.train_stage2(st.cfg, stage, _need(st, "student_stage1"), _need(st, "teacher"),
                                                 st.train, st.log)
    st.nets[key] = student
    _save(critic, st.run_dir / f"critic_{stage}")
    _save(student, st.run_dir / NET_FOLDERS[key])


def stage_stage2(st: RunState) -> None:
    _stage2_like(st, "stage2", "student")


def stage_consistency(st: RunState) -> None:
    _stage2_like(st, "consistency", "consistency")


def stage_eval(st: RunState) -> None:
    for name in NET_FOLDERS:
        _load(st, name)
    _need(st, "teacher")
    heldout = read_split(st.data_dir, "heldout")
    result = sampling.evaluate_run(st.cfg, st.nets, heldout, read_null_embed(st.data_dir), st.run_dir)
    print(format_table(result), flush=True)


def stage_export(st: RunState) -> None:
    for name in ("student", "student_stage1"):
        if _load(st, name):
            sampling.export_student(st.cfg, st.nets[name], st.run_dir / "student")
            return
    raise RuntimeError("export needs a trained student: run stage1 or stage2 first")


STAGE_FUNCS = {"teacher": stage_teacher, "stage1": stage_stage1, "stage2": stage_stage2,
               "consistency": stage_consistency, "eval": stage_eval, "export": stage_export}


def run_stages(cfg: Config) -> Path:
    """Run the configured stages; returns the run folder."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    data_dir = prepare_data(cfg)
    check_data_fits_model(cfg, data_dir)
    totals = {"teacher": cfg.teacher.steps, "stage1": cfg.stage1.steps, "stage2": cfg.stage2.steps,
              "consistency": cfg.consistency.steps}
    tracker = Tracker.start(cfg, run_dir, tracking_uri=cfg.run.tracking_uri or None) if cfg.run.track else None
    log = MetricsLog(run_dir / "metrics.jsonl", totals, sinks=[tracker.on_record] if tracker else [])
    st = RunState(cfg, run_dir, data_dir, log)
    status = "FAILED"
    try:
        for stage in cfg.run.stages:
            t0 = time.time()
            print(f"== {stage}", flush=True)
            STAGE_FUNCS[stage](st)
            print(f"== {stage} done in {time.time() - t0:.0f}s", flush=True)
        status = "FINISHED"
    finally:
        log.close()
        if tracker:
            if (run_dir / "eval.json").is_file():
                tracker.log_eval(run_dir / "eval.json")
            tracker.log_artifacts(run_artifacts(run_dir))
            tracker.end(status)
    return run_dir
