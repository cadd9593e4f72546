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

from pipeline import reference, sampling, steps
from pipeline.config import Config, save_config
from pipeline.data.schema import DatasetError, read_meta, read_null_embed, read_split, validate_dataset
from pipeline.data.toy import make_toy_dataset
from pipeline.flowmap import models
from pipeline.guard import InputError
from pipeline.evaluate import format_table
from pipeline.metrics import MetricsLog
from pipeline.teachers import StaleTeacherError, check_stamp, teacher_path
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
    _train: steps.TrainData | None = None
    on_ray: dict[str, float] = field(default_factory=dict)
    """training stage -> its seconds, for the stages a Ray session trained (`train_on_ray`)"""

    @property
    def train(self) -> steps.TrainData:
        if self._train is None:
            self._train = steps.TrainData.from_dataset(read_split(self.data_dir, "train"),
                                                       read_null_embed(self.data_dir))
        return self._train


def prepare_data(cfg: Config) -> Path:
    """The dataset folder: the configured one (checked, see `check_dataset`) or the toy world,
    made once (a cached toy dataset is fully validated before it is reused)."""
    if cfg.data.path:
        try:
            check_dataset(cfg.data.path, cfg.data.validate)
        except DatasetError as exc:
            raise InputError(f"data.path: {exc}") from None
        return Path(cfg.data.path)
    t = cfg.data.toy
    name = f"toy-{t.frames}x{t.channels}x{t.height}x{t.width}-n{t.num_train}-s{t.seed}"
    return make_toy_dataset(Path(cfg.run.output_dir) / "data" / name, t)


def check_dataset(folder: str | Path, mode: str = "full") -> dict:
    """Check a dataset folder before any work; returns its dataset.json or raises DatasetError.

    "full": `validate_dataset` (every row of every file; about 0.4 s for the default toy world,
    one read of the whole dataset in general). "schema": dataset.json, the null prompt, and
    every shard's Parquet footer (readable, required columns with their Arrow types, row counts
    adding up to dataset.json's), without reading the rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.schema import SHARD_GLOB, SPLITS, shard_paths, validate_batch

    folder = Path(folder)
    meta = read_meta(folder)
    if mode == "full":
        validate_dataset(folder)
        return meta
    for split in SPLITS:
        paths, rows = shard_paths(folder, split), 0
        if not paths:
            raise DatasetError(f"{folder / split}: empty split (no {SHARD_GLOB} files)")
        for path in paths:
            try:
                pf = pq.ParquetFile(path)
                empty = pf.schema_arrow.empty_table()
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{path}: not a readable Parquet file ({exc})".replace("\n", " ")) from None
            validate_batch(empty, meta["latent_shape"], meta["embed_shape"], where=str(path))
            rows += pf.metadata.num_rows
        if rows != meta["num_rows"][split]:
            raise DatasetError(f"{folder / split}: {rows} rows in shards, {folder / 'dataset.json'} says "
                               f"{meta['num_rows'][split]}")
    read_null_embed(folder)
    return meta


def _fits(what: str, arch: dict, meta: dict, data_dir: Path, hint: str = "") -> None:
    """The dataset's latent channels, prompt width and frame size must fit a model config."""
    frames, channels, height, width = (int(v) for v in meta["latent_shape"])
    text = int(meta["embed_shape"][1])
    if channels != arch["in_channels"]:
        raise InputError(f"dataset {data_dir} has {channels} latent channels but {what} expects "
                         f"{arch['in_channels']}")
    if text != arch["text_dim"]:
        raise InputError(f"dataset {data_dir} has prompt embeddings of width {text} but {what} expects "
                         f"text_dim {arch['text_dim']}{hint}")
    patch = tuple(arch.get("patch_size") or (1, 1, 1))
    if any(n % p for n, p in zip((frames, height, width), patch)):
        raise InputError(f"dataset {data_dir} has latents of {frames}x{height}x{width} (frames x height x width), "
                         f"not divisible by the patch size {list(patch)} of {what}")


