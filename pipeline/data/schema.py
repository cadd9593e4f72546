"""On-disk format of latent video datasets (toy world and VAE-encoded real data).

This module is the contract: anything that writes a dataset as described here
can be trained on, and nothing downstream knows whether it came from the toy
world (``pipeline.data.toy``) or from a video VAE.

Folder layout
-------------
::

    <folder>/
      dataset.json                  metadata, written LAST (its presence marks
                                    a complete dataset)
      null_prompt.parquet           one row: the null / negative prompt embedding
                                    used for classifier-free guidance
      train/part-00000.parquet      training rows, shards named part-NNNNN.parquet,
      train/part-00001.parquet      read in name order
      ...
      heldout/part-00000.parquet    held-out rows (evaluation; FD reference);
      ...                           no sample_id is shared with train

Both splits are required and must be non-empty.  A shard may hold any number of
rows (the writer uses at most ``shard_rows``, default 512) and any number of row
groups (the writer uses ``row_group_rows``, default 64, so that streaming
readers such as Ray Data can work in small pieces).

Row columns (one row = one video clip)
--------------------------------------
=================  ==========================  ==========================================
column             Arrow type                  meaning
=================  ==========================  ==========================================
``latents``        large_binary (binary also   the clip latent: raw **little-endian
                   accepted on read)           float32** bytes of a C-order array of
                                               shape ``latent_shape``; exactly
                                               ``4 * F * C * H * W`` bytes
``latent_shape``   list<int32> (list<int64>    ``[F, C, H, W]``: latent frames,
                   accepted on read)           channels, height, width
``prompt_embeds``  large_binary (binary)       the text-encoder output: raw
                                               little-endian float32 bytes, C-order,
                                               shape ``embed_shape``, padded to L
                                               tokens with zeros (as T5 padding)
``embed_shape``    list<int32> (list<int64>)   ``[L, D]``: tokens, embedding width
``prompt``         string (large_string)       the caption the embedding came from
``sample_id``      int64                       unique id of the clip within the dataset
``source``         string (optional)           provenance, e.g. ``"toy"`` or the
                                               original video path; free text
=================  ==========================  ==========================================

No column may contain nulls.  Every row's ``latent_shape`` and ``embed_shape``
must equal the ``latent_shape`` / ``embed_shape`` in ``dataset.json`` (all clips
of a dataset have one shape, so they batch without padding), and every float
must be finite.  Columns not listed above are allowed and ignored.

Why raw bytes and not ``list<float32>``: a real latent is millions of floats
per row (Wan 480p, 81 frames: 21 x 16 x 60 x 104 = 2.1 M).  Parquet stores a
``list<float32>`` with repetition/definition levels per *element*, which makes
writing and reading several times slower and lets a reader meet nulls inside a
latent; a byte string is one opaque value per row, the length check against the
shape is exact, and the decode is a single ``numpy.frombuffer`` over the Arrow
data buffer for a whole batch.  ``large_binary`` (64-bit offsets) is used so a
batch of large latents can exceed 2 GiB.  The price is that the dtype is not
self-describing, hence the fixed rule: float32, little-endian, C order.

null_prompt.parquet
-------------------
One row with the embedding columns only: ``prompt_embeds``, ``embed_shape``
(equal to dataset.json's) and ``prompt`` (the null prompt's text; ``""`` for the
toy world).

dataset.json
------------
A JSON object with at least::

    {
      "format": "anyflow-latent-video",   # FORMAT_NAME
      "version": 1,                       # FORMAT_VERSION
      "latent_shape": [F, C, H, W],
      "embed_shape": [L, D],
      "num_rows": {"train": N_train, "heldout": N_heldout},
      "generator": {"name": "toy", "seed": 0, ...},   # seed may be null
      "vocabulary": {...} or null
    }

The writer fills in format, version, shapes and row counts; the caller
supplies ``generator`` (``name`` and ``seed`` required, anything else free)
and optionally ``vocabulary`` and other keys.

Validation
----------
Every reader validates what it reads and raises :class:`DatasetError` (a
``ValueError``) with a one-line message of the form
``"<file>, row <i>: <problem>"`` (``rows 0-<n-1>`` for a problem of a whole
column, such as a missing column or a wrong Arrow type).  The same checks on an
in-memory ``pyarrow.Table`` / ``RecordBatch`` are :func:`validate_batch` and
:func:`batch_to_tensors`, for reuse by streaming (Ray Data) readers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

FORMAT_NAME = "anyflow-latent-video"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
META_FILE = "dataset.json"
NULL_PROMPT_FILE = "null_prompt.parquet"
SHARD_GLOB = "part-*.parquet"

LATENTS = "latents"
LATENT_SHAPE = "latent_shape"
PROMPT_EMBEDS = "prompt_embeds"
EMBED_SHAPE = "embed_shape"
PROMPT = "prompt"
SAMPLE_ID = "sample_id"
SOURCE = "source"

_FLOAT_LE = np.dtype("<f4")


class DatasetError(ValueError):
    """A dataset file breaks the schema; the message names the file and row."""


@dataclass
class LatentDataset:
    """Rows of a split (or a batch of them) as tensors.

    Attributes:
        latents: float32 (N, F, C, H, W).
        prompt_embeds: float32 (N, L, D).
        prompts: the N captions.
        sample_ids: int64 (N,).
        sources: the N provenance strings (``""`` where unknown).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompts: list[str]
    sample_ids: torch.Tensor
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if self.sources is None:
            self.sources = [""] * n
        if self.latents.dim() != 5 or self.prompt_embeds.dim() != 3:
            raise ValueError(
                f"LatentDataset wants latents (N, F, C, H, W) and prompt_embeds (N, L, D), "
                f"got {tuple(self.latents.shape)} and {tuple(self.prompt_embeds.shape)}")
        sizes = {len(self.prompt_embeds), len(self.prompts), len(self.sample_ids), len(self.sources)}
        if sizes != {n}:
            raise ValueError(f"LatentDataset fields disagree on the row count: {sorted(sizes | {n})}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def slice(self, start: int, stop: int) -> "LatentDataset":
        """Rows ``start:stop`` (views, not copies, of the tensors)."""
        return LatentDataset(self.latents[start:stop], self.prompt_embeds[start:stop],
                             self.prompts[start:stop], self.sample_ids[start:stop],
                             self.sources[start:stop])

    @staticmethod
    def concat(parts: list["LatentDataset"]) -> "LatentDataset":
        """One dataset holding the rows of ``parts`` in order."""
        return LatentDataset(torch.cat([p.latents for p in parts]),
                             torch.cat([p.prompt_embeds for p in parts]),
                             [s for p in parts for s in p.prompts],
                             torch.cat([p.sample_ids for p in parts]),
                             [s for p in parts for s in p.sources])


# --------------------------------------------------------------------------- writing


def _float_column(x: torch.Tensor) -> pa.Array:
    """(N, ...) float tensor -> large_binary array, one little-endian float32 blob per row."""
    arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy(), dtype=_FLOAT_LE)
    n = arr.shape[0]
    row_bytes = arr[0].nbytes if n else 0
    offsets = np.arange(n + 1, dtype=np.int64) * row_bytes
    return pa.Array.from_buffers(pa.large_binary(), n,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(arr)])


