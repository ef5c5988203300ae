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
    python bench/tuning_gain.py --train --epsilons 1 10 --searches 3 [--quick] [--oracle]
    python bench/tuning_gain.py --tables-from bench/results/tuning_gain_train/result_both.json
    # side by side on 2 CPUs: --part search and --part default in two processes, then --part both
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.config import TrainConfig  # noqa: E402
from dpaf_ray.privacy.ledger import Gaussian, PrivacyConfigError, PrivacyLedger  # noqa: E402
from dpaf_ray.privacy.tuning import calibrate_reference, distribution_shape, fit_trial, num_trials_pmf  # noqa: E402
from dpaf_ray.training.plan import schedule_for  # noqa: E402
from dpaf_ray.tuning.results import SearchResults  # noqa: E402
from dpaf_ray.tuning.search_space import load_search_space  # noqa: E402
from dpaf_ray.tuning.reference import (epoch_matched_iterations, final_config, reference_config,  # noqa: E402
                                       search_train_records)
from logged_run import run_logged  # noqa: E402

SHAPE_KNOBS = ("batch_size", "sgd_every", "noise_split", "classifier_steps")


def search_scope(ss, n_records: int) -> tuple[float, float, float]:
    """(ε, δ, n_train) the search is calibrated to: the whole budget on all records, or on a subsample
    its own (ε_s, δ_s) on the expected γN records (as `tune.py` plans it)."""
    eps, delta = ss.search_target()
    return eps, delta, search_train_records(ss, n_records)


def fit_table(ss, n_records: int, T: int) -> dict:
    """The reference and every trial shape's ε after fitting, relative to the reference's."""
    cfg = reference_config(ss)
    eps, delta, n_train = search_scope(ss, n_records)
    shape = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    ref_sched = schedule_for(cfg, n_train)
    ref = calibrate_reference(eps, delta, ref_sched, ref_sched.prefix_iterations + T, ss.score_noise,
                              ss.search, ss.expected_trials, shape)
    e_ref = ref.epsilon(delta)
    choices = {p.name: p.extremes() if p.kind != "choice" else p.values for p in ss.params if p.name in SHAPE_KNOBS}
    rows = []
    for values in itertools.product(*choices.values()):
        knobs = dict(zip(choices, values))
        c = TrainConfig.from_dict({**ss.fixed, **knobs})
        t = epoch_matched_iterations(T, cfg.batch_size, c.batch_size)  # as many epochs as the planned trial
        sched = schedule_for(c, n_train)
        t_all = sched.prefix_iterations + t  # T GAN iterations after any classifier phase
        fit = fit_trial(sched, t_all, ss.score_noise, ref)
        e = PrivacyLedger(sched.scaled(fit.noise_factor).entries(t_all) + [Gaussian(ss.score_noise)],
                          ref.orders).epsilon(delta)
        rows.append({**knobs, "iterations": t, "sigma_eff": sched.cycle[0] * fit.noise_factor,
                     "epsilon_trial": e, "fraction_of_reference": e / e_ref})
    return {"reference": {"batch_size": cfg.batch_size, "iterations": T, "cycle": list(ref.schedule.cycle),
                          "epsilon_alone": e_ref}, "trials": rows}


def per_trial(ss, n_records: int, T: int) -> list[dict]:
    cfg = reference_config(ss)
    eps, delta, n_train = search_scope(ss, n_records)
    sched = schedule_for(cfg, n_train)
    rows = []
    for mean in (2, 3, 5, 10):
        row = {"expected_trials": mean}
        for search in ("random", "tpe"):
            try:
                ref = calibrate_reference(eps, delta, sched, sched.prefix_iterations + T, ss.score_noise,
                                          search, mean, 1.0)
                row[f"{search}_epsilon_per_trial"] = ref.epsilon(delta)
            except PrivacyConfigError:  # too many trials for this budget: no trial can run
                row[f"{search}_epsilon_per_trial"] = None
        rows.append(row)
    single = calibrate_reference(eps, delta, sched, sched.prefix_iterations + T, ss.score_noise, "tpe", 1, 1.0)
    rows.append({"expected_trials": 1, "single_run_epsilon": single.epsilon(delta)})
    return rows


