"""Build the frozen held-out benchmark suite of issue #34, offline and deterministically.

Every default of dpaf-ray was measured on Fashion-MNIST (60,000 records) and the embedded
mnist-5k digits. These sets are what nobody tuned on: other sizes N, other looks. Each is written
as an image folder `ROOT/<set>/{train,test}/<k>_<class>/<i>.png`, the layout the project's loader
reads (`dpaf_ray.data.sources`: a folder of split folders), so that

    python -m dpaf_ray train --dataset ROOT/<set> ...        # reads ROOT/<set>/train
    python -m dpaf_ray evaluate RUN --test-data ROOT/<set>   # reads ROOT/<set>/test (and train)

take it as it is. Nothing is downloaded: the sources are the Debian Fashion-MNIST package, and
images shipped inside the scikit-learn, scikit-image and matplotlib wheels (`pip install
-e .[bench]`).

The suite is frozen by `bench/heldout_manifest.json`: per set N_train, N_test, classes, shape,
source, and the SHA-256 of each split's arrays as the project's loader decodes them. Building
verifies every hash and fails if one differs (another library version drew other pixels): the
numbers in bench/results/heldout/ are only comparable on the frozen bytes.

    python bench/heldout_sets.py [--root ~/.cache/dpaf-heldout] [--sets a b] [--force]
    python bench/heldout_sets.py --write-manifest   # once, when the suite is frozen; never after measuring
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.data.sources import DEBIAN_FASHION_MNIST, read_idx  # noqa: E402

DEFAULT_ROOT = Path("~/.cache/dpaf-heldout").expanduser()
MANIFEST = Path(__file__).resolve().parent / "heldout_manifest.json"
SEED = 34  # public: the number; every set draws from RandomState(SEED + its index)

# (images uint8 (N, C, H, W), labels int64) for train and test, and the class names (label order)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


class SuiteError(RuntimeError):
    """The suite cannot be built or does not match its frozen manifest; the message says why."""


@dataclass(frozen=True)
class SetSpec:
    name: str
    source: str  # where the pixels come from
    why: str  # what the set tests that Fashion-MNIST does not
    build: Callable[[np.random.RandomState], Arrays]
    needs: tuple[str, ...] = ()  # optional packages (the `bench` extra)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST subsets: the tuned-on look at other N


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    d = Path(os.environ.get("DPAF_FASHION_MNIST", DEBIAN_FASHION_MNIST))
    img = next((p for p in (d / f"{prefix}-images-idx3-ubyte", d / f"{prefix}-images-idx3-ubyte.gz") if p.is_file()), None)
    lbl = next((p for p in (d / f"{prefix}-labels-idx1-ubyte", d / f"{prefix}-labels-idx1-ubyte.gz") if p.is_file()), None)
    if img is None or lbl is None:
        raise SuiteError(f"Fashion-MNIST IDX files not found in {d}: install Debian's dataset-fashion-mnist or set "
                         "DPAF_FASHION_MNIST to a folder holding them")
    return read_idx(img)[:, None], read_idx(lbl).astype(np.int64)


FASHION_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _fashion_subset(per_class: int) -> Callable[[np.random.RandomState], Arrays]:
    def build(rng: np.random.RandomState) -> Arrays:
        x, y = _fashion("train")
        xt, yt = _fashion("test")
        # one permutation per class from the same public seed, so the 2,000 subset lies inside the 10,000 one
        perms = [np.flatnonzero(y == k)[np.random.RandomState(SEED + 100 + k).permutation(int((y == k).sum()))]
                 for k in range(10)]
        idx = np.sort(np.concatenate([p[:per_class] for p in perms]))
        return x[idx], y[idx], xt, yt, FASHION_CLASSES
    return build


# ----------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits, upscaled: tiny N, a blocky look


def _digits(rng: np.random.RandomState) -> Arrays:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = np.zeros((len(x8), 1, 28, 28), dtype=np.uint8)
    for i, im in enumerate(x8):  # 8x8 -> 20x20 in a 28x28 frame, like MNIST's centred 20x20 box
        out[i, 0, 4:24, 4:24] = np.asarray(Image.fromarray(im, "L").resize((20, 20), Image.BICUBIC))
    y = d.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for k in range(10):  # stratified 25 % test split
        ids = np.flatnonzero(y == k)
        test[rng.permutation(ids)[: int(round(0.25 * len(ids)))]] = True
    return out[~test], y[~test], out[test], y[test], [str(k) for k in range(10)]


# ----------------------------------------------------------------------------------------------
# Glyphs rendered from the fonts in matplotlib's wheel: a look nobody tuned on, N = 8,000

GLYPHS = ["A", "G", "K", "R", "W", "&", "@", "#", "?", "Ω"]
GLYPH_NAMES = ["A", "G", "K", "R", "W", "ampersand", "at", "hash", "question", "omega"]
GLYPH_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
               "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
               "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"]


def _render_glyph(ch: str, font_path: str, rng: np.random.RandomState) -> np.ndarray:
    """One 28x28 glyph: drawn at 4x, random size, stroke, rotation and shift, downsampled, noisy."""
    from PIL import Image, ImageDraw, ImageFont

    big = 112
    size = int(rng.randint(52, 86))
    font = ImageFont.truetype(font_path, size)
    stroke = int(rng.randint(0, 4))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    l, t, r, b = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
    x = (big - (r - l)) / 2 - l + rng.uniform(-10, 10)
    y = (big - (b - t)) / 2 - t + rng.uniform(-10, 10)
    draw.text((x, y), ch, fill=int(rng.randint(170, 256)), font=font, stroke_width=stroke,
              stroke_fill=None)
    canvas = canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
    small = np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.float64)
    small = small + rng.normal(0.0, 10.0, small.shape)  # stroke noise
    return np.rint(small).clip(0, 255).astype(np.uint8)


def _glyphs(rng: np.random.RandomState, n_train: int = 800, n_test: int = 200) -> Arrays:
    import matplotlib

    fonts = [str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f) for f in GLYPH_FONTS]
    per = n_train + n_test
    x = np.zeros((10 * per, 1, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(10, dtype=np.int64), per)
    for i in range(len(y)):
        x[i, 0] = _render_glyph(GLYPHS[y[i]], fonts[rng.randint(len(fonts))], rng)
    test = np.tile(np.arange(per) >= n_train, 10)
    return x[~test], y[~test], x[test], y[test], GLYPH_NAMES


# ----------------------------------------------------------------------------------------------
# Patches of scikit-image's bundled pictures: textures (28x28 gray, N = 20,000) and photos (32x32 RGB)

GRAY_SOURCES = ["brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "cell", "clock"]
RGB_SOURCES = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
               "logo", "colorwheel", "stereo_motorcycle"]
TRAIN_ROWS = 0.7  # train patches come from the top 70 % of a picture's rows, test patches from the rest


def _skimage_picture(name: str, rgb: bool) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        a = a[0]
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if rgb:
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        a = a[:, :, :3]
    elif a.ndim == 3:
        a = np.rint(a[:, :, :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return np.ascontiguousarray(a.astype(np.uint8))


def _patches(picture: np.ndarray, n: int, out_size: int, rng: np.random.RandomState) -> np.ndarray:
    """`n` random square crops (side out_size..2.5·out_size, clamped), resized to out_size, random
    horizontal flip; channels first."""
    from PIL import Image

    h, w = picture.shape[:2]
    c = 1 if picture.ndim == 2 else 3
    out = np.zeros((n, c, out_size, out_size), dtype=np.uint8)
    for i in range(n):
        s = int(min(rng.randint(out_size, int(2.5 * out_size) + 1), h, w))
        top, left = rng.randint(0, h - s + 1), rng.randint(0, w - s + 1)
        crop = picture[top:top + s, left:left + s]
        img = Image.fromarray(crop, "L" if c == 1 else "RGB").resize((out_size, out_size), Image.BILINEAR)
        arr = np.asarray(img)
        if rng.rand() < 0.5:
            arr = arr[:, ::-1]
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return out


def _picture_patches(sources: list[str], rgb: bool, size: int, n_train: int, n_test: int
                     ) -> Callable[[np.random.RandomState], Arrays]:
    def build(rng: np.random.RandomState) -> Arrays:
        xs, ys, xts, yts = [], [], [], []
        for k, name in enumerate(sources):
            pic = _skimage_picture(name, rgb)
            cut = int(round(TRAIN_ROWS * pic.shape[0]))
            xs.append(_patches(pic[:cut], n_train, size, rng))
            xts.append(_patches(pic[cut:], n_test, size, rng))
            ys.append(np.full(n_train, k, dtype=np.int64))
            yts.append(np.full(n_test, k, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(xts), np.concatenate(yts), list(sources)
    return build


# ----------------------------------------------------------------------------------------------
# The suite (order = index into the seed; never reorder, only append)

SETS: dict[str, SetSpec] = {s.name: s for s in [
    SetSpec("fashion-2k", "Fashion-MNIST train split (Debian dataset-fashion-mnist), 200 per class drawn with "
            "RandomState(134 + class); test: the full t10k split",
            "the tuned-on look at 1/30 of its N: isolates what N alone does to the default plan", _fashion_subset(200)),
    SetSpec("fashion-10k", "Fashion-MNIST train split, 1,000 per class (a superset of fashion-2k's draw); test: t10k",
            "the tuned-on look at N = 10,000, the issue's 20-minute target size", _fashion_subset(1000)),
    SetSpec("digits-28", "scikit-learn's load_digits (8x8, 0..16; in the wheel) scaled to 0..255, bicubic to 20x20 "
            "centred in 28x28; stratified 75/25 split", "the smallest N (~1,350) and a blocky, blurred look",
            _digits, ("sklearn",)),
    SetSpec("glyphs-8k", "10 characters (A G K R W & @ # ? Ω) rendered from 11 TTF fonts in matplotlib's wheel, "
            "random size, stroke, rotation ±25°, shift, Gaussian pixel noise σ = 10; 800/200 per class",
            "a look nobody tuned on at the issue's held-out N (8,000): thin strokes on black, many fonts per class",
            _glyphs),
    SetSpec("textures-20k", "28x28 grayscale patches (side 28..70, bilinear, random flip) of 10 pictures bundled in "
            "scikit-image's wheel (" + ", ".join(GRAY_SOURCES) + "); train patches from the top 70 % of rows, test "
            "from the bottom 30 %; 2,000/200 per class",
            "the largest N (20,000) and a look with no object: textures and blobs filling the frame",
            _picture_patches(GRAY_SOURCES, False, 28, 2000, 200), ("skimage",)),
    SetSpec("photos-rgb32", "32x32 RGB patches (side 32..80) of 10 colour pictures bundled in scikit-image's wheel ("
            + ", ".join(RGB_SOURCES) + "); top 70 % / bottom 30 % rows; 800/200 per class",
            "the 32x32 RGB architecture, never measured on this project's hardware, at N = 8,000",
            _picture_patches(RGB_SOURCES, True, 32, 800, 200), ("skimage",)),
]}


# ----------------------------------------------------------------------------------------------
# Writing, hashing, verifying


def array_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of one split as decoded: its shape, uint8 pixels (N, C, H, W) and int64 labels."""
    h = hashlib.sha256()
    h.update(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    from PIL import Image

    width = len(str(len(classes) - 1))
    dirs = [folder / f"{k:0{width}d}_{c}" for k, c in enumerate(classes)]
    for d in dirs:
        d.mkdir(parents=True)
    for i, (img, k) in enumerate(zip(images, labels)):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr, "L" if img.shape[0] == 1 else "RGB").save(dirs[int(k)] / f"{i:05d}.png")