def check_data_fits_model(cfg: Config, data_dir: Path) -> None:
    """Latent channels, prompt-embedding width and frame size of the dataset must fit the model (and, for a
    causal run, the chunk partition and the compressed patch)."""
    meta = read_meta(data_dir)
    _fits(f"model.size={cfg.model.size}", models.arch_config(cfg.model.size), meta, data_dir,
          " (set data.toy.embed_dim)" if not cfg.data.path else "")
    if cfg.model.causal:
        frames, _, height, width = (int(v) for v in meta["latent_shape"])
        cp, cps = cfg.model.far.chunk_partition, cfg.model.far.compressed_patch_size
        if sum(cp) != frames:
            raise InputError(f"model.far.chunk_partition: adds up to {sum(cp)} latent frames but the clips of "
                             f"{data_dir} have {frames}")
        if height % cps[1] or width % cps[2]:
            raise InputError(f"model.far.compressed_patch_size: {cps} does not divide the {height}x{width} latents "
                             f"of {data_dir}")


def _done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def _save(model: torch.nn.Module, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / DONE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _given_teacher(cfg: Config) -> Path | None:
    """The teacher folder the config names (model.teacher_path; "auto" resolved), or None."""
    return teacher_path(cfg.model.size, cfg.model.teacher_path, cfg.data.path)


def _teacher_what(cfg: Config) -> str:
    if cfg.model.teacher_path == "auto":
        return "model.teacher_path=auto (the shipped toy teacher)"
    return "model.teacher_path"


def _source(cfg: Config, run_dir: Path, key: str) -> Path | None:
    """The folder the network `key` is loaded from (the configured teacher folder, or a finished
    stage's folder in the run); None if there is none (it must be trained)."""
    if key == "teacher" and _given_teacher(cfg) is not None:
        return _given_teacher(cfg)
    folder = run_dir / NET_FOLDERS[key]
    return folder if _done(folder) else None


def check_teacher_world(cfg: Config) -> None:
    """A configured teacher that carries a toy-world stamp (the shipped one always does) must have been
    made for this run's toy world; InputError naming the command that rebuilds it otherwise."""
    folder = _given_teacher(cfg)
    if folder is None or cfg.data.path:
        return
    try:
        check_stamp(folder, cfg.data.toy, cfg.model.size, required=cfg.model.teacher_path == "auto")
    except StaleTeacherError as exc:
        raise InputError(f"{_teacher_what(cfg)}: {exc}") from None


def _load_checked(cfg: Config, run_dir: Path, key: str) -> torch.nn.Module:
    """Load the network `key` from its `_source`; any problem is an InputError naming the folder."""
    folder = _source(cfg, run_dir, key)
    expect = ("WanTransformer3DModel" if key == "teacher" else
              "AnyFlowFARTransformer3DModel" if cfg.model.causal else "AnyFlowTransformer3DModel")
    if key == "teacher" and _given_teacher(cfg) is not None:
        what, fix = _teacher_what(cfg), ""
    else:
        what, fix = f"the finished {key} model of the run", f" (delete {folder} to train it again)"
    try:
        model = models.load_transformer(folder, expect=expect)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what}: {str(exc).strip()}{fix}") from None
    if cfg.model.causal and key != "teacher":
        f, got = cfg.model.far, model.config
        if got.full_chunk_limit != f.full_chunk_limit or list(got.compressed_patch_size) != f.compressed_patch_size:
            raise InputError(f"{what}: made with full_chunk_limit {got.full_chunk_limit} and compressed patch "
                             f"{list(got.compressed_patch_size)}, the config has model.far.full_chunk_limit="
                             f"{f.full_chunk_limit} and compressed_patch_size={f.compressed_patch_size}{fix}")
        steps.prepared(cfg, model)
    return model


STAGE_OUTPUT = {"teacher": "teacher", "stage1": "student_stage1", "stage2": "student", "consistency": "consistency"}
"""training stage -> the network it makes"""
STAGE_INPUTS = {"teacher": (), "stage1": ("teacher",), "stage2": ("student_stage1", "teacher"),
                "consistency": ("student_stage1", "teacher")}
"""training stage -> the networks it needs when it trains"""