def _shape_column(shape: tuple[int, ...], n: int) -> pa.Array:
    values = pa.array(np.tile(np.asarray(shape, dtype=np.int32), n), type=pa.int32())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * len(shape), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, values)


def to_table(data: LatentDataset) -> pa.Table:
    """The rows of ``data`` as an Arrow table in the schema of this module."""
    n = len(data)
    return pa.table({
        LATENTS: _float_column(data.latents),
        LATENT_SHAPE: _shape_column(tuple(data.latents.shape[1:]), n),
        PROMPT_EMBEDS: _float_column(data.prompt_embeds),
        EMBED_SHAPE: _shape_column(tuple(data.prompt_embeds.shape[1:]), n),
        PROMPT: pa.array(data.prompts, type=pa.string()),
        SAMPLE_ID: pa.array(data.sample_ids.cpu().numpy().astype(np.int64), type=pa.int64()),
        SOURCE: pa.array(data.sources, type=pa.string()),
    })


def _write_table(path: Path, table: pa.Table, row_group_rows: int, compression: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    small = [c for c in (PROMPT, SOURCE) if c in table.column_names]
    stats = [c for c in (SAMPLE_ID,) if c in table.column_names]
    pq.write_table(table, path, row_group_size=row_group_rows, compression=compression,
                   use_dictionary=small, write_statistics=stats)


def write_shard(path: str | Path, data: LatentDataset, *, row_group_rows: int = 64,
                compression: str = "zstd") -> Path:
    """Write the rows of ``data`` to one Parquet file at ``path``; returns the path."""
    path = Path(path)
    _write_table(path, to_table(data), row_group_rows, compression)
    return path


def _rechunk(chunks: LatentDataset | Iterable[LatentDataset], rows: int) -> Iterator[LatentDataset]:
    """Regroup a stream of row chunks into pieces of exactly ``rows`` rows (the last may be short)."""
    if isinstance(chunks, LatentDataset):
        chunks = [chunks]
    pending: list[LatentDataset] = []
    count = 0
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            take = min(rows - count, len(chunk) - start)
            pending.append(chunk.slice(start, start + take))
            count, start = count + take, start + take
            if count == rows:
                yield LatentDataset.concat(pending)
                pending, count = [], 0
    if count:
        yield LatentDataset.concat(pending)


def _write_split(folder: Path, split: str, rows: LatentDataset | Iterable[LatentDataset],
                 shard_rows: int, **kw: Any) -> tuple[int, list[int], list[int]]:
    """Write one split's shards; returns (row count, latent shape, embed shape)."""
    total, latent_shape, embed_shape = 0, None, None
    for i, shard in enumerate(_rechunk(rows, shard_rows)):
        shapes = [list(shard.latents.shape[1:]), list(shard.prompt_embeds.shape[1:])]
        if latent_shape is None:
            latent_shape, embed_shape = shapes
        if shapes != [latent_shape, embed_shape]:
            raise DatasetError(f"{folder / split}, shard {i}: shapes {shapes} differ from "
                               f"the first shard's {[latent_shape, embed_shape]}")
        write_shard(folder / split / f"part-{i:05d}.parquet", shard, **kw)
        total += len(shard)
    if total == 0:
        raise DatasetError(f"{folder / split}: no rows given for split '{split}'")
    return total, latent_shape, embed_shape


def _clear(folder: Path) -> None:
    """Remove the files of this schema (and only those) from ``folder``."""
    (folder / META_FILE).unlink(missing_ok=True)  # first: a half-written dataset is invalid
    (folder / NULL_PROMPT_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for shard in (folder / split).glob(SHARD_GLOB):
            shard.unlink()


def write_dataset(folder: str | Path, train_rows: LatentDataset | Iterable[LatentDataset],
                  heldout_rows: LatentDataset | Iterable[LatentDataset], null_embed: torch.Tensor,
                  meta: dict, *, null_prompt: str = "", shard_rows: int = 512,
                  row_group_rows: int = 64, compression: str = "zstd") -> Path:
    """Write a complete dataset folder; returns its path.

    Rows may be one :class:`LatentDataset` or an iterable of chunks (streamed,
    regrouped into shards of ``shard_rows``).  ``meta`` must hold
    ``generator`` (a dict with ``name`` and ``seed``); its other keys are kept.
    The format keys (format, version, shapes, num_rows) are computed here and
    override any in ``meta``.  Existing shards in the folder are removed first
    and dataset.json is written last.
    """
    folder = Path(folder)
    gen = meta.get("generator")
    if not isinstance(gen, dict) or "name" not in gen or "seed" not in gen:
        raise ValueError("write_dataset: meta['generator'] must be a dict with 'name' and 'seed'")
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)
    kw = dict(row_group_rows=row_group_rows, compression=compression)
    out = {s: _write_split(folder, s, r, shard_rows, **kw)
           for s, r in zip(SPLITS, (train_rows, heldout_rows))}
    (_, latent_shape, embed_shape), (_, h_latent, h_embed) = out["train"], out["heldout"]
    if [h_latent, h_embed] != [latent_shape, embed_shape] or list(null_embed.shape) != embed_shape:
        raise DatasetError(f"{folder}: shapes differ between train {[latent_shape, embed_shape]}, "
                           f"heldout {[h_latent, h_embed]} and null embed {list(null_embed.shape)}")
    null_table = pa.table({PROMPT_EMBEDS: _float_column(null_embed[None]),
                           EMBED_SHAPE: _shape_column(tuple(embed_shape), 1),
                           PROMPT: pa.array([null_prompt], type=pa.string())})
    _write_table(folder / NULL_PROMPT_FILE, null_table, 1, compression)
    full = {"vocabulary": None, **meta, "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "latent_shape": latent_shape, "embed_shape": embed_shape,
            "num_rows": {s: out[s][0] for s in SPLITS}}
    (folder / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return folder


# --------------------------------------------------------------------------- validation


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_int_list(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t))
            and (pa.types.is_int32(t.value_type) or pa.types.is_int64(t.value_type)))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