def loaded_info(folder: Path) -> dict:
    """What the project's loader reads back from a written set: sizes, shape, classes, hashes."""
    info: dict = {}
    for split in ("train", "test"):
        ds = load_dataset(str(folder), split)
        info[f"n_{split}"] = len(ds)
        info[f"sha256_{split}"] = array_hash(ds.images.numpy(), ds.labels.numpy())
        info["shape"] = list(ds.shape)
        info["classes"] = ds.num_classes
    return info


def missing_packages(spec: SetSpec) -> list[str]:
    import importlib.util

    return [m for m in spec.needs if importlib.util.find_spec(m) is None]


def build_set(name: str, root: Path, force: bool = False) -> dict:
    """Write set `name` under root (atomically: a temporary folder renamed at the end) unless it is
    there already, and return what the loader reads back."""
    spec = SETS[name]
    missing = missing_packages(spec)
    if missing:
        raise SuiteError(f"{name} needs {', '.join(missing)}: pip install -e '.[bench]'")
    folder = root / name
    if folder.exists() and not force:
        return loaded_info(folder)
    x, y, xt, yt, classes = spec.build(np.random.RandomState(SEED + list(SETS).index(name)))
    tmp = root / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_split(tmp / "train", x, y, classes)
    _write_split(tmp / "test", xt, yt, classes)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return loaded_info(folder)


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"sets": {}}