def networks_to_load(cfg: Config, run_dir: Path) -> list[str]:
    """The networks the configured stages will load from folders, in order of first use.

    Follows what the stages do: a training stage whose result is there loads it, otherwise it
    trains and needs its inputs; eval loads every network there is (the teacher is required);
    export loads the stage-2 student, else the stage-1 one. Raises InputError if a stage needs a
    network that is neither there nor made by an earlier stage of the run.
    """
    there = {k for k in NET_FOLDERS if _source(cfg, run_dir, k) is not None}
    made: set[str] = set()
    out: list[str] = []

    def need(stage: str, key: str, required: bool = True) -> None:
        if key in there and key not in made:
            if key not in out:
                out.append(key)
        elif key not in made and required:
            maker = next(s for s, k in STAGE_OUTPUT.items() if k == key)
            how = " or point model.teacher_path at one" if key == "teacher" else ""
            raise InputError(f"run.stages: {stage} needs the {key} model, which is neither in {run_dir} nor "
                             f"made by an earlier stage of run.stages={cfg.run.stages} (add {maker} before "
                             f"{stage}{how})")

    for stage in cfg.run.stages:
        if stage in STAGE_OUTPUT:
            key = STAGE_OUTPUT[stage]
            if key in there or key in made:
                need(stage, key)
            else:
                for dep in STAGE_INPUTS[stage]:
                    need(stage, dep)
                made.add(key)
        elif stage == "eval":
            need(stage, "teacher")
            for key in NET_FOLDERS:
                need(stage, key, required=False)
        elif stage == "export":
            key = "student" if ("student" in there or "student" in made) else "student_stage1"
            if key not in there and key not in made:
                raise InputError(f"run.stages: export needs a trained student: add stage1 or stage2 to "
                                 f"run.stages={cfg.run.stages}")
            need(stage, key)
    return out


def preflight(cfg: Config) -> tuple[Path, dict[str, torch.nn.Module]]:
    """Check everything the run will read, before any work: the dataset (`check_dataset`; the toy
    world is made here), that it fits model.size, and every model folder the stages will load
    (the teacher folder, finished stages of the run), which must load as the expected class and
    fit the dataset; a stamped teacher (the shipped toy teacher) must be made for this toy world.
    Returns (dataset folder, the loaded networks); raises InputError."""
    data_dir = prepare_data(cfg)
    meta = read_meta(data_dir)
    check_data_fits_model(cfg, data_dir)
    nets = {}
    to_load = networks_to_load(cfg, cfg.run_dir)
    if "teacher" in to_load:
        check_teacher_world(cfg)
    for key in to_load:
        model = _load_checked(cfg, cfg.run_dir, key)
        what = (_teacher_what(cfg) if key == "teacher" and _given_teacher(cfg) is not None
                else f"the {key} in {_source(cfg, cfg.run_dir, key)}")
        _fits(f"{what} ({type(model).__name__})", dict(model.config), meta, data_dir)
        nets[key] = model
    return data_dir, nets


def _load(st: RunState, key: str) -> bool:
    """Put the network `key` into `st.nets` if it is there to load (already in memory, the
    configured teacher folder, or a finished stage's folder); False if it must be trained."""
    if key in st.nets:
        return True
    if _source(st.cfg, st.run_dir, key) is None:
        return False
    st.nets[key] = _load_checked(st.cfg, st.run_dir, key)
    return True


def _need(st: RunState, name: str) -> torch.nn.Module:
    if not _load(st, name):
        raise RuntimeError(f"stage needs the {name} model: run its stage first "
                           f"(add it to run.stages) or point model.teacher_path at one")
    return st.nets[name]


def train_on_ray(st: RunState, first: str) -> str | None:
    """`first` and every later training stage of run.stages whose network is not there yet, in one
    Ray session (one learner group for all of them; pipeline/distributed.py). Each network is saved
    as soon as it arrives, so a run cut short keeps every finished stage. Returns what ran, for the
    console: the stages and each one's seconds (`st.on_ray` keeps them for the later stages' lines)."""
    from pipeline import distributed  # imports Ray: only when the Ray backend is asked for

    listed = [s for s in st.cfg.run.stages if s in STAGE_OUTPUT]
    todo = [s for s in listed[listed.index(first):] if not _load(st, STAGE_OUTPUT[s])]
    if not todo:
        return None
    have = {k: st.nets[k] for k in ("teacher", "student_stage1") if _load(st, k)}

    def save(name: str, module: torch.nn.Module) -> None:
        _save(module, st.run_dir / NET_FOLDERS.get(name, name))
        if name in NET_FOLDERS:
            st.nets[name] = module
        print(f"== {name} trained and saved", flush=True)

    out = distributed.train_session(st.cfg, todo, have, st.data_dir, st.log, on_result=save)
    distributed.release_ray()
    st.on_ray.update(out.seconds)
    times = ", ".join(f"{s} {out.seconds[s]:.0f}s" for s in todo)
    return f"one Ray session trained {', '.join(todo)} (learner start-up {out.startup_seconds:.0f}s, {times})"


