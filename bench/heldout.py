"""Issue #34's benchmark: the default release against a plain DP-SGD classifier on the frozen
held-out suite (bench/heldout_sets.py), at the same (ε, δ).

For each set, ε and seed it runs
  release: `python -m dpaf_ray train --dataset ROOT/<set> --epsilon E --seed S --out RUN` (the default
           plan, no other option) and `python -m dpaf_ray evaluate RUN --test-data ROOT/<set>` (its
           defaults; --out only places the file), one torch thread per process;
  dpsgd:   bench/dpsgd_baseline.py on the same training records and test split;
  search:  `python tune.py --dataset ROOT/<set> --epsilon E --out RUN` (the default search space, issue #35)
           and the same `evaluate` of its release; the seed only names the replicate (a search draws its own
           public seeds, and its K stays private: nothing about its trials is recorded here, though its wall
           time hints at K, harmless on these public benchmark sets and not to be published for private data);
and writes one JSON per run to bench/results/heldout/runs/, then the table
bench/results/heldout/table.md and the plot ratio.png. Runs whose JSON exists are skipped (resume);
a release's own folders stay in --workdir, outside the repository.

    python bench/heldout.py [--sets ...] [--epsilons 1 10] [--seeds 0 1 2] [--kinds dpsgd release search]
                            [--workdir ~/.cache/dpaf-heldout-runs] [--root ~/.cache/dpaf-heldout] [--jobs 1]
    python bench/heldout.py --table-only   # rewrite table.md and ratio.png from the JSON there

Runs go in the order given: every dpsgd run first (cheap), then releases, smallest set first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import heldout_sets  # noqa: E402
from dpaf_ray.tuning.tuner import release_holds_only_report  # noqa: E402

RESULTS = BENCH / "results" / "heldout"
DEFAULT_WORKDIR = Path("~/.cache/dpaf-heldout-runs").expanduser()
DELTA = 1e-5
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
GOAL, FLOOR = 0.85, 0.75  # the goal and floor for release / DP classifier


@dataclass(frozen=True)
class Job:
    set: str
    kind: str  # "release", "dpsgd" or "search"
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.set}_{self.kind}_e{self.epsilon:g}_s{self.seed}"

    def result_path(self, results: Path) -> Path:
        return results / "runs" / f"{self.name}.json"


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}).returncode
    return rc, round(time.time() - start, 1)


def _shown(cmd: list[str], root: Path, workdir: Path) -> str:
    """The command as a reader reruns it: ROOT and WORK instead of this machine's paths."""
    text = " ".join(shlex.quote(c) for c in cmd)
    for path, name in sorted([(str(root), "ROOT"), (str(workdir), "WORK")], key=lambda p: -len(p[0])):
        text = text.replace(path, name)  # the longer first: one may be a prefix of the other
    return text.replace(sys.executable, "python")


