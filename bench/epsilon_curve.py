"""Downstream accuracy and fid_domain against ε at the default plan, beside DPImageBench's rows.

    python bench/epsilon_curve.py [--dataset fashion-mnist] [--epsilons 0.2 0.5 1 2 5 10] [--seeds 0 1]
        [--threads 1] [--work /tmp/epsilon_curve] [--quick]

Each (ε, seed) is one `python -m dpaf_ray train --dataset D --epsilon E --delta 1e-5 --seed S`
(the planner's default T and noise), then `python -m dpaf_ray evaluate RUN --test-data D` with
the evaluate defaults (60k synthetic images, 3 epochs; `--quick`: 20k and a 20k cap, for
screening only). Runs that already have an evaluation are reused, so the script can be resumed.
Writes bench/results/epsilon_curve.{json,png,md} (other data sets: epsilon_curve_<dataset>.*).
`--existing-only` draws what is already evaluated under --work (a run dir may be a link to a run
made another way with the same plan, e.g. by bench/utility_run.sh) and trains nothing.

DPImageBench (Chen et al. 2025) rows are Fashion-MNIST accuracies at ε = 1 / 10 reported by that
benchmark with its own classifiers, which differ from ours: they show the shape of the curves,
not a like-for-like comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from logged_run import run_logged  # noqa: E402  (bench/ is on sys.path when a script runs)
DPIMAGEBENCH_FMNIST = {  # accuracy (%) at ε = 1 and ε = 10
    "DP-GAN": (71.8, 70.3), "DP-Kernel": (68.4, 70.0), "DPDM": (76.4, 85.6), "DP-FETA": (81.7, 87.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.2, 0.5, 1, 2, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/epsilon_curve")
    ap.add_argument("--quick", action="store_true", help="20k synthetic images for screening (not the defaults)")
    ap.add_argument("--train-args", default="", help="extra `train` options, e.g. '--iterations 600'")
    ap.add_argument("--existing-only", action="store_true",
                    help="table and plot from the runs under --work that already have an evaluation; train nothing")
    ap.add_argument("--previous", default=None,
                    help="an earlier curve's JSON: drawn dashed beside this one, labelled --previous-label")
    ap.add_argument("--previous-label", default="previous default")
    ap.add_argument("--keep-below", type=float, default=None,
                    help="take --previous's rows with ε below this (where the default has not changed since)")
    args = ap.parse_args()
    previous = json.loads(Path(args.previous).read_text())["rows"] if args.previous else []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in args.epsilons:
        for seed in args.seeds:
            out = work / f"{args.dataset}_eps{eps:g}_seed{seed}"
            done = sorted((out / "evaluation").glob("evaluation-*.json")) if out.exists() else []
            if not done and args.existing_only:
                continue
            if not done:
                train_s = None
                if not (out / "release" / "generator.pt").exists():
                    train_s = run_logged([sys.executable, "-m", "dpaf_ray", "train", "--dataset", args.dataset,
                                   "--epsilon", str(eps), "--delta", str(args.delta), "--seed", str(seed),
                                   "--num-threads", str(args.threads), "--out", str(out), *args.train_args.split()],
                                  work / f"{out.name}.train.log")
                ev = [sys.executable, "-m", "dpaf_ray", "evaluate", str(out), "--test-data", args.dataset]
                if args.quick:
                    ev += ["--num-synthetic", "20000", "--max-train-records", "20000"]
                run_logged(ev, work / f"{out.name}.eval.log")
                done = sorted((out / "evaluation").glob("evaluation-*.json"))
                if train_s is not None:
                    (out / "bench_train_seconds.txt").write_text(f"{train_s:.0f}\n")
            metrics = json.loads(done[-1].read_text())
            report = json.loads((out / "release" / "privacy_report.json").read_text())
            seconds = json.loads((out / "metrics.json").read_text())["train_seconds"]
            split = json.loads((out / "config.json").read_text()).get("noise_split")
            rows.append({"epsilon": eps, "seed": seed, "epsilon_ledger": report["epsilon"], "delta": args.delta,
                         "iterations": report["iterations_executed"], "train_seconds": seconds, "noise_split": split,
                         "downstream_accuracy": metrics["downstream_accuracy"], "fid_domain": metrics["fid_domain"],
                         "diversity_ratio": metrics["diversity_ratio"], "num_synthetic": metrics["num_synthetic"],
                         "real_data_accuracy": metrics.get("real_data_accuracy")})
            print(json.dumps(rows[-1]))
    if args.keep_below is not None:
        kept = [dict(r, kept_from=args.previous) for r in previous if r["epsilon"] < args.keep_below]
        rows = kept + [r for r in rows if r["epsilon"] >= args.keep_below]
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = "epsilon_curve" if args.dataset == "fashion-mnist" else f"epsilon_curve_{args.dataset}"
    (results / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    write_table(rows, results / f"{stem}.md", args)
    plot(rows, results / f"{stem}.png", args.dataset, previous, args.previous_label)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _splits(rows: list[dict]) -> str:
    """The noise split(s) σ_agg/σ_sgd the runs were trained at, e.g. "1"."""
    return ", ".join(f"{x:g}" for x in sorted({r["noise_split"] for r in rows if r.get("noise_split") is not None}))


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    splits = _splits(rows)
    lines = [f"Dataset {args.dataset}, δ = {args.delta:g}, default plan (noise split σ_agg/σ_sgd = {splits}); evaluate "
             f"{'quick (20k)' if args.quick else 'defaults (60k synthetic, 3 epochs)'}.", "",
             "| ε | seeds | accuracy per seed | mean accuracy | mean fid_domain | diversity | T | train min |",
             "|---|---|---|---|---|---|---|---|"]
    for eps in sorted({r["epsilon"] for r in rows}):
        rs = [r for r in rows if r["epsilon"] == eps]
        per_seed = ", ".join(f"{100 * r['downstream_accuracy']:.1f}" for r in rs)
        lines.append(f"| {eps:g} | {', '.join(str(r['seed']) for r in rs)} | {per_seed} | "
                     f"{100 * _mean([r['downstream_accuracy'] for r in rs]):.1f} % | "
                     f"{_mean([r['fid_domain'] for r in rs]):.0f} | {_mean([r['diversity_ratio'] for r in rs]):.2f} | "
                     f"{rs[0]['iterations']} | {_mean([r['train_seconds'] for r in rs]) / 60:.1f} |")
    kept = sorted({r["kept_from"] for r in rows if r.get("kept_from")})
    if kept:
        lines += ["", f"Rows at ε < {args.keep_below:g} come from {', '.join(kept)} (the default is unchanged there)."]
    real = [r["real_data_accuracy"] for r in rows if r.get("real_data_accuracy") is not None]
    if real:
        lines += ["", f"The same classifier trained on the real training records: {100 * _mean(real):.1f} % "
                  "(the ceiling of this evaluation)."]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, dataset: str, previous: list[dict] | None = None,
         previous_label: str = "previous default") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({r["epsilon"] for r in rows})
    acc = [100 * _mean([r["downstream_accuracy"] for r in rows if r["epsilon"] == e]) for e in eps]
    fid = [_mean([r["fid_domain"] for r in rows if r["epsilon"] == e]) for e in eps]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(eps, acc, "o-", color="k", label="dpaf-ray (mean over seeds)")
    for r in rows:
        a1.plot(r["epsilon"], 100 * r["downstream_accuracy"], ".", color="gray")
    if previous:
        p_eps = sorted({r["epsilon"] for r in previous})
        a1.plot(p_eps, [100 * _mean([r["downstream_accuracy"] for r in previous if r["epsilon"] == e]) for e in p_eps],
                "o:", color="gray", label=previous_label)
    if dataset == "fashion-mnist":
        for name, (e1, e10) in DPIMAGEBENCH_FMNIST.items():
            a1.plot([1, 10], [e1, e10], "s--", alpha=0.6, label=f"{name} (DPImageBench, other classifier)")
    real = [r["real_data_accuracy"] for r in rows if r.get("real_data_accuracy") is not None]
    if real:
        a1.axhline(100 * _mean(real), color="k", ls=":", label="same classifier on real data")
        a1.set_ylim(top=max(a1.get_ylim()[1], 100 * _mean(real) + 2))
    a1.set_xscale("log")
    a1.set_xlabel("ε (δ = 1e-5)")
    a1.set_ylabel("downstream accuracy (%)")
    a1.legend(fontsize=7, loc="lower right")
    a1.grid(alpha=0.3)
    a2.plot(eps, fid, "o-", color="k")
    a2.set_xscale("log")
    a2.set_xlabel("ε")
    a2.set_ylabel("fid_domain (lower is better)")
    a2.grid(alpha=0.3)
    splits = _splits(rows)
    fig.suptitle(f"{dataset}: accuracy and fid_domain against ε (default plan, noise split {splits})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
