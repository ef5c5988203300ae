"""Markdown table of the runs made by bench/utility_run.sh under one or more work directories.

    python bench/utility_table.py WORKDIR [WORKDIR ...] > table.md

Then a second table: the mean over seeds of each (options, noise split, ε, evaluation).

One row per run directory (the latest evaluation file of each): seed, ε, δ, the classifier
phase's steps P and the GAN iterations T, σs, ε from the ledger, wall times, downstream accuracy,
fid_domain, diversity ratio, the DP classifier's own test accuracy and how often it labels G's
images as asked, and the exact command.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(work: Path):
    for d in sorted(work.iterdir()):
        done, run = d / "done", d / "run"
        evals = sorted((run / "evaluation").glob("evaluation-*.json")) if (run / "evaluation").exists() else []
        if not (done.exists() and (run / "metrics.json").exists() and evals):
            continue
        words = done.read_text().split()
        info = dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("--"))
        opts = " ".join(w for w in words[1:] if "=" not in w or w.startswith("--"))
        cfg = json.loads((run / "config.json").read_text())
        for ev_path in evals:
            ev = json.loads(ev_path.read_text())
            yield d, words[0], info, opts, cfg, ev


def is_full_evaluation(ev: dict) -> bool:
    """The evaluate command's defaults (60k synthetic, no cap on the CNN's training set)."""
    settings = ev.get("settings", {})
    return settings.get("num_synthetic") == 60000 and settings.get("max_train_records") is None


def summary(works: list[str]) -> None:
    """Mean over seeds of each (options, noise split, ε, evaluation): the numbers a claim may quote.
    The split is read from each run's config: the default moved from 2 to 1, so the same options
    meant different runs before and after."""
    groups: dict[tuple, list[dict]] = {}
    for work in works:
        for _d, _name, info, opts, cfg, ev in rows(Path(work)):
            split = cfg.get("noise_split")
            key = (opts or "(defaults)", split, float(info.get("eps", "nan")), is_full_evaluation(ev))
            groups.setdefault(key, []).append(
                {"seed": info.get("seed"), "acc": ev["downstream_accuracy"], "div": ev["diversity_ratio"]})
    print("\n| options | noise split | ε | evaluation | seeds | accuracy per seed (%) | mean accuracy | mean diversity |")
    print("|---|---|---|---|---|---|---|---|")
    order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, -kv[0][2], not kv[0][3]))
    for (opts, split, eps, full), runs in order:
        accs = [100 * r["acc"] for r in runs]
        print(f"| `{opts}` | {'?' if split is None else f'{split:g}'} | {eps:g} | {'defaults (60k)' if full else 'quick'} | "
              f"{', '.join(str(r['seed']) for r in runs)} | {' / '.join(f'{a:.1f}' for a in accs)} | "
              f"{sum(accs) / len(accs):.1f} % | {sum(r['div'] for r in runs) / len(runs):.2f} |")


def main(works: list[str]) -> None:
    print("| run | seed | ε | δ | P + T | σ_agg | σ_sgd | σ_c | ε (ledger) | train s | eval | downstream acc "
          "| fid_domain | diversity | DP classifier test acc | classifier on G | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for work in works:
        for d, name, info, opts, cfg, ev in rows(Path(work)):
            rep = json.loads((d / "run" / "release" / "privacy_report.json").read_text())
            m = json.loads((d / "run" / "metrics.json").read_text())
            cls = {}
            if (d / "classifier.json").exists() and (d / "classifier.json").read_text().strip():
                cls = json.loads((d / "classifier.json").read_text())
            P = cfg.get("classifier_steps", 0)
            s_c = f"{cfg['classifier_noise'] * cfg['sigma_sgd']:.3g}" if P else "–"
            n_syn = ev.get("settings", {}).get("num_synthetic", "?")
            evname = "60k (defaults)" if is_full_evaluation(ev) \
                else f"{n_syn // 1000}k/cap {ev['settings'].get('max_train_records')}"
            ca = cls.get("classifier_test_accuracy")
            cg = cls.get("classifier_on_generated")
            ds = f"DATASET={info['dataset']} " if info.get("dataset", "fashion-mnist") != "fashion-mnist" else ""
            cmd = (f"{ds}EPS={info.get('eps')} SEED={info.get('seed')} EVAL={info.get('eval', 'quick')} "
                   f"bash bench/utility_run.sh WORK {name} {opts}".strip())
            print(f"| {name} | {info.get('seed')} | {cfg['epsilon']:g} | {cfg['delta']:g} | {P} + {cfg['iterations']} | "
                  f"{cfg['sigma_agg']:.3g} | {cfg['sigma_sgd']:.3g} | {s_c} | {rep['epsilon']:.3f} | "
                  f"{info.get('train_s', round(m['train_seconds']))} | {evname} | {ev['downstream_accuracy']:.3f} | "
                  f"{ev['fid_domain']:.1f} | {ev['diversity_ratio']:.2f} | "
                  f"{'–' if ca is None else f'{ca:.3f}'} | {'–' if cg is None else f'{cg:.3f}'} | `{cmd}` |")


if __name__ == "__main__":
    main(sys.argv[1:])
    summary(sys.argv[1:])