def _done_before(st: RunState, stage: str) -> str:
    """What the console says of a training stage whose network was there when the stage came."""
    if stage in st.on_ray:
        return f"trained in the Ray session above, in {st.on_ray[stage]:.0f}s"
    return f"not trained: {STAGE_OUTPUT[stage]} loaded from {_source(st.cfg, st.run_dir, STAGE_OUTPUT[stage])}"


def stage_teacher(st: RunState) -> str | None:
    if _load(st, "teacher"):
        return _done_before(st, "teacher")
    if st.cfg.ray.backend == "ray":
        return train_on_ray(st, "teacher")
    st.nets["teacher"] = reference.train_teacher(st.cfg, st.train, st.log)
    _save(st.nets["teacher"], st.run_dir / NET_FOLDERS["teacher"])


def stage_stage1(st: RunState) -> str | None:
    if _load(st, "student_stage1"):
        return _done_before(st, "stage1")
    if st.cfg.ray.backend == "ray":
        return train_on_ray(st, "stage1")
    st.nets["student_stage1"] = reference.train_stage1(st.cfg, _need(st, "teacher"), st.train, st.log)
    _save(st.nets["student_stage1"], st.run_dir / NET_FOLDERS["student_stage1"])


def _stage2_like(st: RunState, stage: str, key: str) -> str | None:
    if _load(st, key):
        return _done_before(st, stage)
    if st.cfg.ray.backend == "ray":
        return train_on_ray(st, stage)
    student, critic = reference.train_stage2(st.cfg, stage, _need(st, "student_stage1"), _need(st, "teacher"),
                                             st.train, st.log)
    st.nets[key] = student
    _save(critic, st.run_dir / f"critic_{stage}")
    _save(student, st.run_dir / NET_FOLDERS[key])


def stage_stage2(st: RunState) -> str | None:
    return _stage2_like(st, "stage2", "student")


def stage_consistency(st: RunState) -> str | None:
    return _stage2_like(st, "consistency", "consistency")


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
            export = sampling.export_far_student if st.cfg.model.causal else sampling.export_student
            export(st.cfg, st.nets[name], st.run_dir / "student")
            return
    raise RuntimeError("export needs a trained student: run stage1 or stage2 first")


STAGE_FUNCS = {"teacher": stage_teacher, "stage1": stage_stage1, "stage2": stage_stage2,
               "consistency": stage_consistency, "eval": stage_eval, "export": stage_export}


def run_stages(cfg: Config) -> Path:
    """Run the configured stages; returns the run folder. Bad input raises InputError before
    anything is written to the run folder (`preflight`); training that meets run.max_bad_steps
    bad steps in a row raises TooManyBadSteps (the tracked run ends as FAILED)."""
    run_dir = cfg.run_dir
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    data_dir, nets = preflight(cfg)  # bad input stops here, before the run folder or the tracker
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    totals = {"teacher": cfg.teacher.steps, "stage1": cfg.stage1.steps, "stage2": cfg.stage2.steps,
              "consistency": cfg.consistency.steps}
    tracker = Tracker.start(cfg, run_dir, tracking_uri=cfg.run.tracking_uri or None) if cfg.run.track else None
    log = MetricsLog(run_dir / "metrics.jsonl", totals, sinks=[tracker.on_record] if tracker else [])
    st = RunState(cfg, run_dir, data_dir, log, nets)
    status = "FAILED"
    try:
        for stage in cfg.run.stages:
            t0 = time.time()
            print(f"== {stage}", flush=True)
            what = STAGE_FUNCS[stage](st)  # a training stage may say what ran (on Ray, or nothing: loaded)
            print(f"== {stage} done in {time.time() - t0:.0f}s" + (f": {what}" if what else ""), flush=True)
        status = "FINISHED"
    finally:
        log.close()
        if tracker:
            if (run_dir / "eval.json").is_file():
                tracker.log_eval(run_dir / "eval.json")
            tracker.log_artifacts(run_artifacts(run_dir))
            tracker.end(status)
    return run_dir