def verify(name: str, info: dict, manifest: dict) -> None:
    frozen = manifest["sets"].get(name)
    if frozen is None:
        raise SuiteError(f"{name} is not in {MANIFEST.name}; the suite is frozen, add sets only by a reviewed commit")
    for key in ("n_train", "n_test", "classes", "shape", "sha256_train", "sha256_test"):
        if frozen[key] != info[key]:
            raise SuiteError(f"{name}: {key} is {info[key]!r} but the frozen manifest says {frozen[key]!r}; the "
                             "libraries drew other pixels (see the manifest's versions) or the files were changed: "
                             "rebuild with --force under the manifest's versions")


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("numpy", "pillow", "matplotlib", "scikit-learn", "scikit-image"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the sets are written (outside the repo)")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--force", action="store_true", help="rebuild sets that exist")
    p.add_argument("--write-manifest", action="store_true",
                   help="record the built sets as the frozen suite (only before any measurement)")
    a = p.parse_args(argv)
    root = a.root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest()
    status = 0
    for name in a.sets:
        spec = SETS[name]
        try:
            info = build_set(name, root, a.force)
            if a.write_manifest:
                manifest["sets"][name] = {**info, "source": spec.source, "why": spec.why}
            else:
                verify(name, info, manifest)
            print(f"{name}: {info['n_train']} train / {info['n_test']} test, {info['classes']} classes, "
                  f"shape {info['shape']}: {'recorded' if a.write_manifest else 'matches the manifest'}; "
                  f"{root / name}")
        except SuiteError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
    if a.write_manifest:
        manifest.update({"seed": SEED, "layout": "ROOT/<set>/{train,test}/<k>_<class>/<i>.png",
                         "versions": library_versions()})
        MANIFEST.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
