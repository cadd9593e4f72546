"""The Parquet dataset format: round trips, determinism and every validation error."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import schema
from pipeline.data.schema import DatasetError, LatentDataset

LATENT_SHAPE = (2, 3, 4, 5)
EMBED_SHAPE = (6, 8)
META = {"generator": {"name": "test", "seed": 7}, "vocabulary": None, "note": "kept"}


def make_rows(n: int, first_id: int = 0, seed: int = 0) -> LatentDataset:
    gen = torch.Generator().manual_seed(seed)
    return LatentDataset(
        latents=torch.randn(n, *LATENT_SHAPE, generator=gen),
        prompt_embeds=torch.randn(n, *EMBED_SHAPE, generator=gen),
        prompts=[f"prompt {first_id + i}" for i in range(n)],
        sample_ids=torch.arange(first_id, first_id + n),
        sources=[f"video_{first_id + i}.mp4" for i in range(n)],
    )


def assert_rows_equal(a: LatentDataset, b: LatentDataset) -> None:
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)
    assert a.prompts == b.prompts
    assert torch.equal(a.sample_ids, b.sample_ids)
    assert a.sources == b.sources


@pytest.fixture
def dataset(tmp_path):
    """A valid dataset: 7 train rows in shards of 3, 3 held-out rows."""
    train, heldout = make_rows(7), make_rows(3, first_id=100, seed=1)
    null = torch.zeros(EMBED_SHAPE)
    folder = schema.write_dataset(tmp_path / "ds", train, heldout, null, META, shard_rows=3)
    return folder, train, heldout


# --------------------------------------------------------------------------- writing and reading


def test_round_trip_write_read_matches(dataset):
    folder, train, heldout = dataset
    assert [p.name for p in schema.shard_paths(folder, "train")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert_rows_equal(schema.read_split(folder, "train"), train)
    assert_rows_equal(schema.read_split(folder, "heldout"), heldout)
    assert torch.equal(schema.read_null_embed(folder), torch.zeros(EMBED_SHAPE))
    meta = schema.read_meta(folder)
    assert meta["latent_shape"] == list(LATENT_SHAPE) and meta["embed_shape"] == list(EMBED_SHAPE)
    assert meta["num_rows"] == {"train": 7, "heldout": 3}
    assert meta["generator"] == META["generator"] and meta["note"] == "kept"
    assert meta["format"] == schema.FORMAT_NAME and meta["version"] == schema.FORMAT_VERSION


def test_on_disk_types_are_the_documented_ones(dataset):
    folder, _, _ = dataset
    arrow = pq.read_schema(schema.shard_paths(folder, "train")[0])
    assert arrow.field("latents").type == pa.large_binary()
    assert arrow.field("prompt_embeds").type == pa.large_binary()
    assert arrow.field("latent_shape").type == pa.list_(pa.int32())
    assert arrow.field("embed_shape").type == pa.list_(pa.int32())
    assert arrow.field("prompt").type == pa.string()
    assert arrow.field("sample_id").type == pa.int64()
    assert arrow.field("source").type == pa.string()
    row = pq.read_table(schema.shard_paths(folder, "train")[0]).slice(1, 1).to_pylist()[0]
    assert row["latent_shape"] == list(LATENT_SHAPE)
    raw = np.frombuffer(row["latents"], dtype="<f4").reshape(LATENT_SHAPE)
    assert np.array_equal(raw, make_rows(7).latents[1].numpy())


def test_chunk_stream_writes_the_same_rows_as_one_batch(tmp_path):
    train = make_rows(10)
    chunks = [train.slice(0, 1), train.slice(1, 6), train.slice(6, 10)]
    a = schema.write_dataset(tmp_path / "a", train, make_rows(2, 50), torch.zeros(EMBED_SHAPE), META,
                             shard_rows=4)
    b = schema.write_dataset(tmp_path / "b", iter(chunks), make_rows(2, 50), torch.zeros(EMBED_SHAPE),
                             META, shard_rows=4)
    assert [len(pq.read_table(p)) for p in schema.shard_paths(b, "train")] == [4, 4, 2]
    for pa_, pb in zip(schema.shard_paths(a, "train"), schema.shard_paths(b, "train")):
        assert pa_.read_bytes() == pb.read_bytes()


def test_writing_twice_gives_identical_bytes(tmp_path):
    folders = [schema.write_dataset(tmp_path / name, make_rows(5), make_rows(2, 10),
                                    torch.ones(EMBED_SHAPE), META) for name in ("a", "b")]
    for rel in ("train/part-00000.parquet", "heldout/part-00000.parquet", "null_prompt.parquet",
                "dataset.json"):
        assert (folders[0] / rel).read_bytes() == (folders[1] / rel).read_bytes()


def test_rewrite_replaces_old_shards(dataset):
    folder, _, _ = dataset
    schema.write_dataset(folder, make_rows(2), make_rows(2, 10), torch.zeros(EMBED_SHAPE), META,
                         shard_rows=3)
    assert len(schema.shard_paths(folder, "train")) == 1
    assert len(schema.read_split(folder, "train")) == 2


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="generator"):
        schema.write_dataset(tmp_path / "x", make_rows(2), make_rows(2, 5), torch.zeros(EMBED_SHAPE),
                             {"vocabulary": None})
    with pytest.raises(DatasetError, match="heldout.*no rows"):
        schema.write_dataset(tmp_path / "y", make_rows(2), [], torch.zeros(EMBED_SHAPE), META)
    with pytest.raises(DatasetError, match="null embed"):
        schema.write_dataset(tmp_path / "z", make_rows(2), make_rows(2, 5), torch.zeros(3, 8), META)


# --------------------------------------------------------------------------- in-memory batches


def test_batch_to_tensors_matches_rows_for_tables_batches_and_slices():
    rows = make_rows(9)
    table = schema.to_table(rows)
    assert_rows_equal(schema.batch_to_tensors(table), rows)
    assert_rows_equal(schema.batch_to_tensors(table.to_batches()[0]), rows)
    assert_rows_equal(schema.batch_to_tensors(table.slice(2, 5)), rows.slice(2, 7))
    assert_rows_equal(schema.batch_to_tensors(table.to_batches()[0].slice(3, 4)), rows.slice(3, 7))
    chunked = pa.concat_tables([table.slice(0, 4), table.slice(4)])
    assert_rows_equal(schema.batch_to_tensors(chunked, list(LATENT_SHAPE), list(EMBED_SHAPE)), rows)
    assert schema.validate_batch(table) == 9


def test_binary_and_int64_list_columns_are_accepted():
    rows = make_rows(3)
    table = schema.to_table(rows)
    table = table.set_column(0, "latents", table["latents"].cast(pa.binary()))
    table = table.set_column(1, "latent_shape", table["latent_shape"].cast(pa.list_(pa.int64())))
    assert_rows_equal(schema.batch_to_tensors(table), rows)


def test_batch_errors_name_where_and_row_with_offset():
    rows = make_rows(4)
    rows.latents[2, 0, 0, 0, 0] = float("nan")
    with pytest.raises(DatasetError, match=r"^rollout batch, row 102: latents has 1 non-finite"):
        schema.validate_batch(schema.to_table(rows), where="rollout batch", row_offset=100)


def test_batch_with_expected_shape_reports_it():
    with pytest.raises(DatasetError, match=r"^batch, row 0: embed_shape is \[6, 8\], expected \[6, 9\]$"):
        schema.batch_to_tensors(schema.to_table(make_rows(2)), list(LATENT_SHAPE), [6, 9])


def test_bfloat16_rows_are_written_as_float32(tmp_path):
    rows = make_rows(3)
    half = LatentDataset(rows.latents.bfloat16(), rows.prompt_embeds, rows.prompts, rows.sample_ids)
    back = schema.batch_to_tensors(schema.to_table(half))
    assert back.latents.dtype == torch.float32
    assert torch.equal(back.latents, rows.latents.bfloat16().float())


def test_batch_without_expected_shape_requires_row_0s_shape():
    table = pa.concat_tables([schema.to_table(make_rows(2)), schema.to_table(LatentDataset(
        torch.zeros(1, 2, 3, 4, 6), torch.zeros(1, *EMBED_SHAPE), ["p"], torch.tensor([9])))])
    with pytest.raises(DatasetError, match=r"^batch, row 2: latent_shape is \[2, 3, 4, 6\], row 0 says"):
        schema.batch_to_tensors(table)


# --------------------------------------------------------------------------- validation of files


def rewrite_shard(folder, split, change):
    """Apply ``change`` to the Arrow table of the split's first shard, write it back."""
    path = schema.shard_paths(folder, split)[0]
    pq.write_table(change(pq.read_table(path)), path)
    return path


