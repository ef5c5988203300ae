"""Test accuracy of a run's DP label classifier (issue #13), and how often it labels G's images
as the class G was asked for. A benchmark (reads the real test split and the run's private
checkpoint directory): its output stays with the operator, never in release/.

    python bench/classifier_accuracy.py RUN_DIR   # prints JSON; {} when the run has no classifier
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dpaf_ray.data import load_dataset
from dpaf_ray.models.generator import load_generator
from teacher_labels import load_classifier  # bench/ is on sys.path when a script runs


def test_accuracy(model, test) -> float:
    """Share of the real test split the classifier labels right."""
    with torch.no_grad():
        pred = torch.cat([model(test.as_float(torch.arange(i, min(i + 2000, len(test))))).argmax(1)
                          for i in range(0, len(test), 2000)])
    return (pred == test.labels).float().mean().item()


def main(run_dir: str) -> dict:
    torch.set_num_threads(1)
    g = load_generator(run_dir)
    model = g.labeller or load_classifier(Path(run_dir), g)  # the release's, or (older runs) the checkpoint's
    if model is None:
        return {}
    config = json.loads((Path(run_dir) / "config.json").read_text())
    test = load_dataset(config.get("dataset", "fashion-mnist"), "test", config.get("data_root"))
    acc = test_accuracy(model, test)
    with torch.no_grad():
        x, y = g.sample(5000, seed=7)
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    return {"classifier_test_accuracy": acc, "classifier_on_generated": fake_acc}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
