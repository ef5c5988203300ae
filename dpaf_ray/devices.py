"""Which device a part of a run computes on, and how host data reaches it (issue #17).

One rule everywhere: `--use-gpu` means CUDA, or an error that says what to do. Nothing falls back
to the CPU silently: the in-process trainer, a Tune trial, the scoring of a trial and `evaluate`
all ask `gpu_device()`, and the Ray Train workers ask Ray. What only the Ray side of a run needs
(worker shares, the process-group backend, the environment forwarded to workers) lives a floor up,
in `dpaf_ray.ray_resources`.

Tests on machines without CUDA set `DPAF_TEST_GPU_AS` (e.g. to "cpu"): Ray then schedules the
GPUs a test cluster declares (`ray.init(num_gpus=1)`), and the code computes on the named device
instead of CUDA. It is a test hook, named in every message it changes, never a fallback.
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError

TEST_GPU_ENV = "DPAF_TEST_GPU_AS"  # tests only: compute on this device where a (fake) GPU was scheduled


class DeviceError(ConfigError):
    """A device the run asks for is not there; the message says what to do."""


def test_gpu_stand_in() -> str | None:
    """The device that stands in for CUDA in tests (`DPAF_TEST_GPU_AS`), or None."""
    return os.environ.get(TEST_GPU_ENV) or None


def gpu_device(flag: str = "--use-gpu") -> str:
    """"cuda", or the test stand-in; raises DeviceError when no CUDA GPU is visible."""
    stand_in = test_gpu_stand_in()
    if stand_in:
        return stand_in
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise DeviceError(f"{flag}: no CUDA GPU is visible to this process{hint} (torch.cuda.is_available() is "
                          f"False); drop {flag} to run on the CPU, or check the driver and CUDA_VISIBLE_DEVICES")
    return "cuda"


def device_for(use_gpu: bool, flag: str = "--use-gpu") -> str:
    return gpu_device(flag) if use_gpu else "cpu"


def local_gpu_count() -> int:
    """GPUs this process could use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait: pinned memory and a
    non-blocking copy on CUDA (the caching host allocator keeps the pinned block alive until
    the copy has run); a plain copy elsewhere."""
    if device.type == "cuda":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in pinned memory when it is bound for a CUDA device (done ahead, off the critical path)."""
    return t.pin_memory() if device.type == "cuda" else t
