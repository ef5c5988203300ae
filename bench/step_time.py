"""DPAF against the DP-SGD GAN: time of one training iteration (D iteration + G step) at the
same architecture and batch (B = 256, 28×28), side by side in one run, and the two per-record
gradient engines (torch.func vmap∘grad vs Opacus GradSampleModule).

    python bench/step_time.py [--iterations 30] [--threads 2] [--batch-size 256]
        [--device cuda] [--draw-ahead auto|on|off|both] [--variants dpaf/functorch,...] [--out FILE]

Runs are interleaved (A, B, A, B, ...) so that a background load hits both alike; the
median per-iteration time of each is reported. Target: DPAF ≤ 0.6× the DP-SGD GAN.
On CUDA each timed iteration ends with a synchronize. `--draw-ahead both` times every variant
with and without the next iteration's draws made in the background (training.draw_ahead);
`auto` is what training does (on for CUDA, off for the CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpaf_ray.config import TrainConfig
from dpaf_ray.training.draw_ahead import default_enabled
from dpaf_ray.data import load_dataset
from dpaf_ray.training.loop import make_trainer
from dpaf_ray.collectives import LocalCollective


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_iterations(trainer, start: int, n: int, device: str = "cpu") -> list[float]:
    out = []
    _sync(device)
    for t in range(start, start + n):
        t0 = time.perf_counter()
        trainer.d_iteration(t)
        trainer.g_step(t)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--draw-ahead", choices=["auto", "on", "off", "both"], default="auto")
    ap.add_argument("--variants", default=None, help="comma-separated subset, e.g. dpaf/functorch")
    ap.add_argument("--out", default=None, help="results file (default: bench/results/step_time.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.dataset, "train")
    except Exception:
        data = load_dataset("mnist-5k", "train")
    variants = {
        # k = 1: conv2's DP-SGD release on every iteration, the slowest DPAF schedule (the default
        # k = 2 skips it every other iteration, and a median would hide that)
        "dpaf/functorch": dict(model="dpaf", grad_engine="functorch", sgd_every=1),
        "dpaf/opacus": dict(model="dpaf", grad_engine="opacus", sgd_every=1),
        "dpsgd-gan/functorch": dict(model="dpsgd-gan", grad_engine="functorch"),
        "dpsgd-gan/opacus": dict(model="dpsgd-gan", grad_engine="opacus"),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    auto = default_enabled(torch.device(args.device))
    modes = {"auto": [auto], "on": [True], "off": [False], "both": [False, True]}[args.draw_ahead]
    trainers = {}
    for name, kw in variants.items():
        cfg = TrainConfig(batch_size=args.batch_size, group_size=min(128, args.batch_size), seed=0, **kw).validate()
        for ahead in modes:
            key = name if len(modes) == 1 else f"{name}{'+ahead' if ahead else ''}"
            trainers[key] = make_trainer(cfg, data, len(data), 0, LocalCollective(), args.device)
            trainers[key].draw_ahead.enabled = ahead
            time_iterations(trainers[key], 0, 2, args.device)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(args.rounds):
        for name, tr in trainers.items():
            times[name] += time_iterations(tr, 2 + r * args.iterations, args.iterations, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"data {data.name} N={len(data)}, B={args.batch_size}, threads={args.threads}, device={args.device}, "
          f"draw-ahead={args.draw_ahead}, {args.rounds}×{args.iterations} interleaved iterations each "
          "(median seconds per iteration)")
    for k, v in med.items():
        print(f"  {k:22s} {v * 1000:8.1f} ms")
    ratios = {}
    if {"dpaf/functorch", "dpaf/opacus", "dpsgd-gan/functorch", "dpsgd-gan/opacus"} <= set(med):
        best_dpaf = min(med["dpaf/functorch"], med["dpaf/opacus"])
        best_base = min(med["dpsgd-gan/functorch"], med["dpsgd-gan/opacus"])
        ratios = {
            "dpaf_over_dpsgd_gan (best engine each)": best_dpaf / best_base,
            "dpaf_functorch_over_opacus": med["dpaf/functorch"] / med["dpaf/opacus"],
            "dpsgd_gan_functorch_over_opacus": med["dpsgd-gan/functorch"] / med["dpsgd-gan/opacus"],
        }
    for name in variants:
        if f"{name}+ahead" in med:
            ratios[f"{name} with draw-ahead over without"] = med[f"{name}+ahead"] / med[name]
    for k, v in ratios.items():
        print(f"  ratio {k:40s} {v:.3f}")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "step_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"median_seconds": med, "ratios": ratios, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
