"""Data: the Parquet schema of latent video datasets and the toy world.

Pure Python / numpy / torch / pyarrow; imports neither Ray nor MLflow.
"""

from pipeline.data.schema import (
    DatasetError,
    LatentDataset,
    batch_to_tensors,
    read_meta,
    read_null_embed,
    read_split,
    validate_batch,
    validate_dataset,
    write_dataset,
    write_shard,
)
from pipeline.data.toy import ToyWorldConfig, embed_prompt, make_toy_dataset, render_video

__all__ = [
    "DatasetError", "LatentDataset", "ToyWorldConfig", "batch_to_tensors", "embed_prompt",
    "make_toy_dataset", "read_meta", "read_null_embed", "read_split", "render_video",
    "validate_batch", "validate_dataset", "write_dataset", "write_shard",
]
