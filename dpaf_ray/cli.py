"""`python -m dpaf_ray train | evaluate | privacy`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, TrainConfig
from .data.dataset import DataError
from .audit.cli import add_audit_parser, run_audit
from .evaluation.run import EvaluationError
from .privacy.ledger import PrivacyConfigError

_TYPES = {"checkpoint_every": int, "data_root": str, "seed": int, "iterations": int, "max_iterations": int, "epochs": float,
          "time_budget_minutes": float, "num_threads": int, "num_classes": int, "sigma_agg": float,
          "sigma_sgd": float, "classifier_steps": int, "generator_width": int}
_HIDDEN = {"extra_fixed_releases"}
_HELP = {
    "batch_size": "B = qN, expected real records per iteration",
    "group_size": "b, DPAGG group size",
    "sgd_every": "k: conv2 is updated every k-th iteration",
    "sigma_agg": "noise multiplier of the DPAGG release; a given σ fixes the noise and T comes from the budget",
    "sigma_sgd": "noise multiplier of the conv2 DP-SGD release (default: planned from the budget)",
    "noise_split": "σ_agg/σ_sgd when the planner sets the noise from the budget",
    "epochs": "T = epochs / q (instead of --iterations)",
    "max_iterations": "cap on T",
    "clip_agg": "C_agg, per-record feature bound",
    "clip_sgd": "C_sgd, per-record gradient bound",
    "iterations": "T (default: --epochs, --time-budget-minutes, or 900 at 28×28); the noise is set to spend ε",
    "seed": "public seed of initialisation and generated codes only; the noise comes from a secret (default: random)",
    "reproducible_noise": "tests and benchmarks only: derive the noise from --seed; the run is then NOT private",
    "num_classes": "public number of classes (Parquet tables without it in their metadata)",
    "classifier_steps": "P: DP-SGD steps of a DP label classifier before G trains (0: off; default with the default "
                        "plan: 1000, 300 or 75 steps where the planner finds its noise small enough, e.g. Fashion-MNIST "
                        "at ε >= 0.2 (below about ε = 0.45: 75 steps of B_c 4096 that only label the release), "
                        "else off)",
    "classifier_labels": "after a classifier phase the DP classifier labels the released synthetic set "
                         "(post-processing; --no-classifier-labels: G's asked labels)",
    "between_class_fraction": "share of the released synthetic set drawn between two classes' label codes and "
                              "labelled by the DP classifier (after a classifier phase; 0: one class per image; "
                              "the default phase sets 1 at 1000 steps and at 300 steps from ε ≈ 0.7 on Fashion-MNIST)",
    "uncertain_fraction": "share of the released synthetic set chosen as the images the DP classifier is least "
                          "sure of, from a pool 3× that size, even per label (after a classifier phase; 0: none)",
    "pixel_mix_fraction": "share of the released synthetic set mixed in pixels with another of its images and "
                          "relabelled by the DP classifier (after a classifier phase; 0: none, the default)",
    "boundary_fraction": "share of the released synthetic set moved 3 small steps towards the DP classifier's boundary "
                         "and relabelled by it (after a classifier phase; 0: none, the default)",
    "generator_width": "channels of G's first feature map, halved at each upsampling (public architecture; "
                       "default: the resolution's, 64 at 28×28; 128 measured 3 points worse at ε = 10)",
    "time_budget_minutes": "plan T to finish in about this time (speed probe on generated data, no privacy cost)",
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = _TYPES.get(f.name, type(default) if default is not None else str)
        if typ is bool:  # --flag / --no-flag
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=_HELP.get(f.name, ""))
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=default,
                       help=_HELP.get(f.name, "") + f" (default: {default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _HIDDEN
    return TrainConfig(**{n: getattr(args, n) for n in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpaf_ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DPAF (or DP-SGD GAN) generator under a privacy budget")
    add_config_arguments(t)
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--num-synthetic", type=int, default=10_000, help="size of synthetic.parquet")
    t.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (0: in-process, no Ray)")
    t.add_argument("--use-gpu", action="store_true", help="train on CUDA (in-process, or one GPU per Ray Train worker)")
    t.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="with --num-workers: each worker's share of a GPU, e.g. 0.5 puts 2 workers on one GPU")
    t.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="with --num-workers: CPUs Ray reserves for each worker (default 1)")
    t.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left in --out")
    t.add_argument("--force", action="store_true",
                   help="train a plan the pre-flight refuses as measured not to learn (its budget is spent anyway)")

    e = sub.add_parser("evaluate", help="downstream accuracy, FID and diversity of a trained generator "
                       "(a benchmark on real data: its results are not private and never enter release/)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir", help="a run directory (its release/generator.pt is evaluated)")
    e.add_argument("--test-data", required=True, help="data set name or path; its test split is used")
    e.add_argument("--train-data", default=None, help="real training data for the domain-FID classifier "
                   "(default: the train split of --test-data)")
    e.add_argument("--data-root", default=None, help="root of torchvision data sets")
    e.add_argument("--num-synthetic", type=int, default=60_000, help="synthetic images to train the CNN on")
    e.add_argument("--epochs", type=int, default=3, help="epochs of the downstream CNN")
    e.add_argument("--max-train-records", type=int, default=None, help="cap on each CNN's training set")
    e.add_argument("--inception-weights", default=None, help="local Inception-V3 weights (or DPAF_INCEPTION_WEIGHTS)")
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation (synthetic draw, CNN)")
    e.add_argument("--out", default=None, help="results file (default: RUN_DIR/evaluation/evaluation-<time>.json)")
    e.add_argument("--use-gpu", action="store_true", help="generate, train the CNNs and extract features on CUDA")

    pr = sub.add_parser("privacy", help="recompute ε from a privacy_report.json (a readable summary; --json for JSON)")
    pr.add_argument("report", help="a privacy_report.json, or a release/ or run folder holding one")
    pr.add_argument("--delta", type=float, default=None, help="δ to convert at (default: the report's)")
    pr.add_argument("--json", action="store_true", help="print the recomputed values as one JSON object")
    rs = sub.add_parser("results", help="the trials of a finished search, for the operator (never published)")
    rs.add_argument("run_dir", help="the --out of tune.py")
    add_audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .run import run_train

            cfg = config_from_args(args)
            run_train(cfg, args.out, args.num_synthetic, args.num_workers, args.use_gpu, args.address,
                      resume=not args.no_resume,
                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                      force=args.force)
        elif args.command == "evaluate":
            from .devices import device_for
            from .evaluation.run import evaluate_run

            metrics = evaluate_run(Path(args.run_dir), args.test_data, args.train_data, args.data_root,
                                   args.num_synthetic, args.epochs, args.max_train_records,
                                   args.inception_weights, args.seed, out=args.out,
                                   device=device_for(args.use_gpu), progress=print)
            print(json.dumps(metrics, indent=1))
        elif args.command == "results":
            from .tuning.results import SearchResults, plot_trials

            results = SearchResults(Path(args.run_dir))
            print(results.table())
            picture = plot_trials(results.trials, results.path / "trials" / "comparison.png")
            if picture is not None:
                print(f"comparison plot: {picture}")
        elif args.command == "audit":
            return run_audit(args)
        elif args.command == "privacy":
            from .privacy.report import recompute, summary

            path = Path(args.report)
            if path.is_dir():
                path = path / "release" / "privacy_report.json" if (path / "release").is_dir() \
                    else path / "privacy_report.json"
            report: dict[str, Any] = json.loads(path.read_text())
            result = recompute(report, args.delta)
            if not result["private"]:
                print(result["warning"], file=sys.stderr)
            print(json.dumps(result) if args.json else summary(report, result))
    except (ConfigError, DataError, PrivacyConfigError, EvaluationError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(interrupted_message(args, err), file=sys.stderr)
        return 130
    return 0


def interrupted_message(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """After Ctrl-C: what the ledger holds and why, what was kept, and how to continue."""
    from .training.loop import TrainingInterrupted

    if args.command == "train":
        out = Path(args.out)
        where = f"at iteration {err.iteration}/{err.total} " if isinstance(err, TrainingInterrupted) else ""
        ledger_path = out / "ledger.json"
        checkpoint = (out / "checkpoint" / "state.pt").exists()
        if not ledger_path.exists():
            return (f"interrupted {where}— nothing was charged (no {ledger_path}) and nothing released; "
                    "rerunning the same command starts afresh")
        from .privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger.load(ledger_path)
        charged = sum(getattr(e, "count", 0) for e in ledger.entries)
        eps = ledger.epsilon(args.delta)
        ran = f"{err.iteration} ran, " if isinstance(err, TrainingInterrupted) else ""
        why = (f"the ledger {ledger_path} holds ε={eps:.3f} of {args.epsilon:g} for {charged} charged iterations "
               f"({ran}the rest is the open write-ahead window, charged before it runs). It is a large share because "
               "(ε, δ) converted from RDP grows fastest over the first iterations and slowly after")
        if checkpoint:
            how = (f"the checkpoint in {out / 'checkpoint'} is kept: rerunning the same command (same --out) continues "
                   "it at the same noise, and the whole run spends the budget once")
        else:
            how = ("no checkpoint yet: rerunning the same command (same --out) counts this charge against the budget and "
                   "plans the rest, at nearly the same noise")
        return f"interrupted {where}— {why}. Nothing was released; {how}"
    if args.command == "evaluate":
        return "interrupted — evaluate wrote nothing (it costs no privacy: it reads no private ledger)"
    return "interrupted"
