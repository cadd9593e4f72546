"""`python -m pipeline.bench ingest [--rows N] [--scale S] [--row-mb MB]`: learner memory as the train split grows.

Writes a synthetic dataset in the project's schema (pipeline/data/schema.py; random float32 latents of about
`--row-mb` MiB per row, uncompressed, so a row costs its size on disk and in memory) at N rows and at S x N
rows, and on each runs the learners' ingestion as the pipeline does it: a Ray Train `TorchTrainer` of
`--learners` workers given the row stream (`learners.feed`: `StepPlan` + `RankShards`, each rank's rows of
every step read from the Parquet shards through Ray Data), each worker taking `--steps` stage-1 steps
(`StreamedRows.at`, then `batch(index, drop)` of the step's draws, as `SupervisedLearner.step` does, with a
sum over the batch in place of the network). With `--old` (the default) the same loop also runs on the
path before streaming: the worker holds the whole split as tensors (`steps.TrainData`, as the learners
did before, when each converted the whole materialised Ray Data split).

Figures: each worker's peak resident set (`ru_maxrss`, the whole process: Python, torch, Ray) and its
resident set just before the data (`base`); streaming vs whole split at each size, and the ratio of the
peaks at S x N and N (flat: about 1). Disk: about (1 + S) x N x row size (default 200 + 2000 rows of
1 MiB: 2.2 GB) in a temporary folder (or `--output-dir`), removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

FIGURES = {
    "rows": "train rows of the small and the large dataset",
    "row_bytes": "bytes of one row's latents + prompt embedding",
    "peak_rss_bytes": "peak RSS of a learner worker per path (stream, whole) and size (1x, Sx)",
    "base_rss_bytes": "RSS of the worker just before its data",
    "stream_peak_ratio": "streaming learner's peak RSS at Sx rows / at 1x (flat: ~1)",
    "whole_peak_ratio": "the whole-split learner's, for contrast",
    "steps_per_s": "learner steps per second per path and size, the data's start-up included (the whole split's read)",
    "steady_steps_per_s": "learner steps per second once started (from step min(5, steps // 4))",
}
EMBED = (16, 64)


def _say(text: str) -> None:
    print(f"[ingest] {text}", flush=True)


def latent_shape_for(row_mb: float) -> tuple[int, int, int, int]:
    """(F, C, H, W) of about `row_mb` MiB of float32: 4 frames of 16 channels, square."""
    side = max(2, int(round(math.sqrt(row_mb * 2**20 / 4 / (4 * 16)))))
    return (4, 16, side, side)


def write_synthetic(folder: Path, rows: int, latent_shape, chunk: int = 64) -> Path:
    """A dataset folder of `rows` random train rows (and 2 held-out), in the schema, written chunk by chunk."""
    from pipeline.data.schema import LatentDataset, write_dataset

    g = torch.Generator().manual_seed(rows)

    def chunks(n, first):
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            ids = torch.arange(first + start, first + start + k)
            yield LatentDataset(torch.rand(k, *latent_shape, generator=g), torch.rand(k, *EMBED, generator=g),
                                [f"clip {int(i)}" for i in ids], ids)

    return write_dataset(folder, chunks(rows, 0), chunks(2, 10**9), torch.zeros(*EMBED),
                         {"generator": {"name": "bench-ingest", "seed": rows}}, shard_rows=64, row_group_rows=8,
                         compression="none")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_loop(config: dict) -> None:
    """One learner worker: `steps` stage-1 steps on its rows, streamed or from the whole split."""
    import torch.distributed as dist

    from learners.feed import StreamedRows
    from pipeline import steps
    from pipeline.data.schema import read_meta, read_null_embed, read_split

    cfg, data_dir, mode = config["cfg"], config["data_dir"], config["mode"]
    rank, world = dist.get_rank(), dist.get_world_size()
    meta, null = read_meta(data_dir), read_null_embed(data_dir)
    base = _rss()
    t0 = time.perf_counter()
    if mode == "stream":
        import ray.train

        data = StreamedRows.from_shard(ray.train.get_dataset_shard("rows"), meta["latent_shape"],
                                       meta["embed_shape"], meta["num_rows"]["train"], null, torch.device("cpu"),
                                       ["stage1"], cfg.data.stream_prefetch)
    else:
        split = read_split(data_dir, "train")
        data = steps.TrainData(split.latents, split.prompt_embeds, null[None])
        del split
    rows, total, marks = steps.rank_rows(cfg.stage1.batch_size, world, rank), 0.0, []
    for step in range(cfg.stage1.steps):
        marks.append(time.perf_counter())
        if mode == "stream":
            data.at("stage1", step)
        d = steps.supervised_draws(cfg, "stage1", step, data.num_rows, data.latent_shape)
        x, cond = data.batch(d.index[slice(*rows)], d.drop[slice(*rows)])
        total += float(x.sum() + cond.sum())
    seconds = time.perf_counter() - t0
    warm = min(5, len(marks) // 4)  # steady rate: from the start of step `warm` (the stream's start-up done)
    steady = (len(marks) - warm) / max(time.perf_counter() - marks[warm], 1e-9)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rank": rank, "peak": peak, "base": base, "seconds": seconds, "steady": steady, "checksum": total,
           "max_held_rows": getattr(data, "max_held_rows", None)}
    Path(config["out"]).with_suffix(f".{rank}.json").write_text(json.dumps(out))


def run_learners(cfg, data_dir: Path, mode: str, learners: int, out: Path) -> list[dict]:
    """`worker_loop` on a Ray Train group of `learners` workers; their figures."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from learners.feed import DATASET, RankShards, StepPlan, row_bytes
    from pipeline.data.schema import read_meta

    kw = {}
    if mode == "stream":
        plan = StepPlan(cfg, ["stage1"], None, row_bytes(str(data_dir)),
                        num_rows=read_meta(data_dir)["num_rows"]["train"])
        kw = dict(datasets={DATASET: plan},
                  dataset_config=RankShards(cfg, str(data_dir), read_meta(data_dir)["num_rows"]["train"], plan))
    trainer = TorchTrainer(worker_loop, train_loop_config={"cfg": cfg, "data_dir": str(data_dir), "mode": mode,
                                                           "out": str(out)},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=learners, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=f"ingest-{mode}-{out.stem}", storage_path=str(out.parent / "ray")),
                           **kw)
    trainer.fit()
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(learners)]