_COLUMN_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    LATENTS: (_is_binary, "large_binary or binary"),
    LATENT_SHAPE: (_is_int_list, "list<int32>"),
    PROMPT_EMBEDS: (_is_binary, "large_binary or binary"),
    EMBED_SHAPE: (_is_int_list, "list<int32>"),
    PROMPT: (_is_string, "string"),
    SAMPLE_ID: (pa.types.is_int64, "int64"),
    SOURCE: (_is_string, "string"),
}
REQUIRED_COLUMNS = (LATENTS, LATENT_SHAPE, PROMPT_EMBEDS, EMBED_SHAPE, PROMPT, SAMPLE_ID)


def _fail(where: str, row: int | str, problem: str) -> DatasetError:
    return DatasetError(f"{where}, row {row}: {problem}")


def _column(batch: pa.Table | pa.RecordBatch, name: str, where: str, off: int) -> pa.Array:
    """The column ``name`` as one Array, after checking presence, Arrow type and nulls."""
    n = batch.num_rows
    rows = f"{off}-{off + n - 1}" if n > 1 else str(off)
    if name not in batch.schema.names:
        raise DatasetError(f"{where}, rows {rows}: missing column '{name}' "
                           f"(columns: {', '.join(batch.schema.names)})")
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    check, wanted = _COLUMN_TYPES[name]
    if not check(col.type):
        raise DatasetError(f"{where}, rows {rows}: column '{name}' has Arrow type {col.type}, "
                           f"expected {wanted}")
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise _fail(where, off + first, f"column '{name}' is null")
    return col


