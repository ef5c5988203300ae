"""How long a search space's trials train, and the wall-clock cap (trial.time_budget_minutes) that does not
bite: the planned T of each extreme of the space times the measured seconds per iteration (the planner's
own probe, on generated data: no privacy cost), times a load factor and a margin.

    python bench/trial_time.py [search_spaces/default.yaml] [--iterations 20] [--load 1] [--margin 1.25]

Prints one line per knob setting (P + T, s/it, minutes as measured and times --load) and the cap. The
probe measures this machine as it is now, so the load averages before and after are printed: measured
on an idle machine, pass --load 2 for a cap that survives twice the load; measured under that load, --load 1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.training.probe import seconds_per_iteration  # noqa: E402
from dpaf_ray.tuning.search_space import load_search_space  # noqa: E402
from dpaf_ray.tuning.reference import plan_trial, search_train_records, trial_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", nargs="?", default="search_spaces/default.yaml")
    ap.add_argument("--iterations", type=int, default=20, help="probe iterations per setting")
    ap.add_argument("--load", type=float, default=1.0,
                    help="slow-down beyond the load present while measuring that the cap must survive")
    ap.add_argument("--margin", type=float, default=1.25, help="extra factor on top (probe noise, checkpoints)")
    args = ap.parse_args()
    ss = load_search_space(args.space)
    ds = load_dataset(ss.dataset, "train", ss.data_root, num_classes=ss.num_classes)
    n_train = search_train_records(ss, len(ds))
    cases = [("fixed", {})] + [(f"{p.name}={v}", {p.name: v}) for p in ss.params for v in p.extremes()]
    print(f"{args.space}: cap now {ss.time_budget_minutes} min; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    worst = 0.0
    for name, knobs in cases:
        cfg = trial_config(ss, knobs, ss.epsilon, ss.delta, seed=0)
        plan = plan_trial(ss, knobs, ss.epsilon, ss.delta, n_train, ds.shape[1], seed=0, iterations=cfg.iterations)
        s = seconds_per_iteration(plan.config, ds.shape, ds.num_classes, n_train, iterations=args.iterations)
        minutes = plan.iterations * s / 60
        worst = max(worst, minutes)
        print(f"{name:24s} P+T={plan.iterations:5d} (P={plan.schedule.prefix_iterations})  {s:.3f} s/it  "
              f"{minutes:.1f} min as measured, {minutes * args.load:.1f} min at {args.load:g}x")
    cap = math.ceil(worst * args.load * args.margin)
    print(f"load average now {os.getloadavg()[0]:.2f}; longest trial {worst:.1f} min as measured; cap = ceil({worst:.1f} x {args.load:g} x {args.margin:g}) = {cap} min")


if __name__ == "__main__":
    main()
