"""Data: the `ImageDataset` type, its sources (embedded, IDX, torchvision, image folder,
Parquet), the private validation split and per-worker shards."""
from .dataset import DataError, ImageDataset
from .sources import check_image_shape, load_dataset, read_idx, write_parquet
from .splits import shard_indices, split_validation

__all__ = [
    "DataError",
    "ImageDataset",
    "check_image_shape",
    "load_dataset",
    "read_idx",
    "shard_indices",
    "split_validation",
    "write_parquet",
]
