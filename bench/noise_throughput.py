"""Speed of the secret noise (issue #36): the run secret's Gaussian generator against `torch.randn`
on the same thread, and the time of one default Fashion-MNIST iteration's private draws.

    python bench/noise_throughput.py [--samples 1048576] [--repeats 7] [--threads 1] [--device cuda]
        [--skip-iteration] [--gil]

Prints, per device (the CPU; CUDA too when available or asked for):
- samples per second of `KeyedStream.normal_tensor` (float64 and float32 output) and of
  `torch.randn` (float32 and float64), and the ratios; target on the CPU: ≥ 1/3 of `torch.randn`;
- the private draws of one default Fashion-MNIST iteration (ε = 10): recorded from a real
  trainer (every stream it opens and every read it makes, with sizes), then replayed and timed on
  one thread; target ≤ 2 ms for a DPAF-phase iteration on one core;
- with `--gil`: whether a stream read releases the GIL (a pure-Python thread keeps running during
  one large read, or pauses for all of it).

Only the public API that the old SHAKE-256 generator also had is used (`RunSecret.stream`,
`normal_tensor`, the trainer's own calls), so the same script measures the code before and
after the change: `PYTHONPATH=<old checkout> python bench/noise_throughput.py`.
Medians of `--repeats` runs; the machine is shared, so compare ratios measured in one run.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch

from dpaf_ray.privacy.randomness import RunSecret


def seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    return statistics.median(seconds(fn, repeats, sync))


def throughput(device: str, n: int, repeats: int) -> None:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    secret = RunSecret.from_public_seed(0)
    counter = iter(range(10 ** 9))

    def secret_normals(dtype: torch.dtype) -> Callable[[], object]:
        return lambda: secret.stream("noise/bench", next(counter)).normal_tensor((n,), dtype=dtype, device=device)

    rows = {
        "secret normal_tensor float64": secret_normals(torch.float64),
        "secret normal_tensor float32": secret_normals(torch.float32),
        "torch.randn float32": lambda: torch.randn(n, device=device),
        "torch.randn float64": lambda: torch.randn(n, dtype=torch.float64, device=device),
    }
    rate = {k: n / median_seconds(f, repeats, sync) for k, f in rows.items()}
    print(f"\n[{device}] {n:,} samples per call, median of {repeats}, {torch.get_num_threads()} torch thread(s)")
    for k, r in rate.items():
        print(f"  {k:32s} {r / 1e6:9.1f} M samples/s")
    for out in ("float32", "float64"):
        for ref in ("float32", "float64"):
            print(f"  ratio secret({out}) / torch.randn({ref}): "
                  f"{rate[f'secret normal_tensor {out}'] / rate[f'torch.randn {ref}']:.3f}")


class Recorder:
    """Stands in for a KeyedStream: forwards every call and records it (method, arguments)."""

    def __init__(self, stream, log: list) -> None:
        self._stream, self._log = stream, log

    def __getattr__(self, name: str):
        attr = getattr(self._stream, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._log.append((name, args, kwargs))
            return attr(*args, **kwargs)
        return call


def record_iteration(trainer, t: int) -> list[tuple[str, int, list]]:
    """Every private stream that iteration t (D iteration and G steps) opens, with its reads."""
    secret = trainer.secret
    streams: list[tuple[str, int, list]] = []
    original = type(secret).stream

    def recording(self, name: str, iteration: int = 0):
        log: list = []
        streams.append((name, iteration, log))
        return Recorder(original(self, name, iteration), log)

    type(secret).stream = recording
    try:
        trainer.d_iteration(t)
        if trainer.g_step_after(t):
            trainer.g_step(t)
    finally:
        type(secret).stream = original
    return streams


def replay(secret: RunSecret, streams: list[tuple[str, int, list]]) -> None:
    for name, iteration, calls in streams:
        s = secret.stream(name, iteration)
        for method, args, kwargs in calls:
            getattr(s, method)(*args, **kwargs)


def describe(streams: list[tuple[str, int, list]]) -> str:
    parts = []
    for name, _, calls in streams:
        sizes = []
        for method, args, _ in calls:
            n = args[0] if method != "normal_tensor" else int(torch.Size(args[0]).numel())
            sizes.append(f"{method}({n:,})")
        parts.append(f"{name}: " + ", ".join(sizes))
    return "; ".join(parts)


def iteration_draws(repeats: int) -> None:
    from dpaf_ray.config import TrainConfig
    from dpaf_ray.run import prepare
    from dpaf_ray.training.loop import make_trainer

    secret = RunSecret.from_public_seed(0)
    cfg = TrainConfig(dataset="fashion-mnist", epsilon=10.0, seed=0, reproducible_noise=True)
    cfg, data, plan, secret = prepare(cfg, secret)
    trainer = make_trainer(cfg, data.train, len(data.train), 0, None, "cpu", secret,
                           plan.schedule.sampling_rate, plan.schedule)
    trainer.draw_ahead.enabled = False  # record what the iteration itself asks for
    P = trainer.prefix_iterations
    kinds = {"classifier phase (t = 0)": 0} if P else {}
    kinds.update({f"DPAF phase with conv2 release (t = {P})": P,
                  f"DPAF phase without it (t = {P + 1})": P + 1})
    print(f"\n[one default Fashion-MNIST iteration's private draws] N = {len(data.train):,}, "
          f"{P} classifier iterations of {plan.iterations}, draws replayed on one thread, {5 * repeats} times")
    for label, t in kinds.items():
        if t >= plan.iterations:
            continue
        streams = record_iteration(trainer, t)
        normals = sum(int(torch.Size(a[0]).numel()) for _, _, calls in streams
                      for m, a, _ in calls if m == "normal_tensor")
        times = seconds(lambda: replay(secret, streams), 5 * repeats)
        print(f"  {label}: median {statistics.median(times) * 1e3:6.2f} ms, fastest {min(times) * 1e3:6.2f} ms "
              f"({normals:,} Gaussian samples; {describe(streams)})")


def gil_check(n_bytes: int = 64 << 20) -> None:
    """Does a stream read release the GIL? A pure-Python thread counts loop turns while another
    thread makes one large read: if the read holds the GIL, the counter stops for the whole call."""
    secret = RunSecret.from_public_seed(0)
    stamps: list[float] = []
    stop = False

    def spin() -> None:
        while not stop:
            stamps.append(time.perf_counter())
            for _ in range(200):
                pass

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    secret.stream("gil", 0).read(n_bytes)
    t1 = time.perf_counter()
    stop = True
    th.join()
    turns = sum(t0 <= s <= t1 for s in stamps)
    pause = max((b - a for a, b in zip(stamps, stamps[1:]) if b >= t0 and a <= t1), default=t1 - t0)
    print(f"\n[GIL] one read of {n_bytes >> 20} MiB took {(t1 - t0) * 1e3:.0f} ms; a Python thread ran {turns:,} "
          f"loop turns meanwhile, longest pause {pause * 1e3:.0f} ms "
          f"({'the read holds the GIL' if pause > 0.8 * (t1 - t0) else 'the read releases the GIL'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="also time this device (default: cuda when available)")
    ap.add_argument("--skip-iteration", action="store_true", help="skip the Fashion-MNIST iteration")
    ap.add_argument("--gil", action="store_true", help="check whether a stream read releases the GIL")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"]
    extra = args.device or ("cuda" if torch.cuda.is_available() else None)
    if extra and extra != "cpu":
        devices.append(extra)
    for device in devices:
        throughput(device, args.samples, args.repeats)
    if not args.skip_iteration:
        iteration_draws(args.repeats)
    if args.gil:
        gil_check()


if __name__ == "__main__":
    main()
