"""What the Ray side of a run asks of the machine or cluster: CPU and GPU shares per worker, the
torch.distributed backend of a Ray Train run, and the test hooks forwarded to Ray workers.

Collectives (docs/design.md §5) go through a process group whose backend is chosen by `torch_backend`:
"cpu:gloo,cuda:nccl" when every worker owns its GPUs (NCCL for CUDA tensors, gloo for any CPU
tensor), and plain "gloo" when workers share a GPU (fractional `gpus_per_worker`): NCCL refuses
two ranks on one device ("Duplicate GPU detected"), while gloo reduces CUDA tensors through the host.

Which device a tensor computes on, and how host data reaches it, stays a floor down in `devices`.
"""
from __future__ import annotations

import os

from .config import ConfigError
from .devices import TEST_GPU_ENV, test_gpu_stand_in


def local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_backend(use_gpu: bool, gpus_per_worker: float = 1.0) -> str:
    """The torch.distributed backend of a Ray Train run (see the module docstring)."""
    if not use_gpu or test_gpu_stand_in():
        return "gloo"
    if gpus_per_worker < 1:
        return "gloo"  # workers may share a GPU: NCCL would refuse ("Duplicate GPU detected")
    return "cpu:gloo,cuda:nccl"


def forwarded_env() -> dict[str, str]:
    """Test hooks that Ray workers, trials and tasks must see as the driver does."""
    stand_in = test_gpu_stand_in()
    return {TEST_GPU_ENV: stand_in} if stand_in else {}


def check_cpu_share(value: float, key: str) -> float:
    """Ray reserves a positive number of CPUs per worker; 0 would let workers pile onto one core."""
    if not value > 0:
        raise ConfigError(f"{key} must be > 0 CPUs per worker, got {value}")
    return float(value)


def check_gpu_fraction(value: float, key: str) -> float:
    """Ray accepts a fraction of one GPU or a whole number of GPUs per worker."""
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
    if value > 1 and value != int(value):
        raise ConfigError(f"{key}: Ray gives a worker either a fraction of one GPU (0 < g ≤ 1) or whole GPUs, "
                          f"got {value}")
    if value < 1 and round(value, 4) != value:
        raise ConfigError(f"{key}: Ray schedules GPU fractions to 4 decimal places, got {value}")
    return float(value)
