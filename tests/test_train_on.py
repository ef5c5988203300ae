"""`ray_train.train_on` is the one in-process / Ray Train dispatch: its Ray Train keywords are
checked on both paths, so a misspelt one cannot be dropped silently by a local run."""
import pytest

from dpaf_ray.ray_train import train_on


def test_a_misspelt_ray_train_keyword_fails_in_a_local_run_too():
    with pytest.raises(TypeError, match="storage_pth"):
        train_on(None, None, 0, secret=None, journal=None, storage_pth="/tmp/x")  # nothing runs before the check
