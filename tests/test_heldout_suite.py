"""The held-out benchmark suite (issue #34) is frozen: building a set gives the bytes its manifest
records, the project's loader reads it, and a changed file is caught."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
heldout_sets = pytest.importorskip("heldout_sets")

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn is optional (pip install -e '.[bench]')")


@needs_sklearn
def test_smallest_set_builds_to_its_frozen_hashes_and_loads(tmp_path):
    from dpaf_ray.data import load_dataset

    manifest = heldout_sets.read_manifest()
    info = heldout_sets.build_set("digits-28", tmp_path)
    heldout_sets.verify("digits-28", info, manifest)  # deterministic: the same arrays as when frozen
    train = load_dataset(str(tmp_path / "digits-28"), "train")
    test = load_dataset(str(tmp_path / "digits-28"), "test")
    assert (len(train), len(test), train.num_classes, tuple(train.shape)) == (1347, 450, 10, (1, 28, 28))
    assert np.bincount(test.labels.numpy(), minlength=10).min() > 0  # every class is in the test split
    assert not (tmp_path / ".digits-28.partial").exists()


@needs_sklearn
def test_a_changed_file_fails_verification(tmp_path):
    manifest = heldout_sets.read_manifest()
    heldout_sets.build_set("digits-28", tmp_path)
    png = sorted((tmp_path / "digits-28" / "test").rglob("*.png"))[0]
    arr = np.asarray(Image.open(png)).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(png)
    with pytest.raises(heldout_sets.SuiteError, match="sha256_test"):
        heldout_sets.verify("digits-28", heldout_sets.build_set("digits-28", tmp_path), manifest)


def test_every_set_is_frozen():
    manifest = heldout_sets.read_manifest()["sets"]
    assert set(manifest) == set(heldout_sets.SETS)
    for name, entry in manifest.items():
        assert entry["n_train"] >= 1000 and entry["n_test"] >= 400, name
        assert len(entry["sha256_train"]) == len(entry["sha256_test"]) == 64, name
