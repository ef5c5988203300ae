"""Ray Train overhead and scaling, side by side in one run.

Iterations per second in-process, with Ray Train at W = 1 and W = 2 (one torch thread per
worker, B = 256 on mnist-5k by default). Each setting runs twice, with T1 and T2 iterations:
the steady per-iteration time is (t(T2) − t(T1)) / (T2 − T1), and the fixed start-up cost
(Ray workers, process group, data loading, final checkpoint) is t(T1) − T1 × that, reported
separately.

    python bench/scaling.py [--t1 40 --t2 120 --dataset mnist-5k --batch-size 256]

Targets: Ray W = 1 ≤ 1.15× in-process iteration time; W = 2 ≥ 1.5× W = 1 iterations per second.
On a 2-core machine W = 2 uses both cores; anything else running skews the ratios.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
import tempfile

import ray

from dpaf_ray.config import TrainConfig
from dpaf_ray.ray_train import fit_with_ray_train
from dpaf_ray.data.splits import SPLIT_LABEL
from dpaf_ray.training.loop import train_loop
from dpaf_ray.run import prepare


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t1", type=int, default=40)
    ap.add_argument("--t2", type=int, default=120)
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    def plan(t: int):
        cfg = TrainConfig(dataset=args.dataset, epsilon=50, iterations=t, seed=0, batch_size=args.batch_size,
                          group_size=min(128, args.batch_size), num_threads=1, checkpoint_every=max(t, 1),
                          log_every=max(t, 1))
        _, data, p, secret = prepare(cfg)
        return p, data, secret

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    tmp = Path(tempfile.mkdtemp())
    def ray(w: int):
        return lambda p, d, s: fit_with_ray_train(p, d, w, out=tmp / f"w{w}-{p.iterations}", progress=None,
                                                  secret=s, split_key=s.child(SPLIT_LABEL))

    settings = {
        "in-process": lambda p, d, s: train_loop(p, d.train, len(d.train), progress=None, secret=s),
        "ray W=1": ray(1),
        "ray W=2": ray(2),
    }
    rows = {}
    for name, run in settings.items():
        p1, d, s1 = plan(args.t1)
        p2, _, s2 = plan(args.t2)
        a = timed(lambda: run(p1, d, s1))
        b = timed(lambda: run(p2, d, s2))
        per_iter = (b - a) / (args.t2 - args.t1)
        rows[name] = {"seconds_per_iteration": per_iter, "iterations_per_second": 1 / per_iter,
                      "startup_seconds": a - args.t1 * per_iter}
    ray.shutdown()
    print(f"{args.dataset}, B={args.batch_size}, 1 torch thread per worker, T1={args.t1}, T2={args.t2}")
    for name, r in rows.items():
        print(f"  {name:11s} {r['iterations_per_second']:6.2f} it/s  ({r['seconds_per_iteration'] * 1000:7.1f} ms/it)"
              f"  start-up {r['startup_seconds']:6.1f} s")
    ratios = {
        "ray_w1_over_inprocess_iteration_time": rows["ray W=1"]["seconds_per_iteration"]
        / rows["in-process"]["seconds_per_iteration"],
        "w2_over_w1_throughput": rows["ray W=2"]["iterations_per_second"] / rows["ray W=1"]["iterations_per_second"],
    }
    for k, v in ratios.items():
        print(f"  ratio {k}: {v:.3f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
