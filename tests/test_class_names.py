"""Class names travel from the user's data into release/ (issue #38): the sorted sub-folder names of
an image folder, or a Parquet table's metadata, name the labels in the generator, the synthetic
table's metadata, the sample grid's rows and the privacy report, which states them as public facts
the user supplied (docs/design.md rule 15). A data set without names releases as before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dpaf_ray.config import TrainConfig
from dpaf_ray.data.dataset import DataError, ImageDataset
from dpaf_ray.data.sources import load_dataset, write_parquet
from dpaf_ray.models.generator import load_generator
from dpaf_ray.pictures import grid_size, save_sample_grid
from dpaf_ray.privacy.report import data_assumptions
from dpaf_ray.run import run_train

NAMES = ("bag", "coat", "sandal")  # sorted, as the folders list them


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def class_folder(root: Path, per_class: int = 40) -> Path:
    for k, name in enumerate(reversed(NAMES)):  # created out of order: labels follow the sorted names
        (root / name).mkdir(parents=True)
        for i, img in enumerate(images(per_class, k)):
            Image.fromarray(img[0].numpy(), mode="L").save(root / name / f"{i}.png")
    return root


def tiny_cfg(dataset: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset), epsilon=10, batch_size=32, group_size=16, feature_channels=4, num_threads=1,
                checkpoint_every=4, log_every=4, iterations=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_a_class_folder_names_its_labels_by_the_sorted_folder_names(tmp_path):
    ds = load_dataset(str(class_folder(tmp_path / "data", per_class=3)))
    assert ds.class_names == NAMES and ds.num_classes == 3
    first = ds.images[ds.labels == 0][0]
    assert torch.equal(first, images(3, 2)[0])  # label 0 = "bag", the folder made from seed 2
    assert ds.subset(torch.arange(2)).class_names == NAMES


def test_a_class_without_a_folder_leaves_the_classes_unnamed(tmp_path):
    ds = load_dataset(str(class_folder(tmp_path / "data", per_class=2)), num_classes=4)
    assert ds.num_classes == 4 and ds.class_names is None


def test_parquet_metadata_names_the_classes_ours_round_trips_and_huggingface_is_read(tmp_path):
    ds = ImageDataset(images(6, 0), torch.tensor([0, 1, 2, 0, 1, 2]), 3, "d", NAMES)
    write_parquet(ds, tmp_path / "ours.parquet")
    assert load_dataset(str(tmp_path / "ours.parquet")).class_names == NAMES

    table = pq.read_table(tmp_path / "ours.parquet")
    hf = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": list(NAMES), "_type": "ClassLabel"}}}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()}), tmp_path / "hf.parquet")
    loaded = load_dataset(str(tmp_path / "hf.parquet"))  # K comes from the schema's names: no --num-classes needed
    assert loaded.class_names == NAMES and loaded.num_classes == 3

    with pytest.raises(DataError, match="names 3 classes but there are 4"):
        load_dataset(str(tmp_path / "hf.parquet"), num_classes=4)
    plain = table.replace_schema_metadata({})
    pq.write_table(plain, tmp_path / "plain.parquet")
    assert load_dataset(str(tmp_path / "plain.parquet"), num_classes=3).class_names is None


def test_bad_class_names_are_refused_with_the_problem_named():
    with pytest.raises(DataError, match="2 class names for 3 classes"):
        ImageDataset(images(3, 0), torch.tensor([0, 1, 2]), 3, "d", ("a", "b"))
    with pytest.raises(DataError, match="repeat a name"):
        ImageDataset(images(3, 0), torch.tensor([0, 1, 2]), 3, "d", ("a", "b", "a"))


def test_the_grid_labels_its_rows_with_the_names(tmp_path):
    x, y = images(30, 0), torch.arange(3).repeat_interleave(10)
    plain = save_sample_grid(x, y, 3, tmp_path / "plain.png")
    named = save_sample_grid(x, y, 3, tmp_path / "named.png", class_names=("bag", "coat", "a very long class name"))
    with Image.open(plain) as a, Image.open(named) as b:
        assert a.size == grid_size(3, 10, (28, 28))
        assert b.size == grid_size(3, 10, (28, 28), ("bag", "coat", "a very long class name"))
        assert b.size[0] > a.size[0]  # the margin grew to hold the names
        margin = b.size[0] - a.size[0] + 28
        left = np.asarray(b.convert("L"))[:, :margin]
        assert (left < 128).sum() > 3 * (np.asarray(a.convert("L"))[:, :28] < 128).sum()  # more ink: the names


def test_the_report_states_the_names_as_public_facts_the_user_supplied():
    out = data_assumptions(100, 0.1, 3, (1, 28, 28), class_names=NAMES)
    assert out["class_names_public"] == list(NAMES)
    assert "user supplied" in out["class_names"] and "not read off the private records" in out["class_names"]
    assert "class_names_public" not in data_assumptions(100, 0.1, 3, (1, 28, 28))


def test_a_release_of_a_class_folder_carries_the_names_in_all_four_places(tmp_path):
    data = class_folder(tmp_path / "data")
    run_train(tiny_cfg(data), tmp_path / "run", num_synthetic=60, progress=None, force=True)
    release = tmp_path / "run" / "release"

    assert load_generator(release).class_names == NAMES
    metadata = pq.read_schema(release / "synthetic.parquet").metadata
    assert json.loads(metadata[b"dpaf_ray.class_names"]) == list(NAMES)
    assert load_dataset(str(release / "synthetic.parquet")).class_names == NAMES
    report = json.loads((release / "privacy_report.json").read_text())
    assert report["assumptions"]["class_names_public"] == list(NAMES)
    with Image.open(release / "samples.png") as grid:
        assert grid.size == grid_size(3, 10, (28, 28), NAMES) != grid_size(3, 10, (28, 28))


def test_a_data_set_without_names_releases_as_before(tmp_path):
    ds = ImageDataset(images(120, 0), torch.arange(3).repeat(40), 3, "plain")
    write_parquet(ds, tmp_path / "plain.parquet")
    table = pq.read_table(tmp_path / "plain.parquet")
    assert b"dpaf_ray.class_names" not in table.schema.metadata
    run_train(tiny_cfg(tmp_path / "plain.parquet"), tmp_path / "run", num_synthetic=60, progress=None, force=True)
    release = tmp_path / "run" / "release"

    assert load_generator(release).class_names is None
    assert b"dpaf_ray.class_names" not in pq.read_schema(release / "synthetic.parquet").metadata
    assert "class_names_public" not in json.loads((release / "privacy_report.json").read_text())["assumptions"]
    with Image.open(release / "samples.png") as grid:
        assert grid.size == grid_size(3, 10, (28, 28))
