"""Host-side draws of the next iteration, made while the device runs this one (issue #17).

Every draw of iteration t is a pure function of (run secret or public seed, stream name, t), never
of data or of the model: the Poisson sample and its group draws (`privacy.randomness`, SHAKE-256 on
the CPU; a privacy requirement, so CUDA's Philox never replaces it), the generated codes
(`training.rng`) and, on rank 0, the noise vectors of the releases. `DrawAhead` computes them for
t + 1 in one background thread while the device computes iteration t, gathers the sampled records'
uint8 images, and pins everything bound for CUDA, so the iteration starts with non-blocking copies
instead of the GPU waiting for the CPU.

Nothing changes in what is drawn: the same streams, read the same way, give the same numbers
(`tests/test_gpu_paths.py` checks bit-equality with and without drawing ahead). A draw that was
not made ahead (the first iteration, a resumed run, a release whose size is not known yet, another
stream) is made when it is asked for, as before. Noise is still drawn by rank 0 only ("noise once"),
and drawing it early releases nothing: a release happens when the noise is added and all-reduced.

On by default where the device is CUDA; `DPAF_DRAW_AHEAD=1|0` forces it on or off (benchmarks).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..devices import host_to_device, pinned

if TYPE_CHECKING:  # pragma: no cover
    from .gan import GANTrainerBase

DRAW_AHEAD_ENV = "DPAF_DRAW_AHEAD"


def default_enabled(device: torch.device) -> bool:
    forced = os.environ.get(DRAW_AHEAD_ENV)
    if forced is not None and forced != "":
        return forced not in ("0", "false", "no", "off")
    return device.type == "cuda"


@dataclass
class DrawPlan:
    """What iteration t will ask for (public: a function of t and the configuration)."""

    sample: bool = False  # the GAN phase's Poisson sample (stream "poisson", the plan's q)
    codes: list[str] = field(default_factory=list)  # generated-code streams
    noise: list[str] = field(default_factory=list)  # release names whose noise rank 0 draws


@dataclass
class HostSample:
    """This rank's part of one Poisson sample, on the host (pinned when bound for CUDA)."""

    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor  # int64 (n,)
    group_uniforms: torch.Tensor  # float32 (n,)

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x in [-1, 1] as float32, y, group draws) on `device`; x as `ImageDataset.as_float` makes it."""
        x = host_to_device(self.images, device).to(torch.float32).div_(127.5).sub_(1.0)
        return x, host_to_device(self.labels, device), host_to_device(self.group_uniforms, device)


@dataclass
class IterationDraws:
    t: int
    sample: HostSample | None = None
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    noise: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (release, n) -> float64 normals


class PrefetchedNoise:
    """Stands in for the `KeyedStream` of one release: serves the normals drawn ahead when the
    size matches, otherwise draws from the stream itself; records each size for the next time."""

    def __init__(self, stream: Any, release: str, ahead: IterationDraws | None, owner: "DrawAhead") -> None:
        self._stream, self._release, self._ahead, self._owner = stream, release, ahead, owner

    def __repr__(self) -> str:
        return "PrefetchedNoise(<redacted>)"

    def normal_tensor(self, shape, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      std: float = 1.0) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        self._owner.noise_sizes[self._release] = n
        z = self._ahead.noise.pop((self._release, n), None) if self._ahead is not None else None
        self._owner.count(z is not None)
        if z is None:
            return self._stream.normal_tensor(shape, dtype=dtype, device=device, std=std)
        # The same arithmetic as KeyedStream.normal_tensor: scale in float64, then cast.
        z = host_to_device(z, torch.device(device))
        return z.mul_(float(std)).to(dtype).view(*shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class DrawAhead:
    """One background thread that draws iteration t + 1 while iteration t runs."""

    def __init__(self, trainer: "GANTrainerBase", enabled: bool) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.noise_sizes: dict[str, int] = {}
        self._current: IterationDraws | None = None
        self._pending: tuple[int, Future] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.hits = 0  # draws served from ahead, and draws made on demand (tests, benchmarks)
        self.misses = 0

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def draws(self, t: int) -> IterationDraws | None:
        """The draws made ahead for iteration t (None when disabled); schedules t + 1."""
        if not self.enabled:
            return None
        if self._current is not None and self._current.t == t:
            return self._current
        current = IterationDraws(t)
        if self._pending is not None:
            pending_t, future = self._pending
            self._pending = None
            result = future.result()  # re-raises a failure of the background draw
            if pending_t == t:
                current = result
        self._current = current
        self._schedule(t + 1)
        return current

    def _schedule(self, t: int) -> None:
        plan = self.trainer.draw_plan(t)
        if not (plan.sample or plan.codes or plan.noise):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpaf-draw-ahead")
        sizes = dict(self.noise_sizes)
        self._pending = (t, self._pool.submit(self._compute, t, plan, sizes))

    def _compute(self, t: int, plan: DrawPlan, sizes: dict[str, int]) -> IterationDraws:
        tr = self.trainer
        out = IterationDraws(t)
        if plan.sample:
            out.sample = tr.host_sample(t)
        for name in plan.codes:
            out.codes[name] = tuple(pinned(c, tr.device) for c in tr.host_codes(t, name))  # type: ignore[assignment]
        if tr.collective.rank == 0:  # noise once: only rank 0 draws it
            for release in plan.noise:
                n = sizes.get(release)
                if n is not None:
                    z = torch.from_numpy(tr.noise_stream_raw(t, release).normal(n))
                    out.noise[(release, n)] = pinned(z, tr.device)
        return out

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending[1].result()
            except Exception:  # pragma: no cover - the next draw would have raised it
                pass
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
