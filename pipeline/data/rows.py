"""Random access to rows of a split by their global index (no Ray): what a streaming learner's reader needs.

A row's global index is its position in `schema.read_split`'s order (shards by name, rows in
order), the index every draw of the project addresses (pipeline/flowmap/draws.py). `RowReader`
maps an index to (shard, row group, offset) from the Parquet footers alone, and `read` fetches a
set of rows by reading only the row groups that hold them (only the columns it needs), then
validates and decodes them with the schema's own checks (`schema.batch_to_tensors`).

Memory: a read holds at most the row groups it touches (the writer's `row_group_rows`, 64 by
default, `pipeline.prepare` min(64, shard_rows)), never the split.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data.schema import (EMBED_SHAPE, PROMPT_EMBEDS, REQUIRED_COLUMNS, DatasetError, _decode_floats,
                                  batch_to_tensors, read_meta, shard_paths)


class RowReader:
    """Rows of one split of a dataset folder by global index."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder, self.split = Path(folder), split
        self.meta = read_meta(self.folder)
        self.latent_shape, self.embed_shape = list(self.meta["latent_shape"]), list(self.meta["embed_shape"])
        self.paths = shard_paths(self.folder, split)
        if not self.paths:
            raise DatasetError(f"{self.folder / split}: empty split (no shards)")
        self._files: dict[int, pq.ParquetFile] = {}
        self.starts: list[int] = []  # global index of each (shard, row group)'s first row
        self.groups: list[tuple[int, int]] = []  # (shard, row group)
        total = 0
        for s, path in enumerate(self.paths):
            md = pq.ParquetFile(path).metadata
            for g in range(md.num_row_groups):
                self.starts.append(total)
                self.groups.append((s, g))
                total += md.row_group(g).num_rows
        if total != self.meta["num_rows"][split]:
            raise DatasetError(f"{self.folder / split}: {total} rows in shards, dataset.json says "
                               f"{self.meta['num_rows'][split]}")
        self.num_rows = total

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.paths[shard])
        return self._files[shard]

    def table(self, index) -> pa.Table:
        """The rows `index` (global indices, any order, repeats allowed) as one Arrow table in that order,
        with the schema's required columns."""
        index = [int(i) for i in index]
        bad = [i for i in index if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(f"{self.folder / self.split}: rows {bad[:5]} out of range (0..{self.num_rows - 1})")
        where = {i: bisect.bisect_right(self.starts, i) - 1 for i in set(index)}
        pieces, offset = [], {}
        for k in sorted(set(where.values())):
            shard, group = self.groups[k]
            offset[k] = sum(len(p) for p in pieces)
            pieces.append(self._file(shard).read_row_group(group, columns=list(REQUIRED_COLUMNS)))
        if not pieces:
            return pa.table({c: [] for c in REQUIRED_COLUMNS})
        grouped = pa.concat_tables(pieces)
        take = [offset[where[i]] + i - self.starts[where[i]] for i in index]
        return grouped.take(pa.array(take, type=pa.int64()))

    def read(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (n, F, C, H, W), prompt embeddings (n, L, D)) of the rows `index`, validated."""
        rows = batch_to_tensors(self.table(index), self.latent_shape, self.embed_shape,
                                where=f"{self.folder / self.split} (rows {list(index)[:4]}...)")
        return rows.latents, rows.prompt_embeds


def read_prompt_embeds(folder: str | Path, split: str = "train") -> torch.Tensor:
    """Every row's prompt embedding (N, L, D) in global-index order, reading no latent column (the
    rollout and scorer actors' prompt table)."""
    folder = Path(folder)
    meta = read_meta(folder)
    shape = list(meta["embed_shape"])
    parts = []
    for path in shard_paths(folder, split):
        table = pq.read_table(path, columns=[PROMPT_EMBEDS, EMBED_SHAPE])
        col = table.column(PROMPT_EMBEDS).combine_chunks()
        parts.append(torch.from_numpy(_decode_floats(col, shape, PROMPT_EMBEDS, EMBED_SHAPE, str(path), 0)))
    if not parts:
        raise DatasetError(f"{folder / split}: empty split (no shards)")
    out = torch.cat(parts)
    if len(out) != meta["num_rows"][split]:
        raise DatasetError(f"{folder / split}: {len(out)} rows in shards, dataset.json says {meta['num_rows'][split]}")
    return out



_READERS: dict[tuple[str, int], RowReader] = {}


def _reader(data_dir: str) -> RowReader:
    """One RowReader per process and dataset (a read task's worker process serves many steps, and Ray reuses
    it across runs: the key includes dataset.json's modification time, so a folder written again is read
    again)."""
    from pipeline.data.schema import META_FILE

    key = (data_dir, os.stat(os.path.join(data_dir, META_FILE)).st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = RowReader(data_dir, "train")
    return _READERS[key]


def read_plan_rows(batch: pa.Table, *, data_dir: str, rank: int) -> pa.Table:
    """The streaming learners' read task (a `map_batches` function, learners/feed.py): for every step of a
    block of the step plan (`stage`, `step`, and per rank the global `data_rows` and `prompt_rows` it
    reads), rank `rank`'s rows, one output row per step: `data_rows`, `prompt_rows` (its indices),
    `latents` (of the data rows) and `prompt_embeds` (of both, in that order) as raw float32 bytes.
    Plan rows with a negative step (the placeholder of an empty plan) are skipped."""
    reader = _reader(data_dir)
    plan = batch.to_pydict()
    todo = [(stage, step, list(d[rank]), list(p[rank]))
            for stage, step, d, p in zip(plan["stage"], plan["step"], plan["data_rows"], plan["prompt_rows"])
            if step >= 0]
    # one read for the whole block: its steps share row groups (a toy block of 15 steps touches every row
    # group of the split), and each row group is then decoded once, not once per step
    wanted = sorted({i for _, _, d, p in todo for i in d + p})
    latents, embeds = reader.read(wanted) if wanted else (None, None)
    at = {i: k for k, i in enumerate(wanted)}
    out = {"stage": [], "step": [], "rank": [], "data_rows": [], "prompt_rows": [], "latents": [],
           "prompt_embeds": []}
    for stage, step, data_rows, prompt_rows in todo:
        pos = torch.tensor([at[i] for i in data_rows + prompt_rows], dtype=torch.long)
        out["stage"].append(stage)
        out["step"].append(step)
        out["rank"].append(rank)
        out["data_rows"].append(data_rows)
        out["prompt_rows"].append(prompt_rows)
        out["latents"].append(latents[pos[:len(data_rows)]].numpy().tobytes())
        out["prompt_embeds"].append(embeds[pos].numpy().tobytes())
    return pa.table({"stage": pa.array(out["stage"], pa.string()), "step": pa.array(out["step"], pa.int64()),
                     "rank": pa.array(out["rank"], pa.int64()),
                     "data_rows": pa.array(out["data_rows"], pa.list_(pa.int64())),
                     "prompt_rows": pa.array(out["prompt_rows"], pa.list_(pa.int64())),
                     "latents": pa.array(out["latents"], pa.large_binary()),
                     "prompt_embeds": pa.array(out["prompt_embeds"], pa.large_binary())})
