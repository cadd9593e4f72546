"""Pretrained teachers that ship with the package, and how a run finds and checks them.

Real users start from a pretrained Wan2.1 folder (`model.teacher_path=/path/to/wan`). The toy world
does the same: `toy8/` beside this file is a diffusers `WanTransformer3DModel` folder trained by the
project's own preset for the default run (the default world, model.size toy8), installed with the
package, with its recipe beside it:

    toy8/config.json, toy8/diffusion_pytorch_model.safetensors   the teacher (diffusers)
    toy8/config.yaml                                               the resolved config that trained it
    toy8/eval.json, toy8/eval.png                                  its quality against sampling steps
    toy8/teacher.json                                              the stamp: world version, schema, world config

`toy/` is the same for the toy16 world (`data.toy` = `TOY16`, model.size toy: `--config toy16`, the
default run until 2026-12-08; rebuilt with `--config toy16-teacher`). `model.teacher_path=auto` (the default) resolves to the
folder of the run's model.size (`SHIPPED`) when the data is the toy world; a teacher made for another
world (older `TOY_WORLD_VERSION`, other world settings) is refused with an error that names the command
rebuilding it (`rebuild_command`).

    python -m pipeline.run --config toy-teacher        # train the default run's teacher (stage 0 + eval, on Ray)
    python -m pipeline.teachers runs/toy-teacher       # install that run's teacher here

Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pipeline.data import schema
from pipeline.data.toy import TOY_WORLD_VERSION, ToyWorldConfig

AUTO = "auto"
"""model.teacher_path value that picks the shipped teacher for the toy model and world"""
SHIPPED = {"toy": Path(__file__).parent / "toy", "toy8": Path(__file__).parent / "toy8"}
"""model.size -> the folder of the teacher shipped for it (toy8: the default world; toy: the toy16 world of
`--config toy16`)"""
STAMP = "teacher.json"
"""the file in a teacher folder that says which world and schema it was made for"""
WORLD_FIELDS = ("frames", "channels", "height", "width", "travel", "motions", "bar_length", "embed_len", "embed_dim",
                "embed_seed")
"""the ToyWorldConfig fields a teacher depends on: the clips' distribution and the prompt encoder
(not the split sizes, the sampling seed or the shard size)"""
ADDED_LATER = {"bar_length": 1.6}
"""world fields added after teachers were first stamped -> the value every clip had before: a stamp
without the field was made with it"""
REBUILD = "python -m pipeline.run --config toy-teacher && python -m pipeline.teachers runs/toy-teacher"
"""the command that trains the default run's teacher again and installs it"""
REBUILDS = {"toy8": REBUILD,
            "toy": "python -m pipeline.run --config toy16-teacher && python -m pipeline.teachers runs/toy16-teacher"}
"""model.size -> the command that trains its shipped teacher again and installs it"""


def rebuild_command(model_size: str) -> str:
    """The command that rebuilds the teacher shipped for `model_size` (the default run's for other sizes)."""
    return REBUILDS.get(model_size, REBUILD)


RECIPE_FILES = ("config.yaml", "eval.json", "eval.png")
"""files of the teacher's run copied beside it"""


class StaleTeacherError(ValueError):
    """A stamped teacher was made for another toy world or schema than the run's."""


def teacher_path(model_size: str, teacher_path: str, data_path: str) -> Path | None:
    """The teacher folder a run loads, or None (stage 0 trains one).

    `teacher_path` "auto": the shipped teacher of `model_size` when the data is the toy world
    (`data_path` empty) and one ships for that size; "": none; anything else: that folder.
    """
    if teacher_path != AUTO:
        return Path(teacher_path) if teacher_path else None
    if data_path or model_size not in SHIPPED:
        return None
    return SHIPPED[model_size]


def stamp_for(world: ToyWorldConfig, model_size: str) -> dict:
    """The stamp of a teacher trained on `world` with the architecture preset `model_size`."""
    full = dataclasses.asdict(world)
    return {"toy_world_version": TOY_WORLD_VERSION,
            "schema": {"format": schema.FORMAT_NAME, "version": schema.FORMAT_VERSION},
            "world": {k: full[k] for k in WORLD_FIELDS}, "model_size": model_size,
            "rebuild": rebuild_command(model_size)}


def check_stamp(folder: str | Path, world: ToyWorldConfig, model_size: str, required: bool = True) -> dict | None:
    """Check that the teacher in `folder` was made for this toy world, schema and model size.

    Returns its stamp (None if it has none and `required` is False); raises StaleTeacherError, whose
    message names the differences and the command that rebuilds the teacher.
    """
    path = Path(folder) / STAMP
    if not path.is_file():
        if not required:
            return None
        raise StaleTeacherError(f"{folder} has no {STAMP} (which toy world it was made for); rebuild it: {rebuild_command(model_size)}")
    try:
        got = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StaleTeacherError(f"{path} is not valid JSON ({exc}); rebuild it: {rebuild_command(model_size)}") from None
    want = stamp_for(world, model_size)
    diffs = [f"{k}: made for {got.get(k)!r}, this run has {want[k]!r}"
             for k in ("toy_world_version", "schema", "model_size") if got.get(k) != want[k]]
    made = got.get("world") if isinstance(got.get("world"), dict) else {}
    made = {k: made.get(k, ADDED_LATER.get(k)) for k in WORLD_FIELDS}
    diffs += [f"data.toy.{k}: made for {made[k]!r}, this run has {want['world'][k]!r}"
              for k in WORLD_FIELDS if made[k] != want["world"][k]]
    if diffs:
        raise StaleTeacherError(f"the teacher in {folder} does not fit this run's toy world ({'; '.join(diffs)}); "
                                f"use that world, set model.teacher_path='' to train a teacher in this run, or "
                                f"rebuild it: {rebuild_command(model_size)}")
    return got


def install(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Copy the teacher of a finished teacher run (`<run_dir>/teacher`, its config.yaml, eval.json,
    eval.png) into `dest` (default: the shipped toy teacher's folder) and stamp it."""
    from pipeline.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    if cfg.data.path:
        raise ValueError(f"{run_dir} trained on data.path={cfg.data.path}, not the toy world: nothing to stamp")
    src = run_dir / "teacher"
    missing = [p for p in [src / "DONE", src / "config.json", *(run_dir / f for f in RECIPE_FILES)] if not p.is_file()]
    if missing:
        raise ValueError(f"{run_dir} is not a finished teacher run (missing {', '.join(map(str, missing))}); "
                         f"run: {rebuild_command(cfg.model.size).split(' && ')[0]}")
    if dest is None and cfg.model.size not in SHIPPED:
        raise ValueError(f"{run_dir} trained model.size={cfg.model.size}, which ships no teacher (sizes that do: "
                         f"{', '.join(SHIPPED)}); give the target folder")
    dest = Path(dest) if dest is not None else SHIPPED[cfg.model.size]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy2(f, tmp / f.name)
    for name in RECIPE_FILES:
        shutil.copy2(run_dir / name, tmp / name)
    (tmp / STAMP).write_text(json.dumps(stamp_for(cfg.data.toy, cfg.model.size), indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
