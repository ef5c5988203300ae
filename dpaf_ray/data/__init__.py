"""Data: the `ImageDataset` type, its sources (embedded, IDX, torchvision, image folder,
Parquet), the private validation split and per-worker shards."""
from .dataset import DataError, ImageDataset
from .sources import check_image_shape, load_dataset, read_idx, write_parquet
from .splits import (PrivateData, Subsample, held_out, load_private_data, load_training_data, poisson_subsample,
                     shard_indices, split_validation)

__all__ = [
    "DataError",
    "ImageDataset",
    "PrivateData",
    "Subsample",
    "check_image_shape",
    "held_out",
    "load_private_data",
    "load_training_data",
    "load_dataset",
    "poisson_subsample",
    "read_idx",
    "shard_indices",
    "split_validation",
    "write_parquet",
]
