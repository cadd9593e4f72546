"""Videos + captions -> a dataset folder for `pipeline.run data.path=`: `python -m pipeline.prepare`.

    python -m pipeline.prepare videos=clips/ output=data/mine vae=Wan2.1/vae \\
        text_encoder=Wan2.1/text_encoder tokenizer=Wan2.1/tokenizer [--config FILE] [key=value ...]

A Ray Data pipeline (the pure pieces are in `pipeline/data/video.py`)::

    manifest (sample_id, path, caption)   driver: clips not yet staged
      -> decode   map_batches, one CPU task per clip: PyAV, F frames at fps, cover + centre crop
      -> encode   map_batches on an actor pool (`ray.encode_actors`, one VAE + UMT5 per actor,
                  `ray.encode_gpus` each): normalised VAE posterior mode, 512-token embeddings
      -> driver   in manifest order (preserve_order), `shard_rows` clips at a time: a staged
                  shard `<output>/.staging/chunk-NNNNN.parquet`, then its `.json` (ids, skips)
                  written last as the commit mark; progress and ETA on stderr
    finalise      once every clip is staged: the held-out draw (seeded), `write_dataset` (the
                  schema writer; dataset.json last), `skipped.jsonl`, then the staging is removed

Resumable: a run that stops (crash, kill, Ctrl-C) keeps its committed chunks; the next run with
the same output skips their ids and deletes a chunk without its commit mark. A clip that does
not decode, is too short or has an empty caption is skipped, counted and listed with its reason.

Exit statuses: 0 done (the dataset folder is the last line of stdout); 2 bad input (an unknown
key or bad value, a missing or wrong model folder, an unreadable manifest, frames that are not
4k + 1, too few usable clips for `heldout`), one line on stderr, `error: <thing>: <problem>`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import ConfigError, build, field_help, read_tree
from pipeline.data import schema, video
from pipeline.guard import EXIT_BAD_INPUT, EXIT_OK

STAGING = ".staging"
SKIPPED_FILE = "skipped.jsonl"
NULL_FILE = "null_prompt.npy"


class PrepareError(ValueError):
    """Bad input found by prepare (one line, exit status 2)."""


@dataclass
class PrepareRayConfig:
    address: str = ""
    """Ray cluster to join ("auto", host:port); empty: $RAY_ADDRESS, else a local Ray on 127.0.0.1 (stopped at
    the end)"""
    decode_cpus: float = 1.0
    """CPUs per decode task (one clip each)"""
    encode_actors: int = 1
    """encoder actors (each loads the VAE and the text encoder once)"""
    encode_cpus: float = 1.0
    """CPUs per encoder actor (also its torch threads, rounded, at least 1)"""
    encode_gpus: float = 0.0
    """GPUs per encoder actor (> 0: encode on CUDA)"""
    encode_batch: int = 1
    """clips per encoder call"""
    text_dtype: str = "float32"
    """dtype of the text encoder: float32 or bfloat16 (the VAE always runs in float32); rows are stored as float32"""


@dataclass
class PrepareConfig:
    videos: str = ""
    """folder of videos, each with its caption in a .txt beside it (same stem), or a .csv / .jsonl manifest
    (path, caption; relative paths from the manifest's folder)"""
    output: str = ""
    """dataset folder to write (train/, heldout/, null_prompt.parquet, dataset.json); running again resumes"""
    vae: str = ""
    """local folder of the Wan VAE (AutoencoderKLWan; a Wan2.1 diffusers checkpoint's vae/)"""
    text_encoder: str = ""
    """local folder of the UMT5 text encoder (UMT5EncoderModel; the checkpoint's text_encoder/)"""
    tokenizer: str = ""
    """local folder of the tokenizer (the checkpoint's tokenizer/)"""
    frames: int = 81
    """frames per clip, 4k + 1 (the Wan VAE compresses 4x in time after the first frame)"""
    height: int = 480
    """frame height in pixels after scaling and centre-cropping (a multiple of 8)"""
    width: int = 832
    """frame width in pixels after scaling and centre-cropping (a multiple of 8)"""
    fps: float = 16.0
    """frames per second sampled from each video (Wan2.1 is trained at 16)"""
    heldout: int = 16
    """clips held out (evaluation and FD reference), drawn with `seed` among the usable ones"""
    seed: int = 0
    """seed of the held-out draw"""
    max_tokens: int = 512
    """prompt embedding length: tokens past the prompt are zeros (Wan2.1 uses 512)"""
    shard_rows: int = 16
    """clips per staged chunk and rows per final shard (a 480p x 81 row is about 17 MB)"""
    ray: PrepareRayConfig = field(default_factory=PrepareRayConfig)
    """Ray Data: decode tasks and the encoder actor pool"""


def load(config_file: str | None, overrides: list[str]) -> PrepareConfig:
    """The resolved config, its values checked (ConfigError names the key)."""
    cfg = build(PrepareConfig, read_tree(config_file), overrides)
    checks = [
        (bool(cfg.videos), "videos", "set the folder of videos or a manifest (videos=PATH)"),
        (bool(cfg.output), "output", "set the dataset folder to write (output=PATH)"),
        (cfg.frames >= 1, "frames", "must be >= 1 (4k + 1)"),
        (cfg.fps > 0, "fps", "must be > 0"),
        (cfg.heldout >= 1, "heldout", "must be >= 1 (the held-out split may not be empty)"),
        (cfg.max_tokens >= 1, "max_tokens", "must be >= 1"),
        (cfg.shard_rows >= 1, "shard_rows", "must be >= 1"),
        (cfg.ray.encode_actors >= 1, "ray.encode_actors", "must be >= 1"),
        (cfg.ray.encode_batch >= 1, "ray.encode_batch", "must be >= 1"),
        (cfg.ray.decode_cpus > 0 and cfg.ray.encode_cpus >= 0 and cfg.ray.encode_gpus >= 0, "ray.decode_cpus",
         "decode_cpus must be > 0, encode_cpus and encode_gpus >= 0"),
        (cfg.ray.text_dtype in ("float32", "bfloat16"), "ray.text_dtype", "choose float32 or bfloat16"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    return cfg


# --------------------------------------------------------------------------- checks before work


def _model_config(folder: str, key: str, wanted: tuple[str, ...]) -> dict:
    """config.json of a local model folder, checked to name one of `wanted` classes."""
    path = Path(folder) / "config.json"
    if not folder or not path.is_file():
        raise PrepareError(f"{key}: {folder or '(empty)'} is not a local model folder (no config.json)")
    conf = json.loads(path.read_text())
    names = {conf.get("_class_name"), *(conf.get("architectures") or []), conf.get("model_type")}
    if not names & set(wanted):
        raise PrepareError(f"{key}: {folder} holds {sorted(n for n in names if n)}, expected {wanted[0]}")
    return conf


def check_inputs(cfg: PrepareConfig) -> tuple[list[video.Clip], list[int]]:
    """Everything prepare reads, before any work: (the clips, the latent shape)."""
    try:
        clips = video.read_manifest(cfg.videos)
    except video.ManifestError as exc:
        raise PrepareError(f"videos: {exc}") from None
    vae = _model_config(cfg.vae, "vae", ("AutoencoderKLWan",))
    _model_config(cfg.text_encoder, "text_encoder", ("UMT5EncoderModel", "umt5"))
    tok = Path(cfg.tokenizer)
    if not cfg.tokenizer or not any((tok / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise PrepareError(f"tokenizer: {cfg.tokenizer or '(empty)'} is not a local tokenizer folder "
                           f"(no tokenizer.json or spiece.model)")
    try:
        shape = video.latent_shape(vae, cfg.frames, cfg.height, cfg.width)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    if cfg.heldout >= len(clips):
        raise PrepareError(f"heldout: {cfg.heldout} of {len(clips)} clips leaves no training clip")
    return clips, shape


# --------------------------------------------------------------------------- the Ray Data stages


def decode_batch(batch: dict, frames: int, height: int, width: int, fps: float) -> dict:
    """Decode task: each clip's frames (zeros and an `error` where it cannot be used)."""
    out, errors = [], []
    for path, caption in zip(batch["path"], batch["caption"]):
        try:
            if not str(caption).strip():
                raise video.ClipError("empty caption")
            out.append(video.decode_clip(str(path), frames, height, width, fps))
            errors.append("")
        except video.ClipError as exc:
            out.append(np.zeros((frames, height, width, 3), np.uint8))
            errors.append(exc.reason)
    return {"sample_id": batch["sample_id"], "path": batch["path"], "caption": batch["caption"],
            "frames": np.stack(out), "error": np.array(errors, dtype=object)}


class EncodeBatch:
    """Encoder actor: one VAE + text encoder, loaded once; clips -> latents and prompt embeddings."""

    def __init__(self, cfg: dict, latent_shape: list[int]):
        import torch

        torch.set_num_threads(max(1, round(cfg["ray"]["encode_cpus"])))
        device = "cuda" if cfg["ray"]["encode_gpus"] > 0 else "cpu"
        self.enc = video.Encoder(cfg["vae"], cfg["text_encoder"], cfg["tokenizer"], max_tokens=cfg["max_tokens"],
                                 device=device, text_dtype=cfg["ray"]["text_dtype"])
        self.latent_shape = latent_shape

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]])
        n, width = len(ok), self.enc.text_encoder.config.d_model
        latents = np.zeros((n, *self.latent_shape), np.float32)
        embeds = np.zeros((n, self.enc.max_tokens, width), np.float32)
        if ok.any():
            latents[ok] = self.enc.latents(batch["frames"][ok]).numpy()
            embeds[ok] = self.enc.prompt_embeds([str(c) for c in batch["caption"][ok]]).numpy()
        return {"sample_id": batch["sample_id"], "path": batch["path"], "caption": batch["caption"],
                "error": batch["error"], "latents": latents, "prompt_embeds": embeds}


def _null_embed(cfg: dict) -> np.ndarray:
    """The empty prompt's embedding (L, D), by the text side of the same Encoder (a Ray task)."""
    enc = video.Encoder(None, cfg["text_encoder"], cfg["tokenizer"], max_tokens=cfg["max_tokens"],
                        device="cuda" if cfg["ray"]["encode_gpus"] > 0 else "cpu", text_dtype=cfg["ray"]["text_dtype"])
    return enc.prompt_embeds([""])[0].numpy()


# --------------------------------------------------------------------------- staging


class Staging:
    """`<output>/.staging/`: committed chunks (a `chunk-NNNNN.parquet` of rows and its `.json` mark, written
    last: {"ids": every clip of the chunk, "skipped": [{sample_id, path, reason}]}) and the null prompt."""

    def __init__(self, output: Path):
        self.dir = output / STAGING
        self.dir.mkdir(parents=True, exist_ok=True)
        for part in self.dir.glob("chunk-*.parquet"):  # a chunk without its mark was never committed
            if not part.with_suffix(".json").is_file():
                part.unlink()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()

    def marks(self) -> list[dict]:
        return [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(self.dir.glob("chunk-*.json"))]

    def done_ids(self) -> set[int]:
        return {i for m in self.marks() for i in m["ids"]}

    def commit(self, rows: schema.LatentDataset | None, ids: list[int], skipped: list[dict]) -> None:
        n = len(list(self.dir.glob("chunk-*.json")))
        stem = self.dir / f"chunk-{n:05d}"
        if rows is not None and len(rows):
            _atomic(stem.with_suffix(".parquet"), lambda tmp: schema.write_shard(tmp, rows))
        _atomic(stem.with_suffix(".json"),
                lambda tmp: tmp.write_text(json.dumps({"ids": ids, "skipped": skipped}) + "\n"))

    def rows(self, ids: set[int], latent_shape: list[int], embed_shape: list[int]):
        """The staged rows whose sample_id is in `ids`, chunk by chunk, in sample_id order."""
        import pyarrow.parquet as pq
        import torch

        for mark in sorted(self.marks(), key=lambda m: min(m["ids"])):
            path = self.dir / f"{mark['name']}.parquet"
            if not path.is_file():
                continue
            data = schema.batch_to_tensors(pq.read_table(path), latent_shape, embed_shape, where=str(path))
            keep = torch.tensor([int(i) in ids for i in data.sample_ids], dtype=torch.bool)
            if keep.any():
                order = torch.argsort(data.sample_ids[keep])
                idx = torch.nonzero(keep).flatten()[order].tolist()
                yield schema.LatentDataset.concat([data.slice(i, i + 1) for i in idx])


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name and rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run


def _start_ray(address: str) -> bool:
    """Join `address` or $RAY_ADDRESS, else start a local Ray on 127.0.0.1; True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, configure_logging=False)
        return False
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    return True


def _dataset(cfg: PrepareConfig, todo: list[video.Clip], latent_shape: list[int]):
    """manifest -> decode (CPU tasks) -> encode (actor pool), in manifest order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    items = [{"sample_id": c.sample_id, "path": c.path, "caption": c.caption} for c in todo]
    r = cfg.ray
    return (ray.data.from_items(items, override_num_blocks=len(items))
            # its memory request (the decoded clip, twice: frames and their stack) also keeps decoding a stage
            # of CPU tasks: Ray Data fuses a map into the next one when their remote arguments are equal,
            # which would decode inside the (GPU) encoder actors
            .map_batches(decode_batch, batch_size=1, num_cpus=r.decode_cpus,
                         memory=2 * cfg.frames * cfg.height * cfg.width * 3,
                         fn_kwargs=dict(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps))
            .map_batches(EncodeBatch, batch_size=r.encode_batch,
                         compute=ray.data.ActorPoolStrategy(size=r.encode_actors), num_cpus=r.encode_cpus,
                         num_gpus=r.encode_gpus, fn_constructor_args=(_plain(cfg), latent_shape)))


def _commit_batch(staging: Staging, batch: dict) -> int:
    """Stage one batch of encoded clips (rows, then the commit mark); returns how many were skipped."""
    import torch

    ok = np.array([e == "" for e in batch["error"]])
    rows = None
    if ok.any():
        rows = schema.LatentDataset(torch.from_numpy(batch["latents"][ok]),
                                    torch.from_numpy(batch["prompt_embeds"][ok]),
                                    [str(c) for c in batch["caption"][ok]],
                                    torch.from_numpy(batch["sample_id"][ok].astype(np.int64)),
                                    [str(p) for p in batch["path"][ok]])
    skips = [{"sample_id": int(i), "path": str(p), "reason": str(e)}
             for i, p, e in zip(batch["sample_id"], batch["path"], batch["error"]) if e]
    staging.commit(rows, [int(i) for i in batch["sample_id"]], skips)
    return len(skips)


def stream(cfg: PrepareConfig, todo: list[video.Clip], latent_shape: list[int], staging: Staging,
           on_chunk: Callable[[int], None] | None = None) -> None:
    """Decode and encode the clips `todo` on Ray Data; commit them in manifest order, `shard_rows` at a time.
    `on_chunk(clips done)` is called after each commit."""
    t0, seen, skipped = time.perf_counter(), 0, 0
    for batch in _dataset(cfg, todo, latent_shape).iter_batches(batch_size=cfg.shard_rows, batch_format="numpy"):
        skipped += _commit_batch(staging, batch)
        seen += len(batch["sample_id"])
        rate = seen / (time.perf_counter() - t0)
        print(f"prepare: {seen}/{len(todo)} clips ({skipped} skipped), {rate:.2f} clips/s, "
              f"ETA {(len(todo) - seen) / rate:.0f} s", file=sys.stderr, flush=True)
        if on_chunk is not None:
            on_chunk(seen)


def _plain(cfg: PrepareConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def finalise(cfg: PrepareConfig, staging: Staging, latent_shape: list[int]) -> dict:
    """Write the dataset from the staged chunks through the schema writer; returns a summary."""
    import torch

    marks = staging.marks()
    skipped = sorted((s for m in marks for s in m["skipped"]), key=lambda s: s["sample_id"])
    bad = {s["sample_id"] for s in skipped}
    good = sorted(i for m in marks for i in m["ids"] if i not in bad)
    if cfg.heldout >= len(good):
        raise PrepareError(f"heldout: {cfg.heldout} held out of {len(good)} usable clips ({len(skipped)} skipped, "
                           f"see {staging.dir}) leaves no training clip; lower heldout")
    held = set(np.random.default_rng(cfg.seed).choice(good, cfg.heldout, replace=False).tolist())
    null = torch.from_numpy(np.load(staging.dir / NULL_FILE))
    embed_shape = list(null.shape)
    meta = {"generator": {"name": "pipeline.prepare", "seed": cfg.seed, "videos": cfg.videos, "vae": cfg.vae,
                          "text_encoder": cfg.text_encoder, "tokenizer": cfg.tokenizer, "frames": cfg.frames,
                          "height": cfg.height, "width": cfg.width, "fps": cfg.fps, "max_tokens": cfg.max_tokens},
            "skipped": len(skipped)}
    out = Path(cfg.output)
    schema.write_dataset(out, staging.rows(set(good) - held, latent_shape, embed_shape),
                         staging.rows(held, latent_shape, embed_shape), null, meta, shard_rows=cfg.shard_rows,
                         row_group_rows=min(64, cfg.shard_rows))
    _atomic(out / SKIPPED_FILE, lambda tmp: tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    shutil.rmtree(staging.dir)
    reasons: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0].split(" (")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"train": len(good) - len(held), "heldout": len(held), "skipped": len(skipped), "reasons": reasons}


def prepare(cfg: PrepareConfig, on_chunk: Callable[[int], None] | None = None) -> Path:
    """The whole command after parsing: check, stage what is missing, finalise. Raises PrepareError."""
    import ray

    clips, latent_shape = check_inputs(cfg)
    out = Path(cfg.output)
    if (out / schema.META_FILE).is_file() and not (out / STAGING).exists():
        print(f"prepare: {out} is already a finished dataset; nothing to do", file=sys.stderr)
        return out
    staging = Staging(out)
    done = staging.done_ids()
    todo = [c for c in clips if c.sample_id not in done]
    print(f"prepare: {len(clips)} clips, {len(done)} staged before, {len(todo)} to do", file=sys.stderr, flush=True)
    own = _start_ray(cfg.ray.address) if todo or not (staging.dir / NULL_FILE).is_file() else False
    try:
        if not (staging.dir / NULL_FILE).is_file():
            task = ray.remote(_null_embed).options(num_cpus=cfg.ray.encode_cpus, num_gpus=cfg.ray.encode_gpus)
            null = ray.get(task.remote(_plain(cfg)))
            _atomic(staging.dir / NULL_FILE, lambda tmp: tmp.write_bytes(_npy_bytes(null)))
        if todo:
            stream(cfg, todo, latent_shape, staging, on_chunk)
    finally:
        if own:
            ray.shutdown()
    summary = finalise(cfg, staging, latent_shape)
    print(f"prepare: train {summary['train']}, heldout {summary['heldout']}, skipped {summary['skipped']} "
          f"{summary['reasons'] or ''} (listed in {out / SKIPPED_FILE})", file=sys.stderr, flush=True)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    keys = "\n".join(f"  {k} (default {d!r}): {h}" for k, h, d in field_help(PrepareConfig))
    p = argparse.ArgumentParser(prog="python -m pipeline.prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Videos and captions -> a latent dataset for pipeline.run data.path=.",
                                epilog="keys (key=value):\n" + keys + "\n\nexit status: 0 done (the dataset folder is "
                                "the last line of stdout), 2 bad input (one line on stderr)")
    p.add_argument("--config", help="YAML file of keys")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. videos=clips/ frames=81")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipeline.run import _error

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load(args.config, args.overrides)
        out = prepare(cfg)
    except (ConfigError, PrepareError, schema.DatasetError) as exc:
        _error(exc)
        return EXIT_BAD_INPUT
    print(out.resolve())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
