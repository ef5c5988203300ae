"""The privacy report: ε of what ran, the events to recompute it, and what it assumes.

Every run and every search writes its report through `privacy_report`; `recompute` is the
independent check that `python -m dpaf_ray privacy` and `dpaf_ray.privacy_report` run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .ledger import PrivacyLedger

NOT_PRIVATE = ("NOT PRIVATE: this run used --reproducible-noise, so its noise can be replayed from the public "
               "seed; do not publish it")


# docs/design.md rule 18: where the defaults come from, in every report (train and search).
DEFAULTS_ASSUMPTION = ("the default hyperparameters (knobs, DP label-classifier phase tiers, T rules, release "
                       "knobs) were chosen on the public Fashion-MNIST and MNIST data sets without privacy; that "
                       "choice is transfer from public data, so a release of Fashion-MNIST or MNIST themselves "
                       "does not cover it (their ε does not account for the tuning of the defaults)")


CLASS_NAMES_ASSUMPTION = ("the class names are public facts the user supplied (the sorted names of an image folder's "
                          "class sub-folders, or a Parquet table's metadata), not read off the private records; "
                          "release/ publishes them (generator.pt, synthetic.parquet's metadata, the rows of "
                          "samples.png). Do not name a class after a private fact")


def data_assumptions(n_records: int, validation_fraction: float, num_classes: int,
                     shape: tuple[int, int, int], batch_size: int | None = None,
                     class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Public facts the mechanism relies on, stated instead of read off the data silently (rule 15);
    `class_names`: label k's name where the user named the classes (None: the classes are 0..K-1)."""
    out: dict[str, Any] = {
        "neighbouring_relation": "add or remove one record of the data set handed in",
        "data_set_size_public": n_records,
        "num_classes_public": num_classes,
        "image_shape_public": list(shape),
        "validation_split": (f"each record is held out with probability {validation_fraction:g} by a keyed hash "
                             "of its own pixels and label under the run secret; adding or removing one record "
                             "moves no other record"),
        "privacy_randomness": ("Poisson samples, group draws, noise, the split and the score noise derive from a "
                               "256-bit run secret that is never written outside the private checkpoints"),
        "accountant": "Rényi DP (dp_accounting RdpAccountant), converted to (ε, δ)",
        "defaults": DEFAULTS_ASSUMPTION,
    }
    if class_names is not None:
        out["class_names_public"] = list(class_names)
        out["class_names"] = CLASS_NAMES_ASSUMPTION
    if batch_size is not None:
        out["sampling_rate"] = (f"q = B / ((1 - f)·N) = {batch_size} / {(1 - validation_fraction) * n_records:g}, "
                                "from the public N and validation fraction f")
    return out


def privacy_report(ledger: PrivacyLedger, *, delta: float, target_epsilon: float, reproducible_noise: bool,
                   assumptions: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "epsilon": ledger.epsilon(delta),
        "target_epsilon": target_epsilon,
        "delta": delta,
        "private": not reproducible_noise,
        "reproducible_noise": bool(reproducible_noise),
        **ledger.to_json(),
        "assumptions": assumptions,
    }
    if reproducible_noise:
        report["warning"] = NOT_PRIVATE
    report.update(extra or {})
    return report


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1, default=_json_default))


def recompute(report: dict[str, Any], delta: float | None = None) -> dict[str, Any]:
    """ε recomputed from the report's events alone."""
    d = delta if delta is not None else report["delta"]
    from .subsample import SUBSAMPLED_ACCOUNTING, recompute_composed

    if report.get("accounting") == SUBSAMPLED_ACCOUNTING:  # a subsampled search and its final run (issue #14)
        composed = recompute_composed(report, d)
        out = {"epsilon": composed["epsilon"], "delta": d, "delta_composed": composed["delta"],
               "reported_epsilon": report.get("epsilon"), "composition": composed["composition"],
               "private": not report.get("reproducible_noise", False)}
    else:
        eps = PrivacyLedger.from_json(report).epsilon(d)
        out = {"epsilon": eps, "delta": d, "reported_epsilon": report.get("epsilon"),
               "private": not report.get("reproducible_noise", False)}
    if report.get("reproducible_noise"):
        out["warning"] = NOT_PRIVATE
    return out


def summary(report: dict[str, Any], result: dict[str, Any]) -> str:
    """`recompute`'s result as a few lines a person reads (`python -m dpaf_ray privacy`; --json for the dict)."""
    eps, delta = result["epsilon"], result["delta"]
    lines = [f"ε = {eps:.4g} at δ = {delta:g}, recomputed from the report's events alone"]
    reported, target = result.get("reported_epsilon"), report.get("target_epsilon")
    if isinstance(reported, (int, float)):
        agree = "agrees" if math.isclose(reported, eps, rel_tol=1e-6, abs_tol=1e-9) else "DIFFERS"
        lines.append(f"the report states ε = {reported:.4g} ({agree})"
                     + (f"; the budget was ε = {target:g}" if isinstance(target, (int, float)) else ""))
    if "composition" in result:
        lines.append(f"composition: {result['composition']}")
    assumptions = report.get("assumptions") or {}
    for key in ("data_set_size_public", "num_classes_public", "class_names_public", "neighbouring_relation",
                "accountant"):
        if key in assumptions:
            lines.append(f"{key.replace('_', ' ')}: {assumptions[key]}")
    for key in ("iterations_executed", "iterations_planned", "time_cap", "model"):
        if key in report:
            lines.append(f"{key.replace('_', ' ')}: {report[key]}")
    lines.append("private: yes" if result.get("private") else f"private: NO — {result.get('warning', NOT_PRIVATE)}")
    return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    raise TypeError(f"{type(o).__name__} is not written into a privacy report")
