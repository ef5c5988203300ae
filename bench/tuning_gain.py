"""What private tuning costs and what it buys, at the same total ε (tuning included).

1. Fit table (cheap, always printed): for a search space, the reference (the planned trial with
   its noise calibrated so that the whole search meets ε_total) and, for every combination of the
   knobs that shape a trial's privacy curve (batch size, k, noise split), the trial's standalone
   ε after its noise is fitted under the reference, as a fraction of the reference's own ε
   (issue #14's target: ≥ 0.9). Also the per-trial ε under random search (repeat-and-select)
   against TPE (K-fold composition) for several E[K].
2. With --train: `--searches` independent private searches against the default configuration
   trained once with the whole budget and the same seeds, at each ε of `--epsilons`; downstream
   accuracy with `python -m dpaf_ray evaluate` (defaults); a plot and a table.

    python bench/tuning_gain.py [--search-space search_spaces/fashion-mnist-cpu.yaml]
    python bench/tuning_gain.py --train --epsilons 1 10 --searches 3 [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.config import TrainConfig  # noqa: E402
from dpaf_ray.privacy.ledger import Gaussian, PrivacyLedger  # noqa: E402
from dpaf_ray.privacy.tuning import calibrate_reference, distribution_shape, fit_trial  # noqa: E402
from dpaf_ray.training.plan import schedule_for  # noqa: E402
from dpaf_ray.tuning.search_space import load_search_space  # noqa: E402
from dpaf_ray.tuning.tuner import reference_config  # noqa: E402

SHAPE_KNOBS = ("batch_size", "sgd_every", "noise_split")


def fit_table(ss, n_records: int, T: int) -> dict:
    """The reference and every trial shape's ε after fitting, relative to the reference's."""
    cfg = reference_config(ss)
    n_train = (1 - cfg.validation_fraction) * n_records
    shape = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    ref = calibrate_reference(ss.epsilon, ss.delta, schedule_for(cfg, n_train), T, ss.score_noise, ss.search,
                              ss.expected_trials, shape)
    e_ref = ref.epsilon(ss.delta)
    choices = {p.name: p.extremes() if p.kind != "choice" else p.values for p in ss.params if p.name in SHAPE_KNOBS}
    rows = []
    for values in itertools.product(*choices.values()):
        knobs = dict(zip(choices, values))
        c = TrainConfig.from_dict({**ss.fixed, **knobs})
        t = max(1, round(T * cfg.batch_size / c.batch_size))  # as many epochs as the planned trial
        sched = schedule_for(c, n_train)
        fit = fit_trial(sched, t, ss.score_noise, ref)
        e = PrivacyLedger(sched.scaled(fit.noise_factor).entries(t) + [Gaussian(ss.score_noise)],
                          ref.orders).epsilon(ss.delta)
        rows.append({**knobs, "iterations": t, "sigma_eff": sched.cycle[0] * fit.noise_factor,
                     "epsilon_trial": e, "fraction_of_reference": e / e_ref})
    return {"reference": {"batch_size": cfg.batch_size, "iterations": T, "cycle": list(ref.schedule.cycle),
                          "epsilon_alone": e_ref}, "trials": rows}


def per_trial(ss, n_records: int, T: int) -> list[dict]:
    cfg = reference_config(ss)
    sched = schedule_for(cfg, (1 - cfg.validation_fraction) * n_records)
    rows = []
    for mean in (2, 3, 5, 10):
        row = {"expected_trials": mean}
        for search in ("random", "tpe"):
            ref = calibrate_reference(ss.epsilon, ss.delta, sched, T, ss.score_noise, search, mean, 1.0)
            row[f"{search}_epsilon_per_trial"] = ref.epsilon(ss.delta)
        rows.append(row)
    single = calibrate_reference(ss.epsilon, ss.delta, sched, T, ss.score_noise, "tpe", 1, 1.0)
    rows.append({"expected_trials": 1, "single_run_epsilon": single.epsilon(ss.delta)})
    return rows


def train_and_evaluate(args, ss_path: str, eps: float, seed: int, work: Path) -> dict:
    """One search and one default run at the same ε and seed; their evaluate accuracies."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out_s, out_d = work / f"search_eps{eps:g}_s{seed}", work / f"default_eps{eps:g}_s{seed}"
    ev = ["--num-synthetic", "20000", "--max-train-records", "20000"] if args.quick else []
    t0 = time.time()
    if not (out_s / "release").exists():
        subprocess.run([sys.executable, "tune.py", "--search-space", ss_path, "--epsilon", str(eps), "--out",
                        str(out_s)], cwd=ROOT, env=env, check=True)
    t_search = time.time() - t0
    ss = load_search_space(ss_path)
    if not (out_d / "release").exists():
        subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--dataset", ss.dataset, "--epsilon", str(eps),
                        "--delta", str(ss.delta), "--seed", str(seed), "--iterations", str(ss.trial_iterations or 900),
                        "--out", str(out_d), "--num-threads", str(ss.fixed.get("num_threads", 1))],
                       cwd=ROOT, env=env, check=True)
    acc = {}
    for name, out in (("search", out_s), ("default", out_d)):
        if not list((out / "evaluation").glob("*.json")):
            subprocess.run([sys.executable, "-m", "dpaf_ray", "evaluate", str(out), "--test-data", ss.dataset, *ev],
                           cwd=ROOT, env=env, check=True)
        acc[name] = json.loads(sorted((out / "evaluation").glob("*.json"))[-1].read_text())["downstream_accuracy"]
    return {"epsilon": eps, "seed": seed, "search_seconds": t_search, **acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search-space", default="search_spaces/fashion-mnist-cpu.yaml")
    ap.add_argument("--n-records", type=int, default=60_000, help="N of the search space's data set (public)")
    ap.add_argument("--epsilon", type=float, default=None, help="override the search space's total ε (fit table)")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--searches", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="evaluate with 20k synthetic images (screening)")
    ap.add_argument("--work", default="/tmp/tuning_gain")
    args = ap.parse_args()
    ss = load_search_space(args.search_space)
    if args.epsilon is not None:
        ss = dataclasses.replace(ss, epsilon=args.epsilon)
    T = ss.trial_iterations or 900
    table = fit_table(ss, args.n_records, T)
    print(f"{args.search_space}: total ε={ss.epsilon:g}, δ={ss.delta:g}, E[K]={ss.expected_trials:g}; reference "
          f"B={table['reference']['batch_size']}, T={T}, ε alone {table['reference']['epsilon_alone']:.3f}")
    head = [*[k for k in SHAPE_KNOBS if k in table["trials"][0]], "iterations", "sigma_eff", "epsilon_trial",
            "fraction_of_reference"]
    print("  ".join(f"{h:>14}" for h in head))
    for r in table["trials"]:
        print("  ".join(f"{r[h]:>14.4g}" if isinstance(r[h], float) else f"{r[h]:>14}" for h in head))
    fractions = [r["fraction_of_reference"] for r in table["trials"]]
    print(f"fraction of the reference's ε: min {min(fractions):.3f}, mean {sum(fractions) / len(fractions):.3f}")
    rows = per_trial(ss, args.n_records, T)
    for r in rows:
        print(json.dumps(r))
    result = {"search_space": args.search_space, "fit": table, "per_trial": rows}
    if args.train:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        result["training"] = [train_and_evaluate(args, args.search_space, e, s, work)
                              for e in args.epsilons for s in range(args.searches)]
        plot(result["training"], ROOT / "bench" / "results" / "tuning_gain.png")
    out = ROOT / "bench" / "results" / f"tuning_gain_eps{ss.epsilon:g}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, marker in (("default", "o"), ("search", "s")):
        ax.plot([r["epsilon"] for r in rows], [100 * r[name] for r in rows], marker, label=name, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("total ε")
    ax.set_ylabel("downstream accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
