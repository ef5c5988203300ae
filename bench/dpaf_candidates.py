"""Measure the docs/design.md §3a candidates on Fashion-MNIST at one privacy budget.

Each named configuration is trained with the same iteration cap (the plan lowers the noise so
that the capped run spends exactly the budget, rule 12), then evaluated:

- downstream accuracy: the fixed SmallCNN trained on 10k labelled synthetic images, tested on
  the REAL test split (a benchmark; never fed back into training or tuning);
- diversity_ratio: same-class mean pairwise distance, synthetic / real (≈ 0 means collapse);
- fid_domain: FID in the features of the same CNN trained on real training data.

Outputs: bench/results/dpaf_candidates.json (+ .md table), bench/results/dpaf_candidates.png
(the sample grids side by side), the table on stdout. Runs go to --work-dir/NAME; a run
whose directory already holds metrics.json for the same configuration is reused
(--retrain forces training again), so the script can be resumed or run in parts (--only).

Time: one training process with one thread. On the shared 2-CPU development box a DPAF
iteration at B = 256 takes ≈ 0.4 s (up to 1.3 s for the DP-SGD GAN when other jobs load the
CPUs) and evaluation ≈ 40 s, so the default (11 candidates × 250 iterations, each run also
stopped at a 50-iteration checkpoint boundary after 4 min) finishes in ≈ 35 min (measured with
the first 8 candidates: 20.5 min). A run stopped by the time limit reports the ε its ledger actually spent.

    /work/venv/bin/python bench/dpaf_candidates.py [--iterations 250] [--only a_naive,h_moments_fm]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.config import TrainConfig  # noqa: E402
from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.evaluation.diversity import diversity_ratio  # noqa: E402
from dpaf_ray.evaluation.downstream import train_and_score  # noqa: E402
from dpaf_ray.evaluation.fid import domain_fid  # noqa: E402
from dpaf_ray.models.generator import load_generator  # noqa: E402
from dpaf_ray.release import generate  # noqa: E402
from dpaf_ray.run import run_train  # noqa: E402

# The §3a knobs are given explicitly in every candidate so that changing the TrainConfig
# defaults does not silently change what a row means.
NAIVE = dict(grouping="mixed", embedding="linear", head_weight=0.0, feature_matching=0.0, pixel_statistics=False,
             pixel_moments="mean,sq_mean", smooth_output=False, lr_g=1e-3, sgd_every=1)
CANDIDATES: list[tuple[str, str, dict]] = [
    ("a_naive", "mixed groups, linear features, no head, no FM", NAIVE),
    ("b_class", "class-pure groups", {**NAIVE, "grouping": "class"}),
    ("c_class_moments", "class + [φ, φ⊙φ]", {**NAIVE, "grouping": "class", "embedding": "moments"}),
    ("d_class_rff", "class + random Fourier features", {**NAIVE, "grouping": "class", "embedding": "rff"}),
    ("e_moments_head", "class + moments + per-record head",
     {**NAIVE, "grouping": "class", "embedding": "moments", "head_weight": 1.0}),
    ("f_moments_head_fm", "class + moments + head + feature matching",
     {**NAIVE, "grouping": "class", "embedding": "moments", "head_weight": 1.0, "feature_matching": 10.0}),
    ("h_moments_fm", "class + moments + feature matching, no head",
     {**NAIVE, "grouping": "class", "embedding": "moments", "feature_matching": 10.0}),
    ("k_moments_fm_pixels", "class + moments + public 14×14 pixel moments + feature matching",
     {**NAIVE, "grouping": "class", "embedding": "moments", "feature_matching": 10.0, "pixel_statistics": True,
      "pixel_matching": 10.0}),
    ("l_pixels_rff", "k + random Fourier features of the image in the pixel block",
     {**NAIVE, "grouping": "class", "embedding": "moments", "feature_matching": 10.0, "pixel_statistics": True,
      "pixel_matching": 10.0, "pixel_moments": "mean,sq_mean,rff"}),
    ("m_pixels_rff_smooth", "l + a fixed low-pass at G's output",
     {**NAIVE, "grouping": "class", "embedding": "moments", "feature_matching": 10.0, "pixel_statistics": True,
      "pixel_matching": 10.0, "pixel_moments": "mean,sq_mean,rff", "smooth_output": True}),
    ("n_default", "m + lr_g 1.5e-4 + conv2 released every 2nd iteration (the default)",
     {**NAIVE, "grouping": "class", "embedding": "moments", "feature_matching": 10.0, "pixel_statistics": True,
      "pixel_matching": 10.0, "pixel_moments": "mean,sq_mean,rff", "smooth_output": True, "lr_g": 1.5e-4,
      "sgd_every": 2}),
    ("g_dpsgd_gan", "DP-SGD GAN baseline (same G, D without DPAGG)",
     {"model": "dpsgd-gan", "smooth_output": False, "lr_g": 1e-3}),
]
OPTIONAL: list[tuple[str, str, dict]] = [
    ("j_rff_fm", "class + rff + feature matching, no head",
     {**NAIVE, "grouping": "class", "embedding": "rff", "feature_matching": 10.0}),
    ("i_f_B512", "f with B = 512, b = 51 (one group per class)",
     {**NAIVE, "grouping": "class", "embedding": "moments", "head_weight": 1.0, "feature_matching": 10.0,
      "batch_size": 512, "group_size": 51}),
]


def base_config(args: argparse.Namespace, knobs: dict) -> TrainConfig:
    cfg = TrainConfig(dataset=args.dataset, epsilon=args.epsilon, delta=args.delta, seed=args.seed,
                      max_iterations=args.iterations, time_budget_minutes=args.time_budget_minutes,
                      num_threads=args.num_threads, checkpoint_every=args.checkpoint_every,
                      log_every=args.log_every)
    return dataclasses.replace(cfg, **knobs)


def train(name: str, cfg: TrainConfig, run_dir: Path, args: argparse.Namespace) -> dict:
    """Train (or reuse) one run; returns its metrics plus the calibrated noise."""
    config_file, metrics_file = run_dir / "requested.json", run_dir / "metrics.json"
    wanted = json.dumps(cfg.to_dict(), sort_keys=True)
    if (not args.retrain and metrics_file.exists() and config_file.exists()
            and config_file.read_text() == wanted):
        print(f"[{name}] reusing {run_dir}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        print(f"[{name}] training → {run_dir}", flush=True)
        run_train(cfg, run_dir, num_synthetic=args.num_synthetic,
                  progress=lambda s: print(f"[{name}] {s}", flush=True))
        config_file.write_text(wanted)
    metrics = json.loads(metrics_file.read_text())
    used = json.loads((run_dir / "config.json").read_text())  # σs after calibration to the cap
    metrics["sigma_agg"] = used["sigma_agg"] if used["model"] == "dpaf" else None
    metrics["sigma_sgd"] = used["sigma_sgd"]
    return metrics


class Evaluator:
    """Downstream accuracy, diversity and domain FID; the real-data CNN is trained once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.test = load_dataset(args.dataset, "test")
        self.train = load_dataset(args.dataset, "train")
        t0 = time.time()
        self.real_model, self.real_acc = train_and_score(
            self.train, self.test, epochs=args.eval_epochs, seed=0, max_train_records=args.max_train_records)
        print(f"real-data CNN: accuracy {self.real_acc:.4f} ({time.time() - t0:.0f}s)", flush=True)

    def __call__(self, run_dir: Path) -> dict:
        gen = load_generator(run_dir / "generator.pt")
        synthetic = generate(gen, self.args.num_synthetic, self.test.num_classes, seed=3)
        _, acc = train_and_score(synthetic, self.test, epochs=self.args.eval_epochs, seed=0,
                                 max_train_records=self.args.max_train_records)
        return {
            "downstream_accuracy": acc,
            "real_data_accuracy": self.real_acc,
            "diversity_ratio": diversity_ratio(synthetic, self.train),
            "fid_domain": domain_fid(self.test, synthetic, self.real_model, max_records=10_000, seed=0),
        }


def fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| config | what | iterations | σ_agg | σ_sgd | ε | s/iter | downstream acc | diversity ratio | "
            "fid_domain |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['name']} | {r['description']} | {r['iterations_executed']} | {fmt(r['sigma_agg'], '.3f')} | "
        f"{fmt(r['sigma_sgd'], '.3f')} | {fmt(r['epsilon'], '.2f')} | {fmt(r['seconds_per_iteration'], '.3f')} | "
        f"{fmt(r['downstream_accuracy'], '.4f')} | {fmt(r['diversity_ratio'], '.3f')} | {fmt(r['fid_domain'], '.1f')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def picture(rows: list[dict], work_dir: Path, path: Path) -> None:
    """The runs' samples.png grids (one row per class, 10 samples) side by side, titled."""
    from PIL import Image, ImageDraw

    grids = [(r["name"], Image.open(work_dir / r["name"] / "samples.png").convert("RGB")) for r in rows
             if (work_dir / r["name"] / "samples.png").exists()]
    if not grids:
        return
    scale, title, gap, per_row = 2, 16, 8, 4
    w = max(g.width for _, g in grids) * scale
    h = max(g.height for _, g in grids) * scale
    ncols = min(per_row, len(grids))
    nrows = math.ceil(len(grids) / per_row)
    canvas = Image.new("RGB", (ncols * (w + gap), nrows * (h + title + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, g) in enumerate(grids):
        x, y = (i % per_row) * (w + gap), (i // per_row) * (h + title + gap)
        draw.text((x + 4, y + 2), name, fill=(0, 0, 0))
        canvas.paste(g.resize((g.width * scale, g.height * scale), Image.NEAREST), (x, y + title))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--iterations", type=int, default=250, help="iteration cap T of every run")
    p.add_argument("--time-budget-minutes", type=float, default=4.0, help="per-run training time limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--num-synthetic", type=int, default=10_000)
    p.add_argument("--eval-epochs", type=int, default=2)
    p.add_argument("--max-train-records", type=int, default=20_000)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all required ones)")
    p.add_argument("--with-optional", action="store_true", help="also run the B/b variants")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/exp/dpaf_candidates"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "dpaf_candidates.json")
    args = p.parse_args()
    torch.set_num_threads(args.num_threads)

    pool = CANDIDATES + OPTIONAL
    chosen = CANDIDATES + (OPTIONAL if args.with_optional else [])
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {n for n, _, _ in pool}
        if unknown:
            p.error(f"unknown candidate(s) {sorted(unknown)}; known: {[n for n, _, _ in pool]}")
        chosen = [c for c in pool if c[0] in names]

    t_start = time.time()
    evaluator = Evaluator(args)
    previous = {}
    if args.results.exists():  # keep rows of candidates not re-run this time
        previous = {r["name"]: r for r in json.loads(args.results.read_text()).get("rows", [])}
    for name, description, knobs in chosen:
        cfg = base_config(args, knobs)
        run_dir = args.work_dir / name
        metrics = train(name, cfg, run_dir, args)
        t0 = time.time()
        ev = evaluator(run_dir)
        row = {"name": name, "description": description, "knobs": knobs, **{
            k: metrics[k] for k in ("iterations_executed", "epsilon", "sigma_agg", "sigma_sgd",
                                    "seconds_per_iteration", "train_seconds")}, **ev,
            "eval_seconds": time.time() - t0}
        previous[name] = row
        print(f"[{name}] acc {ev['downstream_accuracy']:.4f} diversity {ev['diversity_ratio']:.3f} "
              f"fid_domain {ev['fid_domain']:.1f}", flush=True)
        order = [n for n, _, _ in pool]
        rows = sorted(previous.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 99)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({
            "dataset": args.dataset, "epsilon": args.epsilon, "delta": args.delta,
            "iteration_cap": args.iterations, "eval": {"num_synthetic": args.num_synthetic,
                                                       "epochs": args.eval_epochs,
                                                       "max_train_records": args.max_train_records},
            "rows": rows}, indent=1))
        args.results.with_suffix(".md").write_text(table(rows))
        picture(rows, args.work_dir, args.results.with_suffix(".png"))
    print(table(rows))
    print(f"total {time.time() - t_start:.0f}s; results in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
