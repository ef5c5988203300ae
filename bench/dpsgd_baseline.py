"""The plain DP-SGD classifier of issue #34: the yardstick a release is measured against.

A release that trains a classifier downstream should come near what a classifier trained
directly on the private records with DP-SGD reaches at the same (ε, δ). This trains that
classifier with Opacus, with hyperparameters fixed before any measurement on the held-out suite
and never tuned on it (public, common choices; see BASELINE):

  - the CNN of Opacus' MNIST example (conv 16@8x8/2 → maxpool 2/1 → conv 32@4x4/2 → maxpool 2/1
    → FC 32 → FC K, ReLU), the flattened size computed for the image shape;
  - Poisson sampling at an expected batch of 256, 20 epochs, per-record clip C = 1, SGD with
    learning rate 0.1 and momentum 0.9, pixels scaled to [-1, 1];
  - the noise multiplier from Opacus' RDP accountant so that the 20 epochs spend exactly (ε, δ)
    (`make_private_with_epsilon`); the ε reported is the accountant's for what ran.

It is a benchmark, not a release: its noise comes from torch's generator seeded by --seed (the
result is reproducible, and NOT private). Output: one JSON object.

    python bench/dpsgd_baseline.py --data ROOT/<set> --epsilon 10 --seed 0 [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dpaf_ray.data import load_dataset  # noqa: E402

BASELINE = {"model": "Opacus MNIST example CNN", "expected_batch": 256, "epochs": 20, "max_grad_norm": 1.0,
            "lr": 0.1, "momentum": 0.9, "accountant": "rdp", "poisson_sampling": True}


class SampleConvNet(nn.Module):
    """Opacus' MNIST example network, for any (C, H, W) and K classes."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(shape[0], 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        with torch.no_grad():
            flat = self._features(torch.zeros(1, *shape)).shape[1]
        self.fc1 = nn.Linear(flat, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self._features(x))))


def scaled(ds) -> torch.Tensor:
    return ds.images.float() / 127.5 - 1.0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    return (pred == y).float().mean().item()


def train_dpsgd(data: str, epsilon: float, delta: float, seed: int) -> dict:
    from opacus import PrivacyEngine

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    x, y = scaled(train), train.labels
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BASELINE["expected_batch"],
                                         shuffle=True)
    model = SampleConvNet(tuple(train.shape), train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=BASELINE["lr"], momentum=BASELINE["momentum"])
    engine = PrivacyEngine(accountant=BASELINE["accountant"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-mode and Poisson notices: this is a benchmark, not a release
        model, opt, loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
            epochs=BASELINE["epochs"], max_grad_norm=BASELINE["max_grad_norm"],
            poisson_sampling=BASELINE["poisson_sampling"])
    start = time.time()
    steps = 0
    for _ in range(BASELINE["epochs"]):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            if len(xb):
                F.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
    return {"kind": "dpsgd", "data": data, "epsilon_target": epsilon, "delta": delta, "seed": seed,
            "accuracy": accuracy(model, scaled(test), test.labels),
            "epsilon_spent": engine.get_epsilon(delta), "noise_multiplier": opt.noise_multiplier,
            "sample_rate": 1 / len(loader), "steps": steps, "n_train": len(train), "n_test": len(test),
            "train_s": round(time.time() - start, 1), "hyperparameters": BASELINE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A plain DP-SGD (Opacus) classifier on a data set's train split, "
                                            "tested on its test split")
    p.add_argument("--data", required=True, help="an image folder with train/ and test/ (bench/heldout_sets.py)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here (else stdout)")
    a = p.parse_args(argv)
    if not (a.epsilon > 0 and math.isfinite(a.epsilon) and 0 < a.delta < 1):
        p.error("--epsilon must be a positive number and --delta in (0, 1)")
    result = train_dpsgd(a.data, a.epsilon, a.delta, a.seed)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
