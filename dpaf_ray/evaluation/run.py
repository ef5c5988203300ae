"""`python -m dpaf_ray evaluate RUN_DIR`: metrics of a trained generator (a benchmark, never fed back into tuning).

It reads real data (the test split, and the train split for the domain-FID classifier), so
what it writes is NOT private: it goes to RUN_DIR/evaluation/ (a new file per call) or to
--out, and never into a release/ folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..data import load_dataset
from ..models.generator import load_generator
from ..release import RELEASE_DIR, generate, is_release_dir
from ..run_dir import private_dir, write_private_text
from .report import evaluate

# Values computed from real data without noise: for the operator only.
NOT_PRIVATE = ("real_data_accuracy", "within_class_distance_real", "fid_domain", "fid_inception", "diversity_ratio")


class EvaluationError(ValueError):
    """A bad evaluate invocation; the message says what to do instead."""


def evaluation_path(run_dir: Path, out: str | Path | None) -> Path:
    """Where the results go: never inside a release folder, never over an earlier file."""
    if out is None:
        if is_release_dir(run_dir):
            raise EvaluationError(
                f"{run_dir} is a release folder, and evaluation results (computed from real data, not private) "
                f"never go into one: pass the run directory above it ({run_dir.resolve().parent}), or --out FILE "
                "outside the release")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = run_dir / "evaluation" / f"evaluation-{stamp}.json"
        n = 1
        while path.exists():
            n += 1
            path = run_dir / "evaluation" / f"evaluation-{stamp}-{n}.json"
        return path
    path = Path(out)
    if any(is_release_dir(p) for p in [path.parent, *path.parent.parents] if p.exists()) or \
            RELEASE_DIR in path.resolve().parent.parts:
        raise EvaluationError(f"--out {path}: inside a release folder; write evaluation results elsewhere")
    if path.exists():
        raise EvaluationError(f"--out {path} already exists; evaluate never overwrites results, choose another file")
    return path


def evaluate_run(run_dir: Path, test_data: str, train_data: str | None = None, data_root: str | None = None,
                 num_synthetic: int = 60_000, epochs: int = 3, max_train_records: int | None = None,
                 inception_weights: str | None = None, seed: int = 0, out: str | Path | None = None,
                 device: str = "cpu", progress=None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = evaluation_path(run_dir, out)  # checked before any work
    generator = load_generator(run_dir, device)
    real_test = load_dataset(test_data, "test", data_root)
    real_train = load_dataset(train_data or test_data, "train", data_root)
    if progress:
        progress(f"evaluate: generating {num_synthetic} synthetic images")
    synthetic = generate(generator, num_synthetic, seed=seed + 3)
    metrics = evaluate(synthetic, real_train, real_test, epochs=epochs, inception_weights=inception_weights,
                       seed=seed, max_train_records=max_train_records, device=device, progress=progress)
    metrics["num_synthetic"] = num_synthetic
    metrics["settings"] = {"test_data": test_data, "train_data": train_data or test_data, "epochs": epochs,
                           "num_synthetic": num_synthetic, "max_train_records": max_train_records, "seed": seed,
                           "note": "fid_domain depends on these settings (the classifier's training data and "
                                   "epochs, the number of synthetic images); compare runs only at equal settings"}
    metrics["not_private"] = [k for k in NOT_PRIVATE if k in metrics]
    if out is None:
        private_dir(path.parent)  # RUN/evaluation: noiseless statistics of real data (rule 18)
    write_private_text(path, json.dumps(metrics, indent=1))
    metrics["written_to"] = str(path)
    return metrics