def run_release(job: Job, root: Path, workdir: Path) -> dict:
    d = workdir / job.name
    d.mkdir(parents=True, exist_ok=True)
    run_dir, data = d / "run", str(root / job.set)
    if job.kind == "search":
        train = [sys.executable, str(REPO / "tune.py"), "--dataset", data, "--epsilon", f"{job.epsilon:g}",
                 "--out", str(run_dir)]
    else:
        train = [sys.executable, "-m", "dpaf_ray", "train", "--dataset", data, "--epsilon", f"{job.epsilon:g}",
                 "--seed", str(job.seed), "--out", str(run_dir)]
    timing = d / "train_seconds.txt"
    if (run_dir / "release" / "privacy_report.json").exists() and timing.exists():  # trained before: evaluate only
        rc, train_s = 0, float(timing.read_text())
    else:
        rc, train_s = _run(train, d / "train.log")
        if rc == 0:
            timing.write_text(f"{train_s}\n")
    log = (d / "train.log").read_text(errors="replace")
    # A search's log prints one plan per trial: their count would reveal K, which stays with the operator.
    plan = [] if job.kind == "search" else [line.strip() for line in log.splitlines() if line.strip().startswith("plan:")]
    refusal = next((line.strip() for line in log.splitlines() if "refused before anything was charged" in line), None)
    if rc == 2 and refusal:  # the pre-flight's answer for this (N, ε): no release, nothing charged; a result too
        return {"set": job.set, "kind": job.kind, "epsilon_target": job.epsilon, "delta": DELTA, "seed": job.seed,
                "accuracy": None, "refused": refusal, "epsilon_spent": 0.0, "train_s": train_s, "eval_s": 0.0,
                "plan": plan, "commands": [_shown(train, root, workdir)]}
    if job.kind == "search" and rc == 1 and (run_dir / "release" / "privacy_report.json").exists() \
            and release_holds_only_report(run_dir):  # a search none of whose trials finished: charged, released its report alone
        report = json.loads((run_dir / "release" / "privacy_report.json").read_text())
        error = next((line.strip() for line in reversed(log.splitlines()) if line.startswith("error:")), "failed")
        return {"set": job.set, "kind": job.kind, "epsilon_target": job.epsilon, "delta": DELTA, "seed": job.seed,
                "accuracy": None, "failed": error, "epsilon_spent": report["epsilon"], "train_s": train_s,
                "eval_s": 0.0, "plan": plan, "commands": [_shown(train, root, workdir)]}
    if rc != 0:
        raise RuntimeError(f"{job.name}: {'tune.py' if job.kind == 'search' else 'train'} exited {rc}; "
                           f"see {d / 'train.log'}")
    evaluation = d / f"evaluation-{int(time.time())}.json"
    ev_cmd = [sys.executable, "-m", "dpaf_ray", "evaluate", str(run_dir), "--test-data", data, "--out", str(evaluation)]
    rc, eval_s = _run(ev_cmd, d / "evaluate.log")
    if rc != 0:
        raise RuntimeError(f"{job.name}: evaluate exited {rc}; see {d / 'evaluate.log'}")
    ev = json.loads(evaluation.read_text())
    report = json.loads((run_dir / "release" / "privacy_report.json").read_text())
    config = run_dir / "config.json"  # a single run's; a search's trials keep theirs in the private trials/
    cfg = json.loads(config.read_text()) if config.exists() else {}
    return {"set": job.set, "kind": job.kind, "epsilon_target": job.epsilon, "delta": DELTA, "seed": job.seed,
            "accuracy": ev["downstream_accuracy"], "real_data_accuracy": ev.get("real_data_accuracy"),
            "diversity_ratio": ev.get("diversity_ratio"), "fid_domain": ev.get("fid_domain"),
            "epsilon_spent": report["epsilon"], "train_s": train_s, "eval_s": eval_s,
            "classifier_steps": cfg.get("classifier_steps"), "iterations": cfg.get("iterations"),
            "sigma_agg": cfg.get("sigma_agg"), "sigma_sgd": cfg.get("sigma_sgd"), "plan": plan,
            "commands": [_shown(train, root, workdir), _shown(ev_cmd, root, workdir)]}


def run_dpsgd(job: Job, root: Path, workdir: Path) -> dict:
    d = workdir / job.name
    d.mkdir(parents=True, exist_ok=True)
    out = d / "result.json"
    cmd = [sys.executable, str(BENCH / "dpsgd_baseline.py"), "--data", str(root / job.set), "--epsilon",
           f"{job.epsilon:g}", "--delta", f"{DELTA:g}", "--seed", str(job.seed), "--out", str(out)]
    rc, wall = _run(cmd, d / "dpsgd.log")
    if rc != 0:
        raise RuntimeError(f"{job.name}: dpsgd_baseline exited {rc}; see {d / 'dpsgd.log'}")
    r = json.loads(out.read_text())
    r.update({"set": job.set, "wall_s": wall, "commands": [_shown(cmd, root, workdir).replace(str(REPO) + "/", "")]})
    r.pop("data", None)
    return r


