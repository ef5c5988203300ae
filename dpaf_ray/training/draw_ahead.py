"""Host-side draws of the coming iterations, made while the device runs this one (issues #17, #36).

Every draw of iteration t is a pure function of (run secret or public seed, stream name, t), never
of data or of the model: the Poisson sample and its group draws (`privacy.randomness`, AES-256-CTR
keystreams of the run secret; a privacy requirement, so CUDA's Philox never replaces them), the
generated codes (`training.rng`) and, on rank 0, the noise of the releases. `DrawAhead` computes
them in background threads for the next iterations, in both phases of a DPAF run (the label
classifier's own sample and noise too), gathers the sampled records' uint8 images, and pins
everything bound for CUDA, so the iteration starts with non-blocking copies instead of the device
waiting for the host. On CUDA the noise is drawn ahead as cipher words and turned into Gaussians on
the device (`randomness.gaussians_from_words`), where the on-demand path turns them too; on the
CPU it is drawn ahead as float64 Gaussians.

How far ahead: one iteration while the draws take less than a step; when a draw takes longer than
a step (a fast GPU, a slow host), `depth` grows to ⌈draw time / step time⌉ iterations in flight,
each in its own thread (the cipher and torch release the GIL, so they run in parallel), at most
`max_depth` (`DPAF_DRAW_AHEAD_DEPTH`, default 4).

Nothing changes in what is drawn: the same streams, read the same way, give the same numbers
(`tests/test_gpu_paths.py` checks bit-equality with and without drawing ahead). A draw that was
not made ahead (the first iteration, a resumed run, a release whose size is not known yet, another
stream) is made when it is asked for, as before. Noise is still drawn by rank 0 only ("noise once"),
and drawing it early releases nothing: a release happens when the noise is added and all-reduced.

On by default where the device is CUDA; `DPAF_DRAW_AHEAD=1|0` forces it on or off (benchmarks).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..devices import host_to_device, pinned
from ..privacy.randomness import gaussians_from_words

if TYPE_CHECKING:  # pragma: no cover
    from .gan import GANTrainerBase

DRAW_AHEAD_ENV = "DPAF_DRAW_AHEAD"
DEPTH_ENV = "DPAF_DRAW_AHEAD_DEPTH"
DEFAULT_MAX_DEPTH = 4


def default_enabled(device: torch.device) -> bool:
    forced = os.environ.get(DRAW_AHEAD_ENV)
    if forced is not None and forced != "":
        return forced not in ("0", "false", "no", "off")
    return device.type == "cuda"


def default_max_depth() -> int:
    raw = os.environ.get(DEPTH_ENV, "")
    if raw == "":
        return DEFAULT_MAX_DEPTH
    try:
        depth = int(raw)
    except ValueError:
        depth = 0
    if depth < 1:
        raise ValueError(f"{DEPTH_ENV}={raw!r}: give a whole number of iterations ≥ 1 (default {DEFAULT_MAX_DEPTH})")
    return depth


@dataclass
class DrawPlan:
    """What iteration t will ask for (public: a function of t and the configuration)."""

    sample: bool = False  # a Poisson sample of the records
    codes: list[str] = field(default_factory=list)  # generated-code streams
    noise: list[str] = field(default_factory=list)  # release names whose noise rank 0 draws
    sample_stream: str = "poisson"  # the sample's stream (the classifier phase has its own) …
    sample_rate: float | None = None  # … and its rate (None: the trainer's q)


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
    sample_key: tuple[str, float | None] | None = None  # (stream, rate) the sample was drawn from
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # (release, n) -> float64 normals (CPU training) or the int64 cipher words of n normals (other devices)
    noise: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


class PrefetchedNoise:
    """Stands in for the `KeyedStream` of one release: serves the noise drawn ahead when the
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
        # The same arithmetic as KeyedStream.normal_tensor: float64 on the device, scaled, then cast.
        z = host_to_device(z, torch.device(device))
        if z.dtype == torch.int64:
            z = gaussians_from_words(z, n)
        return z.mul_(float(std)).to(dtype).view(*shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class DrawAhead:
    """Background threads that draw the next `depth` iterations while iteration t runs."""

    def __init__(self, trainer: "GANTrainerBase", enabled: bool, max_depth: int | None = None) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.max_depth = max_depth if max_depth is not None else default_max_depth()
        self.depth = 1  # iterations drawn ahead now (adapted to draw time / step time)
        self.noise_sizes: dict[str, int] = {}
        self._current: IterationDraws | None = None
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.hits = 0  # draws served from ahead, and draws made on demand (tests, benchmarks)
        self.misses = 0
        self.wait_seconds = 0.0  # time the training thread spent waiting for draws made ahead (benchmarks)
        self.draw_seconds: float | None = None  # running means of one iteration's draws and of one step
        self.step_seconds: float | None = None
        self._last: tuple[int, float] | None = None

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def draws(self, t: int) -> IterationDraws | None:
        """The draws made ahead for iteration t (None when disabled); schedules the next ones."""
        if not self.enabled:
            return None
        if self._current is not None and self._current.t == t:
            return self._current
        now = time.perf_counter()
        if self._last is not None and t == self._last[0] + 1:
            self.step_seconds = _mean(self.step_seconds, now - self._last[1])
        self._last = (t, now)
        current = IterationDraws(t)
        future = self._pending.pop(t, None)
        if future is not None:
            current = future.result()  # re-raises a failure of the background draw
            self.wait_seconds += time.perf_counter() - now
        for k in [k for k in self._pending if k < t]:  # another iteration's draws (a restart): unused
            self._pending.pop(k).cancel()
        self._current = current
        self._adapt_depth()
        for k in range(t + 1, t + 1 + self.depth):
            if k not in self._pending:
                self._schedule(k)
        return current

    def _adapt_depth(self) -> None:
        if self.draw_seconds is None or not self.step_seconds:
            return
        self.depth = max(1, min(self.max_depth, math.ceil(self.draw_seconds / self.step_seconds)))

    def _schedule(self, t: int) -> None:
        plan = self.trainer.draw_plan(t)
        if not (plan.sample or plan.codes or plan.noise):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_depth, thread_name_prefix="dpaf-draw-ahead")
        sizes = dict(self.noise_sizes)
        self._pending[t] = self._pool.submit(self._timed_compute, t, plan, sizes)

    def _timed_compute(self, t: int, plan: DrawPlan, sizes: dict[str, int]) -> IterationDraws:
        t0 = time.perf_counter()
        out = self._compute(t, plan, sizes)
        self.draw_seconds = _mean(self.draw_seconds, time.perf_counter() - t0)
        return out

    def _compute(self, t: int, plan: DrawPlan, sizes: dict[str, int]) -> IterationDraws:
        tr = self.trainer
        out = IterationDraws(t)
        if plan.sample:
            out.sample = tr.host_sample(t, plan.sample_stream, plan.sample_rate)
            out.sample_key = (plan.sample_stream, plan.sample_rate)
        for name in plan.codes:
            out.codes[name] = tuple(pinned(c, tr.device) for c in tr.host_codes(t, name))  # type: ignore[assignment]
        if tr.collective.rank == 0:  # noise once: only rank 0 draws it
            for release in plan.noise:
                n = sizes.get(release)
                if n is None:
                    continue
                stream = tr.noise_stream_raw(t, release)
                if tr.device.type == "cpu":
                    out.noise[(release, n)] = stream.normal_float64(n)
                else:  # the device turns the words into Gaussians, as on demand
                    out.noise[(release, n)] = pinned(stream.normal_words_tensor(n), tr.device)
        return out

    def close(self) -> None:
        for future in self._pending.values():
            if not future.cancel():
                try:
                    future.result()
                except Exception:  # pragma: no cover - the next draw would have raised it
                    pass
        self._pending = {}
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _mean(old: float | None, new: float, weight: float = 0.2) -> float:
    """A running mean that follows the recent iterations (draw and step times drift with load)."""
    return new if old is None else (1 - weight) * old + weight * new
