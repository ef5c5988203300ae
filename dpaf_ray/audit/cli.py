"""`python -m dpaf_ray audit --level release|run`: measure a lower bound on ε and compare it with the claim.

Writes OUT/audit.json (`{"mechanisms": [...]}`, one entry per audited release) and prints a one-line
verdict. Exit status 0 when every entry is consistent, 1 on a VIOLATION, 2 on bad arguments. The
audit's inputs are synthetic canaries (and, at run level, the named data set), its outputs are about
the mechanism; it never writes into a `release/` folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..run_dir import own_run_dir, write_private_text
from .settings import MECHANISMS, ReleaseAuditSettings, RunAuditSettings

AUDIT_FILE = "audit.json"


class AuditError(ValueError):
    """Bad audit arguments; the message says which and how to fix them."""


def add_audit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `audit` sub-command on an existing `add_subparsers()` object."""
    defaults, run_defaults = ReleaseAuditSettings(), RunAuditSettings()
    a = subparsers.add_parser(
        "audit", help="empirical lower bound on ε from the real release code (release level) or one run (run level)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--level", choices=("release", "run"), default="release",
                   help="release: distinguishing test of each release kind; run: one audited run (Steinke et al. 2023)")
    a.add_argument("--out", default="audit", help="directory for audit.json (never a release/ folder)")
    a.add_argument("--delta", type=float, default=defaults.delta, help="δ at which ε is bounded (the run's δ)")
    a.add_argument("--seed", type=int, default=None,
                   help="derive the audit's noise and sampling from this public seed (reproducible); default: fresh secret")
    r = a.add_argument_group("release level")
    r.add_argument("--mechanisms", default=",".join(MECHANISMS), help="comma-separated releases to audit")
    r.add_argument("--sigma", type=float, default=defaults.sigma, help="noise multiplier of each audited release")
    r.add_argument("--trials", type=int, default=defaults.trials, help="vectorised trials per side")
    r.add_argument("--real-trials", type=int, default=defaults.real_trials, help="full real-path trials per side")
    r.add_argument("--world-size", type=int, default=defaults.world_size, choices=(1, 2),
                   help="ranks of the DPAGG release (2: threads with a real all-reduce)")
    r.add_argument("--clip-agg", type=float, default=defaults.clip_agg)
    r.add_argument("--kappa", type=float, default=defaults.kappa)
    r.add_argument("--clip-sgd", type=float, default=defaults.clip_sgd)
    u = a.add_argument_group("run level")
    u.add_argument("--dataset", default=run_defaults.dataset)
    u.add_argument("--epsilon", type=float, default=run_defaults.epsilon, help="the run's budget (the plan spends it)")
    u.add_argument("--canaries", type=int, default=run_defaults.canaries)
    u.add_argument("--sigma-agg", type=float, default=None, help="σ_agg (default: the training default)")
    u.add_argument("--sigma-sgd", type=float, default=None, help="σ_sgd (default: the training default)")
    u.add_argument("--max-iterations", type=int, default=None, help="cap T; the plan raises the noise to fit")
    u.add_argument("--max-records", type=int, default=None, help="use only the first N records of the data set")
    return a


def _output_dir(out: str) -> Path:
    path = Path(out).expanduser().resolve()
    if "release" in path.parts:
        raise AuditError(f"--out {out}: the audit never writes into a release/ folder; choose another directory")
    return path


def run_audit(args: argparse.Namespace) -> int:
    """Run the audit that `args` asks for; 0 consistent, 1 VIOLATION, 2 bad arguments."""
    from ..privacy.randomness import RunSecret  # torch and the trainer load only when an audit runs
    from .release_level import audit_releases
    from .run_level import audit_run

    try:
        out = _output_dir(args.out)
        secret = RunSecret.from_public_seed(args.seed) if args.seed is not None else RunSecret.fresh()
        if args.level == "release":
            settings = ReleaseAuditSettings(
                sigma=args.sigma, delta=args.delta, trials=args.trials, real_trials=args.real_trials,
                world_size=args.world_size, clip_agg=args.clip_agg, kappa=args.kappa, clip_sgd=args.clip_sgd)
            _check(settings.sigma > 0 and settings.trials >= 10 and 0 < settings.delta < 1,
                   "need --sigma > 0, --trials >= 10 and 0 < --delta < 1")
            mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
            _check(all(m in MECHANISMS for m in mechanisms), f"--mechanisms: choose from {', '.join(MECHANISMS)}")
            entries = [a.to_json() for a in audit_releases(settings, mechanisms, secret, progress=_err)]
            config: dict[str, Any] = {k: v for k, v in vars(settings).items()}
        else:
            settings_r = RunAuditSettings(
                dataset=args.dataset, epsilon=args.epsilon, delta=args.delta, canaries=args.canaries,
                sigma_agg=args.sigma_agg, sigma_sgd=args.sigma_sgd, max_iterations=args.max_iterations,
                max_records=args.max_records)
            _check(settings_r.canaries >= 10, "--canaries must be at least 10")
            entries = [audit_run(settings_r, secret, progress=_err).to_json()]
            config = {k: v for k, v in vars(settings_r).items() if k != "config"}
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # configuration, data and budget errors name their fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    verdict = "VIOLATION" if any(e["verdict"] == "VIOLATION" for e in entries) else "consistent"
    own_run_dir(out)  # 0700: audit.json holds statistics of real data (rule 18)
    doc = {"level": args.level, "verdict": verdict, "settings": config, "seeded": args.seed is not None,
           "mechanisms": entries}
    write_private_text(out / AUDIT_FILE, json.dumps(doc, indent=1, default=str))
    print(verdict_line(args.level, entries, out / AUDIT_FILE))
    return 1 if verdict == "VIOLATION" else 0


def verdict_line(level: str, entries: list[dict], path: Path | str) -> str:
    """One line: the overall verdict, then each entry's bound against its claim."""
    verdict = "VIOLATION" if any(e["verdict"] == "VIOLATION" for e in entries) else "consistent"
    parts = []
    for e in entries:
        theory = e["epsilon_theory"]
        theory_s = f"{theory:.3g}" if isinstance(theory, (int, float)) else str(theory)
        ratio = f" ({e['tightness']:.2f}×)" if e.get("tightness") is not None else ""
        parts.append(f"{e['mechanism']} ε ≥ {e['epsilon_lower_bound']:.3g} vs {theory_s}{ratio}"
                     + (" VIOLATION" if e["verdict"] == "VIOLATION" else ""))
    return f"audit ({level}, δ={entries[0]['delta']:g}): {verdict} — " + "; ".join(parts) + f" [{path}]"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AuditError(message)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m dpaf_ray.audit.cli`) until the main CLI wires the sub-command."""
    parser = argparse.ArgumentParser(prog="python -m dpaf_ray")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    return run_audit(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