def replace_column(table, name, values, type_=None):
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=type_))


def latents_with(table, row, value):
    blobs = table["latents"].to_pylist()
    arr = np.frombuffer(blobs[row], dtype="<f4").copy()
    arr[5] = value
    blobs[row] = arr.tobytes()
    return replace_column(table, "latents", blobs, pa.large_binary())


CORRUPTIONS = {
    "missing column": (lambda t: t.drop_columns(["latents"]),
                       r"rows 0-2: missing column 'latents'"),
    "wrong latents type": (lambda t: replace_column(
        t, "latents", [[0.0] * 120] * 3, pa.list_(pa.float32())),
        r"rows 0-2: column 'latents' has Arrow type list<.*float>, expected"),
    "wrong sample_id type": (lambda t: replace_column(t, "sample_id", [0, 1, 2], pa.int32()),
                             r"rows 0-2: column 'sample_id' has Arrow type int32, expected int64"),
    "shape disagrees with dataset.json": (lambda t: replace_column(
        t, "latent_shape", [[2, 3, 4, 5], [2, 3, 5, 4], [2, 3, 4, 5]], pa.list_(pa.int32())),
        r"row 1: latent_shape is \[2, 3, 5, 4\], dataset.json says \[2, 3, 4, 5\]"),
    "shape with wrong rank": (lambda t: replace_column(
        t, "embed_shape", [[6, 8], [6, 8], [48]], pa.list_(pa.int32())),
        r"row 2: embed_shape has 1 entries, expected 2"),
    "byte length disagrees with shape": (lambda t: replace_column(
        t, "prompt_embeds", [b"\0" * 192, b"\0" * 192, b"\0" * 100], pa.large_binary()),
        r"row 2: prompt_embeds has 100 bytes, embed_shape \[6, 8\] needs 192"),
    "NaN": (lambda t: latents_with(t, 1, np.nan), r"row 1: latents has 1 non-finite values \(NaN\)"),
    "Inf": (lambda t: latents_with(t, 2, -np.inf), r"row 2: latents has 1 non-finite values \(Inf\)"),
    "null prompt": (lambda t: replace_column(t, "prompt", ["a", None, "c"], pa.string()),
                    r"row 1: column 'prompt' is null"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_shard_raises_error_naming_file_and_row(dataset, kind):
    folder, _, _ = dataset
    change, message = CORRUPTIONS[kind]
    path = rewrite_shard(folder, "train", change)
    for read in (lambda: schema.read_split(folder, "train"), lambda: schema.validate_dataset(folder)):
        with pytest.raises(DatasetError) as err:
            read()
        text = str(err.value)
        assert text.startswith(f"{path}, row"), text
        assert "\n" not in text
        assert re.search(message, text), text
    schema.read_split(folder, "heldout")  # the other split is still readable


def test_missing_folder_and_missing_dataset_json(tmp_path, dataset):
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'nowhere'}: dataset folder not found$"):
        schema.read_split(tmp_path / "nowhere", "train")
    folder, _, _ = dataset
    (folder / "dataset.json").unlink()
    for read in (schema.read_meta, schema.validate_dataset, schema.read_null_embed):
        with pytest.raises(DatasetError, match=f"^{folder / 'dataset.json'}: not found"):
            read(folder)


def test_empty_split_and_row_count_mismatch(dataset):
    folder, _, _ = dataset
    path = rewrite_shard(folder, "heldout", lambda t: t.slice(0, 2))
    with pytest.raises(DatasetError, match=r"heldout: 2 rows in shards, .*dataset.json says 3"):
        schema.read_split(folder, "heldout")
    path.unlink()
    with pytest.raises(DatasetError, match=f"^{folder / 'heldout'}: empty split"):
        schema.read_split(folder, "heldout")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(latent_shape=[2, 3, 4]), "'latent_shape' is \\[2, 3, 4\\]"),
    (lambda m: m.update(format="other"), "'format' is 'other'"),
    (lambda m: m.pop("num_rows"), "'num_rows' is None"),
    (lambda m: m.update(version=99), "'version' is 99"),
])
def test_bad_dataset_json_is_reported(dataset, edit, message):
    folder, _, _ = dataset
    meta = json.loads((folder / "dataset.json").read_text())
    edit(meta)
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=f"^{folder / 'dataset.json'}: {message}"):
        schema.read_split(folder, "train")
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        schema.read_meta(folder)


