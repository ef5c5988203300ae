"""Markdown table of the runs made by bench/fmnist_quick.sh under one work directory."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(work: str) -> None:
    print("| run | seed | options | iterations | σ_agg | σ_sgd | ε (ledger) | train s | downstream acc | fid_domain | diversity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted(Path(work).iterdir()):
        done, metrics = d / "done", d / "run" / "metrics.json"
        if not (done.exists() and metrics.exists()):
            continue
        name, train_s, _, *opts = done.read_text().split()
        seed = opts.pop(0).split("=")[1] if opts and opts[0].startswith("seed=") else "0"
        ev = json.loads((d / "run" / "evaluation.json").read_text())
        rep = json.loads((d / "run" / "privacy_report.json").read_text())
        knobs, m = rep["knobs"], json.loads(metrics.read_text())
        print(f"| {name} | {seed} | {' '.join(opts) or '(defaults)'} | {m['iterations_executed']} | {knobs['sigma_agg']:.3g} | "
              f"{knobs['sigma_sgd']:.3g} | {rep['epsilon']:.3f} | {train_s.split('=')[1]} | "
              f"{ev['downstream_accuracy']:.3f} | {ev['fid_domain']:.1f} | {ev['diversity_ratio']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
