"""Downstream accuracy of configurations across seeds, as a picture and a table.

    python bench/seed_comparison.py --out seeds.png "k = 1=RUN_DIR,RUN_DIR,..." "k = 2=RUN_DIR,..."

Each RUN_DIR holds an `evaluation.json` (from `python -m dpaf_ray evaluate`) directly or under
`run/`. One column of dots per configuration, one dot per run, the mean as a bar; seeds are
matched by position, so list the runs of every configuration in the same seed order.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def accuracy(run_dir: str) -> float:
    for p in (Path(run_dir) / "evaluation.json", Path(run_dir) / "run" / "evaluation.json"):
        if p.exists():
            return float(json.loads(p.read_text())["downstream_accuracy"])
    raise FileNotFoundError(f"no evaluation.json in {run_dir} or {run_dir}/run: run `python -m dpaf_ray evaluate` first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help='"LABEL=DIR,DIR,..."')
    ap.add_argument("--out", default="seeds.png")
    ap.add_argument("--title", default="downstream accuracy per seed")
    args = ap.parse_args()
    groups: list[tuple[str, list[float]]] = []
    for g in args.groups:
        label, sep, dirs = g.rpartition("=")
        if not sep or not label:
            ap.error(f"{g!r}: expected LABEL=DIR,DIR,...")
        groups.append((label, [accuracy(d) for d in dirs.split(",") if d]))

    print("| configuration | per seed | mean |")
    print("|---|---|---|")
    for label, accs in groups:
        print(f"| {label} | {', '.join(f'{100 * a:.1f}' for a in accs)} | {100 * statistics.mean(accs):.1f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    for i, (label, accs) in enumerate(groups):
        ax.bar(i, 100 * statistics.mean(accs), width=0.6, color="#cfd8e3")
        ax.scatter([i] * len(accs), [100 * a for a in accs], color="#1f4e79", zorder=3, s=18)
        for s, a in enumerate(accs):
            ax.annotate(str(s), (i + 0.08, 100 * a), fontsize=7, va="center")
    ax.axhline(70, color="#b03030", lw=1, ls="--", label="70 % target")
    lo = min(100 * min(a) for _, a in groups)
    ax.set_ylim(max(0, lo - 5), max(100 * max(a) for _, a in groups) + 2)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_ylabel("accuracy on the real test split (%)")
    ax.set_title(args.title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
