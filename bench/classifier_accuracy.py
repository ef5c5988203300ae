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
from dpaf_ray.models.architecture import architecture_for
from dpaf_ray.models.generator import load_generator
from dpaf_ray.models.label_classifier import LabelClassifier
from dpaf_ray.training.checkpoint import LocalCheckpointSink


def main(run_dir: str) -> dict:
    torch.set_num_threads(1)
    state = LocalCheckpointSink(Path(run_dir), True).latest()
    mods = state["trainer"]["modules"] if state else {}
    if "classifier" not in mods:
        return {}
    config = json.loads((Path(run_dir) / "config.json").read_text())
    test = load_dataset(config.get("dataset", "fashion-mnist"), "test", config.get("data_root"))
    model = LabelClassifier(architecture_for(test.shape), test.num_classes)
    model.load_state_dict(mods["classifier"])
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(test.as_float(torch.arange(i, min(i + 2000, len(test))))).argmax(1)
                          for i in range(0, len(test), 2000)])
        acc = (pred == test.labels).float().mean().item()
        g = load_generator(run_dir)
        x, y = g.sample(5000, seed=7)
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    return {"classifier_test_accuracy": acc, "classifier_on_generated": fake_acc}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
