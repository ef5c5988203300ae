"""Assembles this folder from the run directories of the searches (issue #14, session of 2026-11-30):
    python bench/results/tuning_gain_subsample/make_table.py bench/results/tuning_gain_subsample
WORKS: each search's work folder (`bench/tuning_gain.py --work`) with the search space's epsilon_share."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from dpaf_ray.tuning.results import SearchResults

WORKS = (("/tmp/tgs/w", 0.1), ("/tmp/tgs/w05", 0.5))
from dpaf_ray.tuning.results import SearchResults

def one(d: Path):
    ev = json.loads(sorted((d / "evaluation").glob("*.json"))[-1].read_text())
    rep = json.loads((d / "release" / "privacy_report.json").read_text())
    res = SearchResults(d); chosen = res.get_best_result()
    trials = [{"trial": t.name, "score": t.score, "epsilon_trial": t.epsilon, "iterations": t.iterations,
               **{k: t.knobs[k] for k in ("group_size", "noise_split", "lr_g", "batch_size", "sgd_every")},
               "sampled": dict(t.sampled), "released": t is chosen} for t in res.finished]
    secs = d / "bench_seconds.txt"
    eps = float(d.name.split("_eps")[1].split("_s")[0]); seed = int(d.name.rsplit("_s", 1)[1])
    return {"epsilon": eps, "seed": seed, "epsilon_ledger": rep["epsilon"], "K": len(trials),
            "search_seconds": float(secs.read_text()) if secs.exists() else None,
            "accuracy": ev["downstream_accuracy"], "diversity_ratio": ev.get("diversity_ratio"),
            "trials": trials}

# default single runs (the evaluate defaults), from bench/results/utility_13_seeds/table.md and /tmp/u17/w
DEFAULT = {(10.0, 0): (0.7156, 0.900, "utility_13_seeds split1_e10_s0"), (10.0, 1): (0.7011, 0.907, "epsilon_curve seed 1"),
           (1.0, 0): (0.7001, 0.890, "utility_13_seeds split1_e1_s0"), (1.0, 1): (0.7064, 0.900, "split1_e1_s1"),
           (1.0, 2): (0.6967, 0.915, "split1_e1_s2")}
extra = Path("/tmp/u17/w/split1_e10_s2/run/evaluation")
if extra.exists() and list(extra.glob("*.json")):
    e = json.loads(sorted(extra.glob("*.json"))[-1].read_text())
    DEFAULT[(10.0, 2)] = (e["downstream_accuracy"], e["diversity_ratio"], "split1_e10_s2 (this session)")
rows = []
for w, share in WORKS:
    for d in sorted(Path(w).glob("search_eps*_s*")):
        if d.is_dir() and list((d / "evaluation").glob("*.json")):
            r = one(d); r["share"] = share; rows.append(r)
print("| total ε | share | seed | K | trial ε (standalone) | trials: noisy score, knobs (released *) | final ε_f | release (acc, div) | default single run (acc, div) | difference |")
print("|---|---|---|---|---|---|---|---|---|---|")
out = []
for r in sorted(rows, key=lambda r: (-r["epsilon"], r["share"], r["seed"])):
    d = DEFAULT.get((r["epsilon"], r["seed"]))
    rep = json.loads((Path(dict((s, w) for w, s in WORKS)[r["share"]]) / f"search_eps{r['epsilon']:g}_s{r['seed']}" / "release" / "privacy_report.json").read_text())
    comp = rep["composition"]
    ef = comp.split("= ")[1].split(" + ")[1].split(" =")[0]
    tr = "; ".join(f"{t['score']:.3f} b {t['sampled'].get('group_size')}, split {t['sampled'].get('noise_split'):g}, lr_g {t['sampled'].get('lr_g'):g}{' *' if t['released'] else ''}" for t in r["trials"])
    diff = f"{100*(r['accuracy']-d[0]):+.1f}" if d else ""
    print(f"| {r['epsilon']:g} | {r['share']:g} | {r['seed']} | {r['K']} | {r['trials'][0]['epsilon_trial']:.3f} | {tr} | {ef} | {100*r['accuracy']:.1f} %, {r['diversity_ratio']:.2f} | "
          + (f"{100*d[0]:.1f} %, {d[1]:.2f} | {diff} |" if d else "| |"))
    out.append({**r, "default": d})
for eps in (10.0, 1.0):
    for share in (0.1, 0.5):
        sel = [r for r in rows if r["epsilon"] == eps and r["share"] == share]
        if not sel: continue
        ds = [DEFAULT[(eps, r["seed"])][0] for r in sel if (eps, r["seed"]) in DEFAULT]
        print(f"| {eps:g} | {share:g} | mean of {len(sel)} | | | | | {100*sum(r['accuracy'] for r in sel)/len(sel):.1f} % | {100*sum(ds)/max(1,len(ds)):.1f} % ({len(ds)}) | |")
Path("/tmp/tgs/rows.json").write_text(json.dumps(out, indent=1, default=str))

if len(sys.argv) > 1:  # write the results folder: rows JSON, table, plot
    folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
    import io, contextlib
    (folder / "result.json").write_text(json.dumps({"defaults": {f"{e:g}_s{s}": v for (e, s), v in DEFAULT.items()},
                                                    "searches": out}, indent=1, default=str))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([e * 0.93 for (e, s) in DEFAULT], [100 * v[0] for v in DEFAULT.values()], "o", label="default single run (one per seed)")
    for share, m, dx in ((0.1, "s", 1.0), (0.5, "D", 1.07)):
        sel = [r for r in out if r["share"] == share]
        if sel:
            ax.plot([r["epsilon"] * dx for r in sel], [100 * r["accuracy"] for r in sel], m,
                    label=f"subsample search (γ 0.2, share {share:g}) + final run")
    ax.set_xscale("log"); ax.set_xlabel("total ε (δ = 1e-5), tuning included"); ax.set_ylabel("downstream accuracy (%)")
    ax.set_title("Fashion-MNIST: tuning on a subsample vs one default run"); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(folder / "tuning_gain.png", dpi=110)
