"""DPAF against the DP-SGD GAN: time of one training iteration (D iteration + G step) at the
same architecture and batch (B = 256, 28×28), side by side in one run, and the two per-record
gradient engines (torch.func vmap∘grad vs Opacus GradSampleModule).

    python bench/step_time.py [--iterations 30] [--threads 2] [--batch-size 256]

Runs are interleaved (A, B, A, B, ...) so that a background load hits both alike; the
median per-iteration time of each is reported. Target: DPAF ≤ 0.6× the DP-SGD GAN.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpaf_ray.config import TrainConfig
from dpaf_ray.data import load_dataset
from dpaf_ray.training.loop import make_trainer
from dpaf_ray.distributed.collectives import LocalCollective


def time_iterations(trainer, start: int, n: int) -> list[float]:
    out = []
    for t in range(start, start + n):
        t0 = time.perf_counter()
        trainer.d_iteration(t)
        trainer.g_step(t)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dataset", default="fashion-mnist")
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
    trainers = {}
    for name, kw in variants.items():
        cfg = TrainConfig(batch_size=args.batch_size, group_size=min(128, args.batch_size), seed=0, **kw).validate()
        trainers[name] = make_trainer(cfg, data, len(data), 0, LocalCollective(), "cpu")
        time_iterations(trainers[name], 0, 2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, tr in trainers.items():
            times[name] += time_iterations(tr, 2 + r * args.iterations, args.iterations)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"data {data.name} N={len(data)}, B={args.batch_size}, threads={args.threads}, "
          f"{args.rounds}×{args.iterations} interleaved iterations each (median seconds per iteration)")
    for k, v in med.items():
        print(f"  {k:22s} {v * 1000:8.1f} ms")
    best_dpaf = min(med["dpaf/functorch"], med["dpaf/opacus"])
    best_base = min(med["dpsgd-gan/functorch"], med["dpsgd-gan/opacus"])
    ratios = {
        "dpaf_over_dpsgd_gan (best engine each)": best_dpaf / best_base,
        "dpaf_functorch_over_opacus": med["dpaf/functorch"] / med["dpaf/opacus"],
        "dpsgd_gan_functorch_over_opacus": med["dpsgd-gan/functorch"] / med["dpsgd-gan/opacus"],
    }
    for k, v in ratios.items():
        print(f"  ratio {k:40s} {v:.3f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "step_time.json").write_text(json.dumps({"median_seconds": med, "ratios": ratios, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