def distribution_table(ss, n_records: int, T: int) -> list[dict]:
    """The law of K at equal E[K] (issue #14): what each trial may spend, against the chance that the
    search cannot select at all (K ≤ 1) and the long runs (K ≥ 5). Privacy only; no training."""
    cfg = reference_config(ss)
    eps, delta, n_train = search_scope(ss, n_records)
    sched = schedule_for(cfg, n_train)
    laws = {"logarithmic": 0.0, "tnb η=0.5": 0.5, "geometric": 1.0, "tnb η=2": 2.0, "poisson": math.inf}
    rows = []
    for mean in (2, 3, 5):
        for name, shape in laws.items():
            try:
                e = calibrate_reference(eps, delta, sched, sched.prefix_iterations + T, ss.score_noise,
                                        "random", mean, shape).epsilon(delta)
            except PrivacyConfigError:  # too many trials for this budget
                e = math.nan
            probs = dict(itertools.takewhile(lambda kp: kp[0] < 200, num_trials_pmf(mean, shape)))
            rows.append({"expected_trials": mean, "law": name, "epsilon_per_trial": e,
                         "p_no_release": probs.get(0, 0.0), "p_no_choice": probs.get(0, 0.0) + probs.get(1, 0.0),
                         "p_k_ge_5": 1 - sum(p for k, p in probs.items() if k < 5)})
    return rows


def share_table(ss, n_records: int, T: int, image_size: int, shares=(0.1, 0.3, 0.5, 0.7, 0.9)) -> list[dict]:
    """On a subsample: what each epsilon_share buys. The search's noise (its trials on γN records at
    (ε_s, δ_s)) against the final run's (all N records at ε_f = ε − s·ε, δ/2, a single run's T):
    the trade the operator picks before any data is touched. Planned values; privacy only."""
    from dpaf_ray.privacy.subsample import SubsampleBudget
    from dpaf_ray.training.plan import plan_training

    cfg = reference_config(ss)
    n_train = search_train_records(ss, n_records)
    sched = schedule_for(cfg, n_train)
    shape = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    rows = []
    for share in shares:
        budget = SubsampleBudget(ss.epsilon, ss.delta, ss.subsample_fraction, share)
        ref = calibrate_reference(budget.search_epsilon, budget.search_delta, sched, sched.prefix_iterations + T,
                                  ss.score_noise, ss.search, ss.expected_trials, shape)
        eps_f = ss.epsilon - share * ss.epsilon  # the planned rest (the ledger's spend is at most the target)
        final = plan_training(final_config(ss, {**cfg.to_dict(), "iterations": T}, eps_f, budget.final_delta),
                              n_records, image_size)
        rows.append({"epsilon_share": share, "search_epsilon": budget.search_epsilon,
                     "trial_sigma_cycle": list(ref.schedule.cycle), "trial_epsilon_alone": ref.epsilon(budget.search_delta),
                     "final_epsilon": eps_f, "final_iterations": final.iterations,
                     "final_sigma_agg": final.config.sigma_agg, "final_sigma_sgd": final.config.sigma_sgd})
    return rows


def evaluate_dir(out: Path, dataset: str, quick: bool) -> dict:
    """`python -m dpaf_ray evaluate` (defaults unless quick) once per run directory."""
    if not list((out / "evaluation").glob("*.json")):
        ev = ["--num-synthetic", "20000", "--max-train-records", "20000"] if quick else []
        run_logged([sys.executable, "-m", "dpaf_ray", "evaluate", str(out), "--test-data", dataset, *ev],
                   out.parent / f"{out.name}.eval.log")
    return json.loads(sorted((out / "evaluation").glob("*.json"))[-1].read_text())


def run_search(args, ss, eps: float, seed: int, work: Path) -> dict:
    """One private search (`tune.py`) at total ε, its release evaluated; every trial evaluated too
    (`--oracle`): the operator's own view, which tells the search's cost from the space's lack of
    better configurations."""
    out = work / f"search_eps{eps:g}_s{seed}"
    if not (out / "release" / "generator.pt").exists():
        seconds = run_logged([sys.executable, "tune.py", "--search-space", args.search_space, "--epsilon", str(eps),
                              "--out", str(out)], work / f"{out.name}.log")
        (out / "bench_seconds.txt").write_text(f"{seconds:.0f}\n")
    metrics = evaluate_dir(out, ss.dataset, args.quick)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    released = json.loads((out / "release" / "score.json").read_text())
    results = SearchResults(out)
    chosen = results.get_best_result()
    trials = []
    for t in results.finished:
        row = {"trial": t.name, "score": t.score, "epsilon_trial": t.epsilon, "iterations": t.iterations,
               **{k: t.knobs[k] for k in ("group_size", "noise_split", "lr_g", "batch_size", "sgd_every")},
               "sampled": dict(t.sampled),
               "released": t is chosen}
        if args.oracle and (t.path / "generator.pt").exists():  # quick evaluation: 20k synthetic, 20k records
            od = work / "oracle" / f"{out.name}_{t.name}"
            (od / "release").mkdir(parents=True, exist_ok=True)
            if not (od / "release" / "generator.pt").exists():
                shutil.copy(t.path / "generator.pt", od / "release" / "generator.pt")
            row["accuracy_quick"] = evaluate_dir(od, ss.dataset, quick=True)["downstream_accuracy"]
        trials.append(row)
    secs = out / "bench_seconds.txt"
    return {"epsilon": eps, "seed": seed, "epsilon_ledger": report["epsilon"], "K": len(trials),
            "search_seconds": float(secs.read_text()) if secs.exists() else None,
            "released_score": released.get("score"), "accuracy": metrics["downstream_accuracy"],
            "diversity_ratio": metrics.get("diversity_ratio"), "trials": trials}