def test_bad_null_prompt_is_reported(dataset):
    folder, _, _ = dataset
    path = folder / "null_prompt.parquet"
    table = pq.read_table(path)
    pq.write_table(replace_column(table, "embed_shape", [[8, 6]], pa.list_(pa.int32())), path)
    with pytest.raises(DatasetError, match=f"^{path}, row 0: embed_shape is \\[8, 6\\]"):
        schema.read_null_embed(folder)
    pq.write_table(pa.concat_tables([table, table]), path)
    with pytest.raises(DatasetError, match=f"^{path}, rows 0-1: expected exactly one row"):
        schema.validate_dataset(folder)


def test_not_parquet_is_reported(dataset):
    folder, _, _ = dataset
    path = schema.shard_paths(folder, "train")[1]
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"^{path}: not a readable Parquet file"):
        schema.read_split(folder, "train")


def test_duplicate_sample_id_across_splits_is_reported(tmp_path):
    folder = schema.write_dataset(tmp_path / "d", make_rows(5), make_rows(2, first_id=3),
                                  torch.zeros(EMBED_SHAPE), META, shard_rows=3)
    with pytest.raises(DatasetError, match=r"heldout/part-00000.parquet, row 0: sample_id 3 also at "
                                           r".*train/part-00001.parquet, row 0"):
        schema.validate_dataset(folder)


def test_validate_dataset_summary(dataset):
    folder, train, heldout = dataset
    summary = schema.validate_dataset(folder)
    assert summary["latent_shape"] == list(LATENT_SHAPE)
    assert summary["embed_shape"] == list(EMBED_SHAPE)
    assert summary["generator"] == META["generator"]
    assert summary["splits"]["train"]["rows"] == 7 and summary["splits"]["train"]["shards"] == 3
    assert summary["splits"]["heldout"] == pytest.approx({
        "rows": 3, "shards": 1, "latent_mean": heldout.latents.double().mean().item(),
        "latent_std": heldout.latents.double().std(unbiased=False).item()})
    assert summary["null_embed_norm"] == 0.0
    assert math.isfinite(summary["splits"]["train"]["latent_std"])
