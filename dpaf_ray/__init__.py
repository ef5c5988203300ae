"""DPAF: differentially private image generators, trained and tuned with Ray.

The Python API (`dpaf_ray.train`, `dpaf_ray.tune`, `dpaf_ray.load_generator`,
`dpaf_ray.privacy_report`, `Run`, `Search`) lives in `dpaf_ray.api` and is loaded on first
use, so `import dpaf_ray` stays light.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "Search", "load_generator", "privacy_report", "train", "tune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpaf_ray' has no attribute {name!r}")