def run_job(job: Job, root: Path, workdir: Path, results: Path) -> str:
    path = job.result_path(results)
    if path.exists():
        return f"{job.name}: done before, skipped"
    result = (run_dpsgd if job.kind == "dpsgd" else run_release)(job, root, workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    tmp.rename(path)
    if result["accuracy"] is None:
        if result.get("failed"):
            return f"{job.name}: failed, no release but its report (ε spent {result['epsilon_spent']:.3f})"
        return f"{job.name}: refused by the pre-flight (nothing charged)"
    return f"{job.name}: accuracy {result['accuracy']:.3f}, ε spent {result['epsilon_spent']:.3f}"


# ----------------------------------------------------------------------------------------------
# Table and plot


def load_results(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def _mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation, in %, and the seeds' values; '–' when there are none."""
    if not values:
        return "–"
    pct = [100 * v for v in values]
    m = statistics.mean(pct)
    spread = f" ± {statistics.stdev(pct):.1f}" if len(pct) > 1 else ""
    return f"{m:.1f}{spread} ({' / '.join(f'{v:.1f}' for v in pct)})"


def cells(rows: list[dict], sets: list[str], epsilons: list[float]) -> list[dict]:
    out = []
    for s in sets:
        for e in epsilons:
            rel = sorted((r for r in rows if r["set"] == s and r["kind"] == "release" and r["epsilon_target"] == e),
                         key=lambda r: r["seed"])
            dp = sorted((r for r in rows if r["set"] == s and r["kind"] == "dpsgd" and r["epsilon_target"] == e),
                        key=lambda r: r["seed"])
            ra = [r["accuracy"] for r in rel if r["accuracy"] is not None]
            da = [r["accuracy"] for r in dp]
            ratio = statistics.mean(ra) / statistics.mean(da) if ra and da else None
            refused = next((r["refused"] for r in rel if r.get("refused")), None)
            out.append({"set": s, "epsilon": e, "release": rel, "dpsgd": dp, "ratio": ratio, "refused": refused})
    return out


def _plan_summary(r: dict) -> str:
    """The printed plan's phase decision and T, shortened for a table cell."""
    text = " ".join(r.get("plan", []))
    t = re.search(r"plan: T=(\d+)", text)
    phase = re.search(r"first a DP label classifier: (\d+) DP-SGD steps", text)
    why = re.search(r"no DP label-classifier phase by default: (.*?)\)?, q=", text)
    parts = [f"T = {t.group(1)}" if t else "T = ?"]
    if phase:
        parts.append(f"classifier phase {phase.group(1)} steps")
    elif why:
        parts.append("no classifier phase: " + why.group(1).strip())
    if "WARNING" in text:
        parts.append("warned: " + "; ".join(w.split("WARNING:")[1].split(",")[0].strip()
                                            for w in r["plan"] if "WARNING" in w))
    return ", ".join(parts)


def _fixes(refusal: str) -> str:
    """The pre-flight's numeric fixes from its refusal line, for a table cell."""
    m = re.search(r"Fixes: (.*?)\. --force", refusal)
    return f"the pre-flight asks for {m.group(1)}" if m else refusal[:160]


def _repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def search_table(rows: list[dict], sets: list[str], epsilons: list[float]) -> list[str]:
    """Issue #35's comparison: the default search's release against the default single run (same set,
    same total ε); empty where no search was run."""
    out = []
    for s in sets:
        for e in epsilons:
            found = sorted((r for r in rows if r["set"] == s and r["kind"] == "search" and r["epsilon_target"] == e),
                           key=lambda r: r["seed"])
            if not found:
                continue
            single = [r["accuracy"] for r in rows if r["set"] == s and r["kind"] == "release"
                      and r["epsilon_target"] == e and r["accuracy"] is not None]
            done = [r["accuracy"] for r in found if r["accuracy"] is not None]
            gap = f"{100 * (statistics.mean(done) - statistics.mean(single)):+.1f}" if done and single else "–"
            not_released = "; ".join(f"seed {r['seed']}: " + ("refused" if r.get("refused") else "failed")
                                     for r in found if r["accuracy"] is None)
            spent = " / ".join(f"{r['epsilon_spent']:.3f}" for r in found)
            walls = " / ".join(f"{r['train_s']:.0f} + {r['eval_s']:.0f}" for r in found)
            failed = f" ({not_released})" if not_released else ""
            out.append(f"| {s} | {e:g} | {_mean_spread(done)}{failed} | {_mean_spread(single)} | {gap} | {spent} | "
                       f"{walls} |")
    if not out:
        return []
    return ["", "## The default search against the default single run (issue #35)", "",
            "Search: `python tune.py --dataset ROOT/<set> --epsilon E` with the default search space "
            "(search_spaces/default.yaml, its dataset replaced), its release evaluated like a single run's. The seed "
            "only names the replicate: a search draws its own public seeds and a private K, which is not recorded.",
            "", "| set | ε | search release acc | default single run acc | search − single (points) | ε spent "
            "(search ledger) | search + eval s |", "|---|---|---|---|---|---|---|", *out]


def write_table(results: Path, sets: list[str], epsilons: list[float]) -> Path:
    rows = load_results(results)
    manifest = heldout_sets.read_manifest()["sets"]
    lines = ["# Held-out suite (issue #34): default release against a plain DP-SGD classifier", "",
             f"Generated by `python bench/heldout.py` from `{_repo_relative(results)}/runs/*.json`; δ = 1e-5. Release: "
             "`train` with the default plan, `evaluate` defaults (60k synthetic images, the project's CNN, 3 "
             "epochs) on the set's test split. DP classifier: `bench/dpsgd_baseline.py` (Opacus, "
             "hyperparameters fixed before measuring; see docs/heldout.md). Accuracy in %: mean ± standard "
             "deviation over seeds (per-seed values in brackets); ratio = mean release / mean DP classifier. "
             f"The issue's goal is ratio ≥ {GOAL} on every set, none below {FLOOR}. `–` = not measured yet.", ""]
    about = results / "about.md"  # which defaults (commit, rule) these runs measured, where not today's
    if about.exists():
        lines += [about.read_text().strip(), ""]
    table = cells(rows, sets, epsilons)
    missing = [f"{c['set']} ε = {c['epsilon']:g} ({', '.join(k for k in ('release', 'dpsgd') if not c[k])})"
               for c in table if not (c["release"] and c["dpsgd"])]
    if missing:
        lines += ["**Partial table.** Cells without both runs: " + "; ".join(missing) + ".", ""]
    lines += ["| set | N train | ε | release acc | DP classifier acc | ratio | ε spent (release ledger / Opacus RDP) "
              "| real-data CNN (evaluate's) | diversity | release train + eval s (per seed) | DP classifier s "
              "| the release's plan |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in table:
        dp = c["dpsgd"]
        rel = [r for r in c["release"] if r["accuracy"] is not None]
        eps_rel = " / ".join(f"{r['epsilon_spent']:.3f}" for r in rel) or "–"
        eps_dp = " / ".join(f"{r['epsilon_spent']:.3f}" for r in dp) or "–"
        real = _mean_spread([r["real_data_accuracy"] for r in rel if r.get("real_data_accuracy") is not None])
        div = " / ".join(f"{r['diversity_ratio']:.2f}" for r in rel if r.get("diversity_ratio") is not None) or "–"
        walls = " / ".join(f"{r['train_s']:.0f} + {r['eval_s']:.0f}" for r in rel) or "–"
        dwall = " / ".join(f"{r['wall_s']:.0f}" for r in dp) or "–"
        ratio = "–" if c["ratio"] is None else f"**{c['ratio']:.2f}**"
        plans = "; ".join(dict.fromkeys(_plan_summary(r) for r in rel)) or "–"
        released = _mean_spread([r["accuracy"] for r in rel])
        if c["refused"] and not rel:  # refused for every seed (the pre-flight reads public facts only)
            ratio, released = "**refused**", "refused: " + _fixes(c["refused"])
        lines.append(f"| {c['set']} | {manifest.get(c['set'], {}).get('n_train', '?')} | {c['epsilon']:g} | "
                     f"{released} | {_mean_spread([r['accuracy'] for r in dp])} | "
                     f"{ratio} | {eps_rel} ; {eps_dp} | {real} | {div} | {walls} | {dwall} | {plans} |")
    lines += search_table(rows, sets, epsilons)
    lines += ["", "Commands (ROOT = the suite's root, `python bench/heldout_sets.py`; WORK = --workdir):", ""]
    shown = set()
    for r in rows:
        for cmd in r.get("commands", []):
            pattern = re.sub(r"--seed \d+", "--seed S", re.sub(r"--epsilon [\d.e+-]+", "--epsilon E", cmd))
            pattern = re.sub(r"WORK/[^ ]+", "WORK/<run>", pattern)
            pattern = re.sub(r"ROOT/[^ ]+", "ROOT/<set>", pattern)
            if pattern not in shown:
                shown.add(pattern)
                lines.append(f"- `{pattern}`")
    lines += ["", "The plans the release's `train` printed, per run:", ""]
    for r in rows:
        if r["kind"] == "release":
            said = r["plan"] + ([r["refused"]] if r.get("refused") else [])
            lines.append(f"- {r['set']} ε = {r['epsilon_target']:g} seed {r['seed']}: " + " | ".join(said))
    path = results / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(results: Path, sets: list[str], epsilons: list[float]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(load_results(results), sets, epsilons)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(epsilons))
    for j, e in enumerate(epsilons):
        xs, ys = [], []
        for i, s in enumerate(sets):
            c = next(c for c in table if c["set"] == s and c["epsilon"] == e)
            x = i + (j - (len(epsilons) - 1) / 2) * width
            if c["ratio"] is not None:
                xs.append(x)
                ys.append(c["ratio"])
            elif c["refused"]:  # no release: the pre-flight refused this (N, ε)
                ax.text(x, 0.03, "refused", rotation=90, ha="center", va="bottom", fontsize=7, color=f"C{j}")
        ax.bar(xs, ys, width, label=f"ε = {e:g}", color=f"C{j}")
    ax.axhline(GOAL, color="k", ls="--", lw=1, label=f"goal {GOAL}")
    ax.axhline(FLOOR, color="r", ls=":", lw=1, label=f"floor {FLOOR}")
    ax.set_xticks(range(len(sets)), sets, rotation=20)
    ax.set_xlim(-0.5, len(sets) - 0.5)
    ax.set_ylabel("release / DP-SGD classifier accuracy")
    ax.set_ylim(0, 1.1)
    ax.set_title("Default release on the held-out suite (missing bars: not measured)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = results / "ratio.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    all_sets = list(heldout_sets.SETS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=all_sets, choices=all_sets)
    p.add_argument("--epsilons", nargs="+", type=float, default=[10.0, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=["dpsgd", "release"], choices=["dpsgd", "release", "search"])
    p.add_argument("--root", type=Path, default=heldout_sets.DEFAULT_ROOT, help="the suite (built if missing)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="runs' own folders (outside the repo)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--jobs", type=int, default=1, help="parallel processes, one torch thread each")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if a.jobs < 1 or any(e <= 0 for e in a.epsilons):
        p.error("--jobs must be ≥ 1 and every --epsilons value positive")
    root, workdir = a.root.expanduser(), a.workdir.expanduser()
    if REPO in [workdir, *workdir.resolve().parents]:
        p.error(f"--workdir {workdir} is inside the repository; runs' folders hold private checkpoints: put them outside")
    n_train = {s: v["n_train"] for s, v in heldout_sets.read_manifest()["sets"].items()}
    table_sets = sorted(a.sets, key=lambda s: (n_train.get(s, 0), s))  # smallest N first
    if not a.table_only:
        manifest = heldout_sets.read_manifest()
        for s in a.sets:  # the suite must be the frozen one before anything is measured on it
            try:
                heldout_sets.verify(s, heldout_sets.build_set(s, root), manifest)
            except heldout_sets.SuiteError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        size = {s: manifest["sets"][s]["n_train"] for s in a.sets}
        jobs = [Job(s, k, e, seed) for k in a.kinds for seed in a.seeds for e in a.epsilons
                for s in sorted(a.sets, key=size.get)]
        failures = 0
        with ThreadPoolExecutor(a.jobs) as pool:
            futures = [(j, pool.submit(run_job, j, root, workdir, a.results)) for j in jobs]
            for j, f in futures:
                try:
                    print(f.result(), flush=True)
                except RuntimeError as e:
                    failures += 1
                    print(f"error: {e}", file=sys.stderr, flush=True)
                write_table(a.results, table_sets, a.epsilons)
                write_plot(a.results, table_sets, a.epsilons)
        print(f"table: {a.results / 'table.md'}")
        return 1 if failures else 0
    write_table(a.results, table_sets, a.epsilons)
    write_plot(a.results, table_sets, a.epsilons)
    print(f"table: {a.results / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
