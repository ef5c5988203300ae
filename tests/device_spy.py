"""A device-recording stand-in for CUDA (issue #36), shared by the GPU-path tests.

`meta` stands in for CUDA (`DPAF_TEST_GPU_AS=meta`): it refuses to mix devices as CUDA does, and
reading a value back gives zeros. On top of that, `DeviceSpy` records the device of every heavy op
(convolutions and matrix products, forward and backward), so a part of a GPU run that silently
computes on the CPU (a labeller, a scoring classifier, `evaluate`) shows up in `spy.cpu_ops`
even though nothing mixed devices.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HEAVY = ("convolution", "convolution_backward", "addmm", "mm", "bmm", "matmul", "linear", "_convolution")


class MetaAsGPU(TorchDispatchMode):
    """`meta` stands in for CUDA; reading a value back (`.item()`, `.cpu()`) gives zeros."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            return False if args[0].dtype == torch.bool else (0.0 if args[0].dtype.is_floating_point else 0)
        if func is aten._to_copy.default and args[0].device.type == "meta":
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cpu":
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type == "meta":
            return args[0].zero_()
        return func(*args, **kwargs)


class DeviceSpy(MetaAsGPU):
    """`meta` as the GPU; records where every convolution and matrix product ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[tuple[str, str]] = Counter()  # (op, device type) -> count
        self.device_reads = 0  # values read back from the device to the host (a sync on CUDA)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HEAVY:
            for d in {a.device.type for a in args if isinstance(a, torch.Tensor)}:
                self.ops[(func.overloadpacket.__name__, d)] += 1
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.device_reads += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def count(self, device: str) -> int:
        return sum(n for (_, d), n in self.ops.items() if d == device)

    @property
    def cpu_ops(self) -> dict[str, int]:
        return {op: n for (op, d), n in self.ops.items() if d == "cpu"}

    def reset(self) -> None:
        self.ops.clear()
        self.device_reads = 0
