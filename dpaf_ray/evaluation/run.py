"""`python -m dpaf_ray evaluate RUN_DIR`: metrics of a trained generator (a benchmark, never fed back into tuning)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import load_dataset
from .report import evaluate


def evaluate_run(run_dir: Path, test_data: str, train_data: str | None = None, data_root: str | None = None,
                 num_synthetic: int = 60_000, epochs: int = 3, max_train_records: int | None = None,
                 inception_weights: str | None = None, seed: int = 0) -> dict[str, Any]:
    from ..training.outputs import generate, load_generator

    gen_path = run_dir / "generator.pt"
    if not gen_path.exists():
        raise FileNotFoundError(f"{gen_path} not found: evaluate a directory written by `train` or a release")
    generator = load_generator(gen_path)
    real_test = load_dataset(test_data, "test", data_root)
    real_train = load_dataset(train_data or test_data, "train", data_root)
    synthetic = generate(generator, num_synthetic, real_test.num_classes, seed=seed + 3)
    metrics = evaluate(synthetic, real_train, real_test, epochs=epochs, inception_weights=inception_weights,
                       seed=seed, max_train_records=max_train_records)
    metrics["num_synthetic"] = num_synthetic
    (run_dir / "evaluation.json").write_text(json.dumps(metrics, indent=1))
    return metrics
