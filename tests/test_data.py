"""Data layer: every source loads to identical uint8 tensors or fails with a DataError that names
the problem and the fix; validation split and shards are disjoint, covering and deterministic."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpaf_ray.data import (
    DataError,
    ImageDataset,
    check_image_shape,
    load_dataset,
    shard_indices,
    split_validation,
    write_parquet,
)
from dpaf_ray.data import sources
from dpaf_ray.data.sources import read_idx

DEBIAN = sources.DEBIAN_FASHION_MNIST


def _rows(ds: ImageDataset) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in ds.images}


def _random_ds(n: int, shape: tuple[int, int, int], k: int = 3, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % k, k, "random")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


# ---------------------------------------------------------------- embedded and IDX sources


@pytest.fixture(scope="module")
def mnist5k() -> tuple[ImageDataset, ImageDataset]:
    return load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")


def test_mnist5k_shapes_and_labels(mnist5k):
    train, test = mnist5k
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    assert int(train.images.max()) > 200  # real pixel values, not [0, 1] floats cast to uint8


def test_mnist5k_split_disjoint_and_deterministic(mnist5k):
    train, test = mnist5k
    assert not (_rows(train) & _rows(test))
    again = load_dataset("mnist-5k", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN} missing)",
)
def test_fashion_mnist_debian():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10


def test_idx_root_round_trip(tmp_path):
    # A torchvision root (MNIST/raw) is read with the same IDX parser.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.RandomState(1).randint(0, 256, (7, 28, 28)).astype(np.uint8)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)
    ds = load_dataset("mnist", "test", root=tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs)) and ds.labels.tolist() == list(range(7))


def test_corrupt_idx_names_file(tmp_path):
    good = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(good, np.zeros((4, 28, 28)))
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(truncated)
    bad_magic = tmp_path / "magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x12\x34\x08\x03" + b"\0" * 100))
    with pytest.raises(DataError, match="magic.gz.*magic"):
        read_idx(bad_magic)
    short = tmp_path / "short.gz"  # header promises 4x28x28 but holds less
    short.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:-5]))
    with pytest.raises(DataError, match="short.gz.*truncated"):
        read_idx(short)
    # Through load_dataset with a root holding a corrupt file.
    truncated.rename(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_missing_data_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*--data-root"):
        load_dataset("fashion-mnist")
    for name in ("mnist", "cifar10", "celeba"):
        with pytest.raises(DataError, match="--data-root"):
            load_dataset(name)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("fashion-mnist", root=tmp_path / "typo")
    with pytest.raises(DataError, match="machine with network"):
        load_dataset("cifar10", root=tmp_path)


def test_celeba_crop_resize_and_male_label(tmp_path, monkeypatch):
    # No CelebA here: fake torchvision's metadata object and check our crop/resize/label path.
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    names = []
    for i in range(3):
        arr = np.full((218, 178, 3), 40 * i, dtype=np.uint8)
        arr[:20] = 255  # rows the 178x178 centre crop removes
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=100)
        names.append(f"{i:06d}.jpg")

    class FakeCelebA:
        base_folder = "celeba"

        def __init__(self, root, split, target_type, download):
            assert download is False
            self.root, self.filename = root, names
            self.attr_names = [f"a{j}" for j in range(20)] + ["Male"] + [f"b{j}" for j in range(19)]
            self.attr = torch.zeros(3, 40, dtype=torch.int64)
            self.attr[1, 20] = 1

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CelebA", FakeCelebA)
    ds = load_dataset("celeba", root=tmp_path)
    assert ds.images.shape == (3, 3, 64, 64) and ds.num_classes == 2 and ds.labels.tolist() == [0, 1, 0]
    assert abs(int(ds.images[2].float().mean()) - 80) <= 3  # the white band was cropped away
    assert load_dataset("celeba128", root=tmp_path).images.shape == (3, 3, 128, 128)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as e:
        load_dataset("imagenet-22k")
    for name in ("mnist-5k", "fashion-mnist", "cifar10", "celeba"):
        assert name in str(e.value)
    assert "must exist" in str(e.value)
    with pytest.raises(DataError, match="split"):
        load_dataset("mnist-5k", "validation")


# ---------------------------------------------------------------- image folders


def _save_folder(root: Path, ds: ImageDataset, classes: list[str]) -> None:
    for i, (img, y) in enumerate(zip(ds.images, ds.labels)):
        d = root / classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(d / f"{i:04d}.png")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["gray", "rgb"])
def test_image_folder_round_trip(tmp_path, shape):
    ds = _random_ds(9, shape)
    _save_folder(tmp_path, ds, ["cat", "bird", "dog"])  # sorted: bird=0, cat=1, dog=2
    got = load_dataset(str(tmp_path))
    assert got.shape == shape and got.num_classes == 3 and len(got) == 9
    remap = {0: 1, 1: 0, 2: 2}  # our label -> sorted folder index
    want = {(bytes(img.numpy().tobytes()), remap[int(y)]) for img, y in zip(ds.images, ds.labels)}
    assert {(bytes(img.numpy().tobytes()), int(y)) for img, y in zip(got.images, got.labels)} == want


def test_image_folder_rgba_becomes_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGBA", (32, 32), (10, 20, 30, 128)).save(tmp_path / "a" / "x.png")
    got = load_dataset(tmp_path)
    assert got.shape == (3, 32, 32) and got.images[0, :, 0, 0].tolist() == [10, 20, 30]


def test_image_folder_split_layout(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        _save_folder(tmp_path / split, _random_ds(n, (1, 28, 28), k=2), ["a", "b"])
    assert len(load_dataset(tmp_path, "train")) == 3 and len(load_dataset(tmp_path, "test")) == 2
    with pytest.raises(DataError, match="single split"):
        load_dataset(tmp_path / "train", "test")  # a flat class folder has no test split


def test_image_folder_mixed_sizes(tmp_path):
    for cls, size in (("a", 28), ("b", 32)):
        (tmp_path / cls).mkdir()
        Image.new("L", (size, size)).save(tmp_path / cls / "x.png")
    with pytest.raises(DataError, match=r"28x28.*32x32.*mogrify -resize"):
        load_dataset(tmp_path)


def test_image_folder_mixed_modes(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "a" / "1.png")
    Image.new("RGB", (28, 28)).save(tmp_path / "a" / "2.png")
    with pytest.raises(DataError, match="grayscale.*RGB.*convert"):
        load_dataset(tmp_path)


def test_image_folder_unreadable_file(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="2.png"):
        load_dataset(tmp_path)


def test_image_folder_empty(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- Parquet


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_parquet_round_trip(tmp_path, shape):
    ds = _random_ds(10, shape, k=5)
    ds = ImageDataset(ds.images, ds.labels % 3, 5, "random")  # classes 3, 4 empty: kept via metadata
    write_parquet(ds, tmp_path / "synthetic.parquet")
    got = load_dataset(str(tmp_path / "synthetic.parquet"))
    assert torch.equal(got.images, ds.images) and torch.equal(got.labels, ds.labels)
    assert got.num_classes == 5


def test_parquet_huggingface_struct_and_custom_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = _random_ds(4, (3, 32, 32))
    write_parquet(ds, tmp_path / "plain.parquet")
    blobs = pq.read_table(tmp_path / "plain.parquet").column("image").to_pylist()
    img = pa.array([{"bytes": b, "path": None} for b in blobs],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": img, "y": pa.array([0, 1, 2, 1], pa.int32())}), tmp_path / "hf.parquet")
    # no class count in the metadata: K is public and must be given, never read off the labels
    with pytest.raises(DataError, match="--num-classes"):
        load_dataset(tmp_path / "hf.parquet", image_column="img", label_column="y")
    got = load_dataset(tmp_path / "hf.parquet", image_column="img", label_column="y", num_classes=4)
    assert torch.equal(got.images, ds.images) and got.labels.tolist() == [0, 1, 2, 1] and got.num_classes == 4


def test_parquet_missing_column_lists_columns(tmp_path):
    write_parquet(_random_ds(2, (1, 28, 28)), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"\['target'\].*\['image', 'label'\]"):
        load_dataset(tmp_path / "t.parquet", label_column="target")


def test_parquet_bad_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_parquet(_random_ds(2, (1, 28, 28)), tmp_path / "t.parquet")
    images = pq.read_table(tmp_path / "t.parquet").column("image")
    pq.write_table(pa.table({"image": images, "label": [0, -1]}), tmp_path / "neg.parquet")
    with pytest.raises(DataError, match="negative label"):
        load_dataset(tmp_path / "neg.parquet", num_classes=3)
    pq.write_table(pa.table({"image": images, "label": [0, 7]}), tmp_path / "big.parquet")
    with pytest.raises(DataError, match="out of range"):
        load_dataset(tmp_path / "big.parquet", num_classes=3)


def test_check_image_shape():
    check_image_shape(_random_ds(1, (3, 32, 32)))
    with pytest.raises(DataError, match=r"1x28x28.*3x32x32.*[Rr]esize"):
        check_image_shape(_random_ds(1, (3, 30, 30)))


# ---------------------------------------------------------------- splits and shards


def test_split_validation(mnist5k):
    from dpaf_ray.privacy.randomness import RunSecret

    train = mnist5k[0]
    key = RunSecret.from_public_seed(3)
    fit, val = split_validation(train, 0.1, key)
    assert 330 <= len(val) <= 470 and len(fit) + len(val) == 4000  # Binomial(4000, 0.1): ±3.5 sd
    fit_rows, val_rows = _rows(fit), _rows(val)
    assert not (fit_rows & val_rows) and fit_rows | val_rows == _rows(train)
    fit2, val2 = split_validation(train, 0.1, key)
    assert torch.equal(val.images, val2.images) and torch.equal(fit.labels, fit2.labels)
    assert not torch.equal(split_validation(train, 0.1, RunSecret.from_public_seed(4))[1].images[:5], val.images[:5])
    fit0, val0 = split_validation(train, 0.0, key)
    assert len(val0) == 0 and val0.shape == train.shape and torch.equal(fit0.images, train.images)
    for bad in (1.0, -0.1):
        with pytest.raises(DataError):
            split_validation(train, bad, key)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 10, 4001])
def test_shard_indices_disjoint_and_covering(n, world_size):
    shards = [shard_indices(n, r, world_size) for r in range(world_size)]
    assert torch.equal(torch.cat(shards), torch.arange(n))  # contiguous, disjoint, covering, in order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_indices(n, world_size, world_size)