def run_default(args, ss, eps: float, seed: int, work: Path) -> dict:
    """The default configuration trained once with the whole ε, as a user runs it (the planner's T)."""
    out = work / f"default_eps{eps:g}_s{seed}"
    if not (out / "release" / "generator.pt").exists():
        run_logged([sys.executable, "-m", "dpaf_ray", "train", "--dataset", ss.dataset, "--epsilon", str(eps),
                    "--delta", str(ss.delta), "--seed", str(seed), "--num-threads", "1", "--out", str(out)],
                   work / f"{out.name}.log")
    metrics = evaluate_dir(out, ss.dataset, args.quick)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    return {"epsilon": eps, "seed": seed, "epsilon_ledger": report["epsilon"],
            "iterations": report["iterations_executed"], "accuracy": metrics["downstream_accuracy"],
            "diversity_ratio": metrics.get("diversity_ratio")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search-space", default="search_spaces/fashion-mnist-cpu.yaml")
    ap.add_argument("--n-records", type=int, default=60_000, help="N of the search space's data set (public)")
    ap.add_argument("--image-size", type=int, default=28,
                    help="the data set's image side (public): the final run's T in the share table")
    ap.add_argument("--epsilon", type=float, default=None, help="override the search space's total ε (fit table)")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--searches", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds instead of 0..searches-1")
    ap.add_argument("--quick", action="store_true", help="evaluate with 20k synthetic images (screening)")
    ap.add_argument("--part", choices=["search", "default", "both"], default="both",
                    help="run only the searches or only the default runs (two processes side by side, one "
                         "thread each); `both` collects what exists, runs the rest and writes the table and plot")
    ap.add_argument("--oracle", action="store_true",
                    help="also evaluate every trial's generator, quickly (20k synthetic images, 20k records; "
                         "operator-only)")
    ap.add_argument("--work", default="/tmp/tuning_gain")
    ap.add_argument("--results", default="tuning_gain_train",
                    help="folder under bench/results/ for --train's JSON, tables and plot (one per search space)")
    ap.add_argument("--tables-from", default=None, metavar="RESULT_JSON",
                    help="only rewrite the tables and plot from a finished --train run's result JSON")
    args = ap.parse_args()
    if args.tables_from:
        write_tables(json.loads(Path(args.tables_from).read_text())["training"], Path(args.tables_from).parent)
        return
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
    laws = distribution_table(ss, args.n_records, T)
    print(f"{'E[K]':>5} {'law':>12} {'ε per trial':>12} {'P[K=0]':>8} {'P[K≤1]':>8} {'P[K≥5]':>8}")
    for r in laws:
        print(f"{r['expected_trials']:>5} {r['law']:>12} {r['epsilon_per_trial']:>12.3f} {r['p_no_release']:>8.3f} "
              f"{r['p_no_choice']:>8.3f} {r['p_k_ge_5']:>8.3f}")
    result = {"search_space": args.search_space, "fit": table, "per_trial": rows, "k_distributions": laws}
    if ss.subsample_fraction is not None:
        shares = share_table(ss, args.n_records, T, args.image_size)
        print(f"on a subsample (γ = {ss.subsample_fraction:g}): each epsilon_share's search against its final run")
        print(f"{'share':>6} {'ε_s':>7} {'trial σ cycle':>16} {'trial ε':>8} {'ε_f':>6} {'final T':>8} "
              f"{'final σ_agg, σ_sgd':>20}")
        for r in shares:
            cyc = ", ".join(f"{c:.2f}" for c in r["trial_sigma_cycle"])
            print(f"{r['epsilon_share']:>6g} {r['search_epsilon']:>7.3f} {cyc:>16} {r['trial_epsilon_alone']:>8.3f} "
                  f"{r['final_epsilon']:>6.2f} {r['final_iterations']:>8} "
                  f"{r['final_sigma_agg']:>9.3f}, {r['final_sigma_sgd']:.3f}")
        result["subsample_shares"] = shares
    if args.train:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        jobs = [(e, s) for e in args.epsilons for s in (args.seeds or range(args.searches))]
        training = {}
        if args.part in ("default", "both"):
            training["default"] = [run_default(args, ss, e, s, work) for e, s in jobs]
        if args.part in ("search", "both"):
            training["search"] = [run_search(args, ss, e, s, work) for e, s in jobs]
        result["training"] = training
        if args.part == "both":
            write_tables(training, ROOT / "bench" / "results" / args.results)
    name = (f"tuning_gain_{Path(args.search_space).stem}_eps{ss.epsilon:g}.json" if not args.train
            else f"{args.results}/result_{args.part}.json")  # one file per space: tables never overwrite each other
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


