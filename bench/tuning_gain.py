"""What private tuning costs and what it buys, at the same total ε (tuning included).

1. Per-trial budget: the ε that one trial's reference curve may use when the whole search must
   meet ε_total, under `random` (repeat-and-select, K ~ TNB) against `tpe` (K-fold composition),
   for several expected numbers of trials. Cheap; always printed.
2. With --train: the tuned best (python tune.py on a search space) against the default
   configuration trained once with the whole budget, both fully accounted, on Fashion-MNIST:
   downstream accuracy of a CNN trained on their synthetic data, tested on the real test split.

    python bench/tuning_gain.py [--epsilon 10] [--train --search-space search_spaces/fashion-mnist.yaml
                                 --max-iterations 1500 --out bench/results/tuning_gain]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from dpaf_ray.privacy.ledger import PrivacyLedger
from dpaf_ray.privacy.tuning import calibrate_reference


def per_trial_epsilon(epsilon: float, delta: float, q: float, sigma: float, score_noise: float,
                      search: str, mean: float, shape: float) -> tuple[float, int]:
    ref = calibrate_reference(epsilon, delta, q, sigma, score_noise, search, mean, shape)
    return PrivacyLedger(ref.entries(), ref.orders).epsilon(delta), ref.iterations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--n-train", type=int, default=54_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--search-space", default="search_spaces/fashion-mnist.yaml")
    ap.add_argument("--max-iterations", type=int, default=1500)
    ap.add_argument("--out", default="bench/results/tuning_gain")
    ap.add_argument("--expected-trials", type=float, default=None, help="override the search space's E[K]")
    ap.add_argument("--num-workers", type=int, default=None, help="override the Ray Train workers per trial")
    ap.add_argument("--time-budget-minutes", type=float, default=None, help="override the per-trial time budget")
    ap.add_argument("--eval-synthetic", type=int, default=20_000)
    args = ap.parse_args()
    q = args.batch_size / args.n_train
    rows = []
    print(f"total ε={args.epsilon:g}, δ={args.delta:g}, reference q={q:.4g}, σ=1, score σ=20")
    print(f"{'E[K]':>5} {'random ε/trial':>15} {'T_ref':>7} {'tpe ε/trial':>12} {'T_ref':>7} {'ratio T':>8}")
    for mean in (2, 3, 5, 10):
        er, tr = per_trial_epsilon(args.epsilon, args.delta, q, 1.0, 20.0, "random", mean, 1.0)
        et, tt = per_trial_epsilon(args.epsilon, args.delta, q, 1.0, 20.0, "tpe", mean, 1.0)
        rows.append({"expected_trials": mean, "random_eps_per_trial": er, "random_T": tr,
                     "tpe_eps_per_trial": et, "tpe_T": tt})
        print(f"{mean:>5} {er:>15.3f} {tr:>7d} {et:>12.3f} {tt:>7d} {tr / tt:>8.2f}")
    single = per_trial_epsilon(args.epsilon, args.delta, q, 1.0, 20.0, "tpe", 1, 1.0)
    print(f"no search (one run, same score): ε/trial={single[0]:.3f}, T={single[1]}")
    result: dict = {"per_trial": rows, "single_run": {"eps": single[0], "T": single[1]}}
    if args.train:
        result["training"] = compare_trained(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning_gain.json").write_text(json.dumps(result, indent=1, default=str))


def compare_trained(args: argparse.Namespace) -> dict:
    from dpaf_ray.config import TrainConfig
    from dpaf_ray.evaluation.run import evaluate_run
    from dpaf_ray.run import run_train
    from dpaf_ray.tuning.search_space import load_search_space
    from dpaf_ray.tuning.tuner import run_search

    out = Path(args.out)
    ss = load_search_space(args.search_space)
    overrides = {k: v for k, v in {"expected_trials": args.expected_trials, "num_workers": args.num_workers,
                                   "time_budget_minutes": args.time_budget_minutes}.items() if v is not None}
    ss = dataclasses.replace(ss, epsilon=args.epsilon, delta=args.delta, max_iterations=args.max_iterations,
                             min_iterations=min(ss.min_iterations, args.max_iterations), **overrides)
    release = run_search(ss, out / "tuned")
    default_cfg = TrainConfig(dataset=ss.dataset, epsilon=args.epsilon, delta=args.delta,
                              max_iterations=args.max_iterations, **{k: v for k, v in ss.fixed.items()})
    # the same compute as one trial: its time budget, and as many threads as a trial's workers have CPUs
    default_cfg = dataclasses.replace(default_cfg, time_budget_minutes=ss.time_budget_minutes,
                                      num_threads=max(1, int(ss.num_workers * ss.cpus_per_worker)))
    run_train(default_cfg, out / "default", num_synthetic=ss.num_synthetic)
    tuned = evaluate_run(release, ss.dataset, num_synthetic=args.eval_synthetic, epochs=2)
    # a benchmark, not part of the release: keep release/ to its five files
    (release / "evaluation.json").replace(out / "tuned" / "trials" / "release_evaluation.json")
    default = evaluate_run(out / "default", ss.dataset, num_synthetic=args.eval_synthetic, epochs=2)
    eps_t = json.loads((release / "privacy_report.json").read_text())["epsilon"]
    eps_d = json.loads((out / "default" / "privacy_report.json").read_text())["epsilon"]
    print(f"tuned   (ε={eps_t:.3f}): downstream accuracy {tuned['downstream_accuracy']:.3f}")
    print(f"default (ε={eps_d:.3f}): downstream accuracy {default['downstream_accuracy']:.3f}")
    print(f"ratio tuned/default accuracy: {tuned['downstream_accuracy'] / default['downstream_accuracy']:.3f}")
    return {"tuned": tuned, "default": default, "eps_tuned": eps_t, "eps_default": eps_d}


if __name__ == "__main__":
    main()
