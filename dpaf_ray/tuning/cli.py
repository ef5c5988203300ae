"""Command line of tune.py: a search-space file plus overrides, validated once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..data.dataset import DataError
from ..privacy.ledger import PrivacyConfigError
from .search_space import Param, SearchSpace, load_search_space, validate_search_space

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    """Options in the groups a newcomer reads top-down; each one overrides the search-space YAML's value."""
    p = argparse.ArgumentParser(prog="python tune.py", description="private DPAF hyperparameter search: the whole "
                                "search (trials, their noisy scores, the choice) is charged to one (ε, δ)",
                                epilog="Every option left out comes from the search-space file.",
                                usage="python tune.py [--search-space YAML] [--epsilon E] [--dataset DATA] "
                                      "[--out OUT] [options]",
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=34,
                                                                                    width=110))
    p.add_argument("--search-space", default=None, help=f"YAML file (default: {DEFAULT_SPACE.name})")
    budget = p.add_argument_group("budget", "the privacy budget of the whole search")
    budget.add_argument("--epsilon", type=float, default=None, help="ε of the whole search")
    budget.add_argument("--delta", type=float, default=None, help="δ of the whole search (keep it below 1/N)")
    data = p.add_argument_group("data", "your records (N and the class count are public facts)")
    data.add_argument("--dataset", default=None, help="a data set name or path, as `python -m dpaf_ray train "
                      "--help` lists (image folder with one sub-folder per class, Parquet table, ...)")
    data.add_argument("--data-root", default=None, help="folder of the named data sets' files")
    data.add_argument("--num-classes", type=int, default=None, help="public class count (Parquet tables without it)")
    data.add_argument("--public-validation", default=None, help="score on this public data set (free) instead")
    search = p.add_argument_group("search", "how many trials, and how they are drawn")
    search.add_argument("--search", choices=["random", "tpe"], default=None,
                        help="random, or Optuna's TPE sampler over the trials")
    search.add_argument("--expected-trials", type=float, default=None,
                        help="mean of the random number of trials K (its distribution is part of the guarantee)")
    search.add_argument("--trials-distribution", choices=["tnb", "logarithmic", "geometric", "poisson"], default=None,
                        help="the distribution K is drawn from (private selection, docs/design.md §6)")
    search.add_argument("--tnb-shape", type=float, default=None, help="shape of the truncated negative binomial K")
    search.add_argument("--subsample-fraction", type=float, default=None,
                        help="tune on a Poisson subsample: each record joins it with this probability γ (e.g. 0.2); "
                             "the chosen knobs are then trained once on all records (subsample.fraction)")
    search.add_argument("--subsample-epsilon-share", type=float, default=None,
                        help="with --subsample-fraction: the part of ε the amplified search spends, e.g. 0.1 "
                             "(subsample.epsilon_share); the final run gets the rest")
    search.add_argument("--subsample-final-iterations", type=int, default=None,
                        help="with --subsample-fraction: T of the final run on all records (default: a single run's)")
    compute = p.add_argument_group("compute", "where the trials run")
    compute.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per trial")
    compute.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                         help="train (and score) trials on CUDA; refused where no GPU is visible")
    compute.add_argument("--gpus-per-worker", type=float, default=None,
                         help="GPU share of each Train worker (or in-process trial), e.g. 0.25: 4 side by side on one GPU")
    compute.add_argument("--cpus-per-worker", type=float, default=None,
                         help="CPUs of each Train worker (or in-process trial)")
    compute.add_argument("--max-concurrent-trials", type=int, default=None, help="trials that run side by side")
    compute.add_argument("--num-threads", type=int, default=None,
                         help="torch threads of each in-process trial and of a final run (fixed.num_threads)")
    compute.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    compute.add_argument("--storage-path", default=None, help="shared storage for Tune/Train (multi-node clusters)")
    run = p.add_argument_group("run", "outputs and resuming")
    run.add_argument("--out", default=None, help="run directory (default: runs/<timestamp>)")
    run.add_argument("--resume", default=None, help="continue the search in this run directory")
    p.add_argument("--reproducible-noise", action="store_true", help=argparse.SUPPRESS)
    return p


def search_space_from_args(args: argparse.Namespace) -> SearchSpace:
    path = args.search_space or str(DEFAULT_SPACE)
    ss = load_search_space(path)
    overrides = {k: getattr(args, k) for k in ("dataset", "data_root", "num_classes", "epsilon", "delta", "search", "expected_trials",
                                               "trials_distribution", "tnb_shape", "num_workers", "use_gpu",
                                               "gpus_per_worker", "cpus_per_worker", "max_concurrent_trials",
                                               "public_validation", "subsample_fraction", "subsample_epsilon_share",
                                               "subsample_final_iterations") if getattr(args, k) is not None}
    if args.num_threads is not None:
        overrides["fixed"] = {**ss.fixed, "num_threads": args.num_threads}
    ss = dataclasses.replace(ss, **overrides)
    return validate_search_space(ss)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.reproducible_noise:
            raise ConfigError("--reproducible-noise is refused by tune.py: a search's release must be private. "
                              "Use `python -m dpaf_ray train --reproducible-noise --seed S` for tests and benchmarks")
        if args.resume:
            out = Path(args.resume)
            state = out / "trials" / "search_state.json"
            if not state.exists():
                raise ConfigError(f"--resume {out}: no search state there (expected {state})")
            saved = json.loads(state.read_text())["search_space"]
            # The search distribution is the one saved when K was drawn, not the file as it is now.
            ss = validate_search_space(SearchSpace(**{**saved, "params": [Param(**q) for q in saved["params"]]}))
        else:
            ss = search_space_from_args(args)
            out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if ss.epsilon <= 0:
            raise PrivacyConfigError(f"--epsilon must be > 0, got {ss.epsilon}")
        from ..auth_token import protect_auth_token
        from .tuner import RELEASE_DIR, SearchFailed, SearchInterrupted, run_search

        protect_auth_token(args.address)  # before Ray can write ~/.ray/auth_token with the umask
        # A resume of a released search releases nothing: run_search says where the release is (or fails when
        # it holds only its report), and no "release:" line claims this command wrote it.
        already_released = bool(args.resume) and (out / RELEASE_DIR).exists()
        try:
            release = run_search(ss, out, resume=bool(args.resume), address=args.address,
                                 storage_path=args.storage_path)
        except SearchInterrupted as err:
            print(f"interrupted: {err}", file=sys.stderr)
            return 3
        except SearchFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            charged = ""
            if (out / "ledger.json").exists():
                from ..privacy.ledger import PrivacyLedger

                ledger = PrivacyLedger.load(out / "ledger.json")
                budget = ss.subsample_budget()
                if budget is None:
                    spent = f"ε={ledger.epsilon(ss.delta):.3f}"
                else:  # on a subsample: its amplified ε, from the same ledger (privacy.subsample)
                    from ..privacy.subsample import composed_privacy

                    spent = f"ε={composed_privacy(ledger, None, budget)['search']['amplified_epsilon']:.3f} (amplified)"
                charged = f"the whole search's {spent} was charged when it started ({out / 'ledger.json'}); "
            print(f"interrupted — {charged}finished trials are kept in {out / 'trials'} and nothing was released. "
                  f"Continue with: python tune.py --resume {out}", file=sys.stderr)
            return 130
        if not already_released:
            print(f"release: {release}")
    except (ConfigError, DataError, PrivacyConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