def write_tables(training: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_training_table(training, folder / "table.md")
    if any("accuracy_quick" in t for r in training["search"] for t in r["trials"]):
        write_config_table(training, folder / "configs.md")
    plot(training, ROOT / "bench" / "results" / "tuning_gain.png" if folder.name == "tuning_gain_train"
         else folder / "tuning_gain.png")


def write_config_table(training: dict, path: Path) -> None:
    """Every configuration the searches drew, with each of its trials' own accuracy (--oracle).

    This is tuning with no privacy charged for the choice: an oracle that saw every trial's test
    accuracy would release the best of them. Each trial still ran at the trial's ε (below the total).
    """
    by_config: dict[tuple, list[tuple[float, float]]] = {}
    for r in training["search"]:
        for t in r["trials"]:
            if "accuracy_quick" in t:
                key = (r["epsilon"], config_label(t))
                by_config.setdefault(key, []).append((t["epsilon_trial"], t["accuracy_quick"]))
    lines = ["| total ε | configuration | trials | trial ε | accuracy of each trial, quick evaluation (%) | mean |",
             "|---|---|---|---|---|---|"]
    for (eps, label), runs in sorted(by_config.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        accs = [100 * a for _, a in runs]
        lines.append(f"| {eps:g} | {label} | {len(runs)} | {runs[0][0]:.3f} | "
                     f"{' / '.join(f'{a:.1f}' for a in accs)} | {sum(accs) / len(accs):.1f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def config_label(trial: dict) -> str:
    """The searched knobs of a trial (older results: b, split, lr_g)."""
    if "sampled" in trial:
        return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in sorted(trial["sampled"].items()))
    return f"b {trial['group_size']}, noise_split {trial['noise_split']:g}, lr_g {trial['lr_g']:g}"


def write_training_table(training: dict, path: Path) -> None:
    lines = ["| ε | seed | default (acc, div) | search (acc, div) | K | search ε trial | released config "
             "| every trial, quick evaluation (%) |", "|---|---|---|---|---|---|---|---|"]
    defaults = {(r["epsilon"], r["seed"]): r for r in training["default"]}
    for r in training["search"]:
        d = defaults[(r["epsilon"], r["seed"])]
        best = next(t for t in r["trials"] if t["released"])
        quick = [t["accuracy_quick"] for t in r["trials"] if "accuracy_quick" in t]
        chosen_quick = [t["accuracy_quick"] for t in r["trials"] if t.get("released") and "accuracy_quick" in t]
        lines.append(f"| {r['epsilon']:g} | {r['seed']} | {100 * d['accuracy']:.1f} %, {d['diversity_ratio']:.2f} | "
                     f"{100 * r['accuracy']:.1f} %, {r['diversity_ratio']:.2f} | {r['K']} | "
                     f"{best['epsilon_trial']:.3f} | {config_label(best)} | "
                     + (f"{' / '.join(f'{100 * a:.1f}' for a in quick)} (released {100 * chosen_quick[0]:.1f}) |"
                        if quick and chosen_quick else "|"))
    for eps in sorted({r["epsilon"] for r in training["search"]}):
        s = [r["accuracy"] for r in training["search"] if r["epsilon"] == eps]
        d = [r["accuracy"] for r in training["default"] if r["epsilon"] == eps]
        lines.append(f"| {eps:g} | mean | {100 * sum(d) / len(d):.1f} % | {100 * sum(s) / len(s):.1f} % | | | | |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(training: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, marker, dx in (("default", "o", 0.95), ("search", "s", 1.05)):
        rows = training[name]
        ax.plot([r["epsilon"] * dx for r in rows], [100 * r["accuracy"] for r in rows], marker,
                label=f"{name} (one release per seed)", alpha=0.7)
    trials = [(r["epsilon"], t) for r in training["search"] for t in r["trials"] if "accuracy_quick" in t]
    if trials:
        ax.plot([e * 1.1 for e, _ in trials], [100 * t["accuracy_quick"] for _, t in trials], "x", color="grey",
                label="every trial (quick evaluation, not released)")
    ax.set_xscale("log")
    ax.set_xlabel("total ε (δ = 1e-5), tuning included")
    ax.set_ylabel("downstream accuracy (%)")
    ax.set_title("Fashion-MNIST: private search vs one default run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
