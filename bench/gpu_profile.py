"""One device's profile of a training iteration, for bench/gpu_smoke.sh (issue #36): DPAF against
the DP-SGD GAN at the default configuration, the share of each step spent waiting for the
private draws, and the host syncs per iteration.

    python bench/gpu_profile.py [--device cuda] [--iterations 20] [--threads 1] [--out FILE]

Per model (default configuration, B = 256; the DPAF run's classifier phase and GAN phase are timed
separately, since the label classifier's steps have their own draws):
- median wall time of one iteration (D iteration, and G steps where due; a synchronize at the end
  of each on CUDA), draw-ahead as training sets it (`--draw-ahead on|off|auto`);
- draw wait: the time the training thread spent waiting for draws made ahead
  (`DrawAhead.wait_seconds`) over the timed wall time; and the draws' own time per iteration
  against the step (`draw_seconds / step_seconds`, what they would cost inline);
- host syncs per iteration, counted in the training thread: every value read back to the host
  (`.item()`, `bool(t)`, `float(t)`: `aten._local_scalar_dense`), every op whose output size
  depends on values (`nonzero`, boolean masks), and every device-to-host copy; on CUDA also the
  syncs that `torch.cuda.set_sync_debug_mode("warn")` reports. Only reads of tensors on the run's
  device count, so on the CPU (a dry run) the count is an upper bound: it includes reads of
  host-side scalars such as Adam's step counts (27 of a DPAF iteration's 36) and `F.one_hot`'s
  range checks (8; on CUDA it skips them), which cost a GPU nothing.
Prints a table and writes JSON. No timed assertions: a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpaf_ray.collectives import LocalCollective
from dpaf_ray.config import TrainConfig
from dpaf_ray.data import load_dataset
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.training.loop import make_trainer

aten = torch.ops.aten
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "bincount", "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops of this thread that make the host wait for the device (see the module docstring)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device).type
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten._local_scalar_dense.default:
            if args[0].device.type == self.device:  # on CUDA, reading a CPU scalar (Adam's step count) is no sync
                self.counts["read a value (.item/bool/float)"] += 1
        elif name in DATA_DEPENDENT:
            self.counts[f"data-dependent size ({name})"] += 1
        elif name == "_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" \
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            self.counts["device-to-host copy"] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else []) if i is not None):
            self.counts["data-dependent size (boolean index)"] += 1
        return func(*args, **kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_iteration(trainer, t: int) -> None:
    trainer.d_iteration(t)
    if trainer.g_step_after(t):
        trainer.g_step(t)


def profile(trainer, start: int, n: int, device: str) -> dict:
    """Times n iterations from `start` (after 2 untimed ones), then counts the syncs of one more."""
    for t in range(start, start + 2):
        one_iteration(trainer, t)
    _sync(device)
    da = trainer.draw_ahead
    wait0 = da.wait_seconds
    times = []
    for t in range(start + 2, start + 2 + n):
        t0 = time.perf_counter()
        one_iteration(trainer, t)
        _sync(device)
        times.append(time.perf_counter() - t0)
    wait = da.wait_seconds - wait0
    counter = SyncCounter(device)
    cuda_syncs = None
    t = start + 2 + n
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                one_iteration(trainer, t)
        finally:
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode(0)
    if device.startswith("cuda"):
        cuda_syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return {"median_seconds": statistics.median(times), "iterations": n, "draw_ahead": da.enabled,
            "draw_wait_share": wait / sum(times), "draw_seconds_over_step": (da.draw_seconds / da.step_seconds)
            if da.draw_seconds and da.step_seconds else None, "draw_ahead_depth": da.depth,
            "host_syncs_per_iteration": sum(counter.counts.values()), "host_syncs_by_kind": dict(counter.counts),
            "cuda_sync_warnings_per_iteration": cuda_syncs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--draw-ahead", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.dataset, "train")
    except Exception:  # noqa: BLE001 - no Fashion-MNIST here: the embedded MNIST-5k
        data = load_dataset("mnist-5k", "train")
    rows = {}
    for name, kw, start in (("dpaf (GAN phase)", dict(model="dpaf"), None),
                            ("dpaf (classifier phase)", dict(model="dpaf"), 0),
                            ("dpsgd-gan", dict(model="dpsgd-gan", classifier_steps=0), 0)):
        cfg = TrainConfig(seed=0, **kw)
        if name.startswith("dpaf"):
            cfg.classifier_steps = cfg.classifier_steps or 1000
        cfg = cfg.validate(len(data))
        trainer = make_trainer(cfg, data, len(data), 0, LocalCollective(), args.device, RunSecret.fresh())
        if args.draw_ahead != "auto":
            trainer.draw_ahead.enabled = args.draw_ahead == "on"
        first = cfg.prefix_iterations if start is None else start
        try:
            rows[name] = profile(trainer, first, args.iterations, args.device)
        finally:
            trainer.draw_ahead.close()
    gan = rows["dpaf (GAN phase)"]["median_seconds"] / rows["dpsgd-gan"]["median_seconds"]
    print(f"data {data.name} N={len(data)}, device={args.device}, threads={args.threads}, "
          f"{args.iterations} timed iterations each (median)")
    print(f"  {'model':26s} {'ms/iter':>9s} {'draw wait':>10s} {'draws/step':>11s} {'depth':>6s} {'host syncs':>11s}")
    for name, r in rows.items():
        ds = r["draw_seconds_over_step"]
        cuda = f" (CUDA reports {r['cuda_sync_warnings_per_iteration']})" \
            if r["cuda_sync_warnings_per_iteration"] is not None else ""
        print(f"  {name:26s} {r['median_seconds'] * 1000:9.1f} {r['draw_wait_share'] * 100:9.1f}% "
              f"{'-' if ds is None else f'{ds:.2f}':>11s} {r['draw_ahead_depth']:6d} "
              f"{r['host_syncs_per_iteration']:11d}{cuda}")
        for kind, n in sorted(r["host_syncs_by_kind"].items()):
            print(f"      {n:4d}  {kind}")
    print(f"  step-time ratio DPAF / DP-SGD GAN (GAN phase): {gan:.3f}")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"gpu_profile_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "dpaf_over_dpsgd_gan": gan, "args": vars(args),
                               "data": data.name}, indent=1))


if __name__ == "__main__":
    main()
