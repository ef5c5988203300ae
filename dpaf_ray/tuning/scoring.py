"""A trial's score: accuracy on held-out data of a classifier trained on its synthetic data.

On the private validation split the count of correct predictions is released with
Gaussian noise (sensitivity 1, DESIGN rule 10) and charged to the trial; on a public
validation set the score is free.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from ..data.dataset import ImageDataset
from ..evaluation.classifier import correct_count, train_classifier
from ..privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class Score:
    value: float  # noisy accuracy (private) or accuracy (public)
    kind: str  # "private_validation" | "public_validation"
    noise_multiplier: float | None
    num_validation: int


def score_trial(synthetic: ImageDataset, validation: ImageDataset, ledger: PrivacyLedger,
                noise_multiplier: float | None, epochs: int, max_steps: int | None, seed: int = 0) -> Score:
    """Train the fixed classifier on synthetic data and score it; a private score is charged first."""
    if len(validation) == 0:
        raise ValueError("the validation split is empty; set validation_fraction > 0 or give a public validation set")
    model = train_classifier(synthetic, epochs=epochs, max_steps=max_steps, seed=seed)
    if noise_multiplier is None:
        return Score(correct_count(model, validation) / len(validation), "public_validation", None, len(validation))
    ledger.charge_gaussian(noise_multiplier)  # charged before the release
    g = torch.Generator().manual_seed(secrets.randbits(63))
    noisy = correct_count(model, validation) + noise_multiplier * float(torch.randn((), generator=g))
    return Score(noisy / len(validation), "private_validation", noise_multiplier, len(validation))