def _decode_shape(col: pa.Array, ndim: int, expected: list[int] | None, name: str,
                  where: str, off: int, src: str) -> list[int]:
    """Check that every row of a shape column equals ``expected`` (default: row 0's)."""
    n = len(col)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != ndim)
    if bad.size:
        raise _fail(where, off + bad[0], f"{name} has {lengths[bad[0]]} entries, expected {ndim}")
    values = col.flatten().to_numpy(zero_copy_only=False).reshape(n, ndim)
    if expected is None:
        if n == 0:
            return [0] * ndim
        expected, src = values[0].tolist(), f"row {off} says"
        if min(expected) <= 0:
            raise _fail(where, off, f"{name} {expected} has a size <= 0")
    bad = np.flatnonzero((values != np.asarray(expected)).any(axis=1))
    if bad.size:
        raise _fail(where, off + bad[0],
                    f"{name} is {values[bad[0]].tolist()}, {src} {list(expected)}")
    return list(expected)


def _decode_floats(col: pa.Array, shape: list[int], name: str, shape_name: str,
                   where: str, off: int) -> np.ndarray:
    """Binary column of little-endian float32 blobs -> owned float32 array (N, *shape)."""
    n, need = len(col), 4 * math.prod(shape)
    if n == 0:
        return np.zeros((0, *shape), dtype=np.float32)
    bufs = col.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(bufs[1], dtype=offset_type)[col.offset:col.offset + n + 1]
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != need)
    if bad.size:
        raise _fail(where, off + bad[0], f"{name} has {lengths[bad[0]]} bytes, "
                    f"{shape_name} {shape} needs {need} (float32)")
    flat = np.frombuffer(bufs[2], dtype=_FLOAT_LE, count=n * need // 4, offset=int(offsets[0]))
    arr = flat.astype(np.float32).reshape(n, *shape)  # a copy: aligned, native, writable
    finite = np.isfinite(arr.reshape(n, -1))
    bad = np.flatnonzero(~finite.all(axis=1))
    if bad.size:
        row = arr[bad[0]].reshape(-1)[~finite[bad[0]]]
        kinds = "/".join(k for k, hit in (("NaN", np.isnan(row).any()),
                                          ("Inf", np.isinf(row).any())) if hit)
        raise _fail(where, off + bad[0], f"{name} has {row.size} non-finite values ({kinds})")
    return arr


def _decode(batch: pa.Table | pa.RecordBatch, latent_shape: list[int] | None,
            embed_shape: list[int] | None, where: str, off: int, src: str) -> LatentDataset:
    cols = {name: _column(batch, name, where, off) for name in REQUIRED_COLUMNS}
    lshape = _decode_shape(cols[LATENT_SHAPE], 4, latent_shape, LATENT_SHAPE, where, off, src)
    eshape = _decode_shape(cols[EMBED_SHAPE], 2, embed_shape, EMBED_SHAPE, where, off, src)
    latents = _decode_floats(cols[LATENTS], lshape, LATENTS, LATENT_SHAPE, where, off)
    embeds = _decode_floats(cols[PROMPT_EMBEDS], eshape, PROMPT_EMBEDS, EMBED_SHAPE, where, off)
    sources = None
    if SOURCE in batch.schema.names:
        sources = _column(batch, SOURCE, where, off).to_pylist()
    return LatentDataset(torch.from_numpy(latents), torch.from_numpy(embeds),
                         cols[PROMPT].to_pylist(),
                         torch.from_numpy(cols[SAMPLE_ID].to_numpy(zero_copy_only=False).copy()),
                         sources)


def batch_to_tensors(batch: pa.Table | pa.RecordBatch, latent_shape: list[int] | None = None,
                     embed_shape: list[int] | None = None, *, where: str = "batch",
                     row_offset: int = 0) -> LatentDataset:
    """Validate an Arrow table/batch of rows in this schema and convert it to tensors.

    ``latent_shape`` / ``embed_shape`` are the shapes every row must have (take
    them from dataset.json); when None, row 0's shape is required of all rows.
    Error messages name ``where`` and the row number plus ``row_offset``.
    """
    return _decode(batch, latent_shape, embed_shape, where, row_offset, "expected")


def validate_batch(batch: pa.Table | pa.RecordBatch, latent_shape: list[int] | None = None,
                   embed_shape: list[int] | None = None, *, where: str = "batch",
                   row_offset: int = 0) -> int:
    """Run every row check of :func:`batch_to_tensors`; returns the row count or raises."""
    return len(batch_to_tensors(batch, latent_shape, embed_shape, where=where,
                                row_offset=row_offset))


# --------------------------------------------------------------------------- reading


def _is_shape(value: Any, ndim: int) -> bool:
    return (isinstance(value, list) and len(value) == ndim
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _check_meta(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    checks = [
        (meta.get("format") == FORMAT_NAME, f"'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}"),
        (isinstance(meta.get("version"), int) and meta["version"] <= FORMAT_VERSION,
         f"'version' is {meta.get('version')!r}, this reader knows <= {FORMAT_VERSION}"),
        (_is_shape(meta.get("latent_shape"), 4), f"'latent_shape' is {meta.get('latent_shape')!r}, "
         "expected [F, C, H, W] of positive ints"),
        (_is_shape(meta.get("embed_shape"), 2), f"'embed_shape' is {meta.get('embed_shape')!r}, "
         "expected [L, D] of positive ints"),
        (isinstance(meta.get("num_rows"), dict)
         and all(isinstance(meta["num_rows"].get(s), int) for s in SPLITS),
         f"'num_rows' is {meta.get('num_rows')!r}, expected row counts for {list(SPLITS)}"),
        (isinstance(meta.get("generator"), dict) and "name" in meta["generator"],
         f"'generator' is {meta.get('generator')!r}, expected an object with a 'name'"),
    ]
    for ok, problem in checks:
        if not ok:
            raise DatasetError(f"{path}: {problem}")


def read_meta(folder: str | Path) -> dict:
    """The validated contents of ``<folder>/dataset.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder not found")
    path = folder / META_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found (missing or incompletely written dataset)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    _check_meta(meta, path)
    return meta


def shard_paths(folder: str | Path, split: str) -> list[Path]:
    """The Parquet shards of ``split``, in read order (may be empty)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return sorted((Path(folder) / split).glob(SHARD_GLOB))


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})".replace("\n", " ")) from None


def _iter_shards(folder: Path, split: str, meta: dict) -> Iterator[tuple[Path, LatentDataset]]:
    """Validated (path, rows) of every shard of ``split``; checks the split's row count."""
    paths, total = shard_paths(folder, split), 0
    if not paths:
        raise DatasetError(f"{folder / split}: empty split (no {SHARD_GLOB} files)")
    for path in paths:
        data = _decode(_read_parquet(path), meta["latent_shape"], meta["embed_shape"],
                       str(path), 0, "dataset.json says")
        total += len(data)
        yield path, data
    if total == 0:
        raise DatasetError(f"{folder / split}: empty split (0 rows in {len(paths)} shards)")
    if total != meta["num_rows"][split]:
        raise DatasetError(f"{folder / split}: {total} rows in shards, "
                           f"{folder / META_FILE} says {meta['num_rows'][split]}")


def read_split(folder: str | Path, split: str) -> LatentDataset:
    """All rows of ``split`` ("train" or "heldout"), validated, as tensors."""
    folder = Path(folder)
    meta = read_meta(folder)
    return LatentDataset.concat([data for _, data in _iter_shards(folder, split, meta)])


def read_null_embed(folder: str | Path) -> torch.Tensor:
    """The null-prompt embedding (L, D) from ``null_prompt.parquet``, validated."""
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / NULL_PROMPT_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found")
    table, where = _read_parquet(path), str(path)
    if table.num_rows != 1:
        raise DatasetError(f"{path}, rows 0-{table.num_rows - 1}: expected exactly one row")
    cols = {c: _column(table, c, where, 0) for c in (PROMPT_EMBEDS, EMBED_SHAPE, PROMPT)}
    shape = _decode_shape(cols[EMBED_SHAPE], 2, meta["embed_shape"], EMBED_SHAPE, where, 0,
                          "dataset.json says")
    return torch.from_numpy(_decode_floats(cols[PROMPT_EMBEDS], shape, PROMPT_EMBEDS,
                                           EMBED_SHAPE, where, 0)[0])


def _check_unique_ids(owners: list[tuple[Path, np.ndarray]]) -> None:
    """Raise if a sample_id appears twice across the given (file, ids) pairs."""
    ids = np.concatenate([i for _, i in owners])
    file_of = np.concatenate([np.full(len(i), k) for k, (_, i) in enumerate(owners)])
    row_of = np.concatenate([np.arange(len(i)) for _, i in owners])
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[first[counts > 1][0]]
        a, b = np.flatnonzero(ids == dup)[:2]
        raise _fail(owners[file_of[b]][0], row_of[b], f"sample_id {dup} also at "
                    f"{owners[file_of[a]][0]}, row {row_of[a]} (ids must be unique across splits)")


def validate_dataset(folder: str | Path) -> dict:
    """Check every file of a dataset folder; returns a summary or raises DatasetError.

    Checks dataset.json, every shard of both splits (all row checks), the row
    counts, the null prompt, and that sample_ids are unique across both splits.
    Summary: folder, latent_shape, embed_shape, generator, and per split
    ``{"rows", "shards", "latent_mean", "latent_std"}``.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    summary = {"folder": str(folder), "latent_shape": meta["latent_shape"],
               "embed_shape": meta["embed_shape"], "generator": meta["generator"], "splits": {}}
    owners: list[tuple[Path, np.ndarray]] = []
    for split in SPLITS:
        rows = shards = 0
        total = total_sq = 0.0
        for path, data in _iter_shards(folder, split, meta):
            owners.append((path, data.sample_ids.numpy()))
            x = data.latents.double()
            rows, shards = rows + len(data), shards + 1
            total, total_sq = total + x.sum().item(), total_sq + x.square().sum().item()
        count = rows * math.prod(meta["latent_shape"])
        mean = total / count
        summary["splits"][split] = {"rows": rows, "shards": shards, "latent_mean": mean,
                                    "latent_std": math.sqrt(max(total_sq / count - mean**2, 0.0))}
    _check_unique_ids(owners)
    summary["null_embed_norm"] = read_null_embed(folder).norm().item()
    return summary