def bench(args: argparse.Namespace) -> dict:
    import ray

    from pipeline.config import load_config

    latent = latent_shape_for(args.row_mb)
    row_bytes = 4 * (math.prod(latent) + math.prod(EMBED))
    sizes = {"1x": args.rows, f"{args.scale}x": args.rows * args.scale}
    need = row_bytes * (sum(sizes.values()) + 4)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="anyflow-ingest-"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > 0.9 * free:
        raise SystemExit(f"error: the datasets need about {need / 2**30:.2f} GiB on disk, {root} has "
                         f"{free / 2**30:.2f} GiB free (use smaller --rows, --scale or --row-mb)")
    _say(f"rows {sizes}, {row_bytes / 2**20:.2f} MiB per row (latents {latent}), "
         f"{need / 2**30:.2f} GiB on disk under {root}")
    figures = {"rows": sizes, "row_bytes": row_bytes, "latent_shape": list(latent), "steps": args.steps,
               "batch_size": args.batch_size, "learners": args.learners, "disk_bytes": need,
               "peak_rss_bytes": {}, "base_rss_bytes": {}, "steps_per_s": {}, "steady_steps_per_s": {},
               "max_held_rows": {}}
    modes = ["stream", "whole"] if args.old else ["stream"]
    try:
        for label, n in sizes.items():
            folder = write_synthetic(root / f"data-{label}", n, latent)
            cfg = load_config(None, ["model.size=tiny", f"stage1.steps={args.steps}",
                                     f"stage1.batch_size={args.batch_size}", f"run.output_dir={root / 'runs'}",
                                     f"run.name=ingest-{label}", f"data.stream_prefetch={args.prefetch}",
                                     f"data.stream_block_mb={args.block_mb}", f"ray.learners={args.learners}"])
            if not ray.is_initialized():
                ray.init(address="local", num_cpus=max(2, args.learners), include_dashboard=False,
                         _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
            for mode in modes:
                got = run_learners(cfg, folder, mode, args.learners, root / f"out-{mode}-{label}.json")
                key = f"{mode}_{label}"
                figures["peak_rss_bytes"][key] = max(g["peak"] for g in got)
                figures["base_rss_bytes"][key] = max(g["base"] for g in got)
                figures["steps_per_s"][key] = args.steps / max(g["seconds"] for g in got)
                figures["steady_steps_per_s"][key] = min(g["steady"] for g in got)
                figures["max_held_rows"][key] = got[0]["max_held_rows"]
                _say(f"{key}: peak RSS {figures['peak_rss_bytes'][key] / 2**20:.0f} MiB "
                     f"(before the data {figures['base_rss_bytes'][key] / 2**20:.0f} MiB), "
                     f"{figures['steps_per_s'][key]:.1f} steps/s with the start, "
                     f"{figures['steady_steps_per_s'][key]:.1f} steady")
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    big = f"{args.scale}x"
    peaks = figures["peak_rss_bytes"]
    for mode in modes:
        figures[f"{mode}_peak_ratio"] = peaks[f"{mode}_{big}"] / peaks[f"{mode}_1x"]
    return figures


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m pipeline.bench ingest", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=__doc__, epilog="figures:\n" + "\n".join(f"  {k}: {v}" for k, v in FIGURES.items()))
    p.add_argument("--rows", type=int, default=200, help="train rows of the small dataset (default 200)")
    p.add_argument("--scale", type=int, default=10, help="the large dataset has SCALE x ROWS rows (default 10)")
    p.add_argument("--row-mb", type=float, default=1.0, help="MiB of latents per row (default 1)")
    p.add_argument("--steps", type=int, default=40, help="stage-1 steps per run (default 40)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--learners", type=int, default=1, help="learner workers (default 1)")
    p.add_argument("--prefetch", type=int, default=2, help="data.stream_prefetch (default 2)")
    p.add_argument("--block-mb", type=float, default=16.0, help="data.stream_block_mb (default 16)")
    p.add_argument("--old", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the whole-split path, for contrast (default on)")
    p.add_argument("--output-dir", default="", help="where the datasets go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the output folder")
    args = p.parse_args(argv)
    if args.rows < 1 or args.scale < 2 or args.row_mb <= 0 or args.steps < 1 or args.learners < 1:
        p.error("need --rows >= 1, --scale >= 2, --row-mb > 0, --steps >= 1, --learners >= 1")
    if args.batch_size % args.learners or args.prefetch < 1 or args.block_mb <= 0:
        p.error(f"--batch-size {args.batch_size} must split over --learners {args.learners}; --prefetch >= 1, --block-mb > 0")
    return args


def main(argv: list[str]) -> int:
    figures = bench(parse_args(argv))
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0
