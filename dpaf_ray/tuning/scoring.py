"""A trial's score: accuracy on held-out data of a classifier trained on its synthetic data.

On the private validation split the count of correct predictions is released with
Gaussian noise (sensitivity 1, docs/design.md rule 10) and charged to the trial; on a public
validation set the score is free. The noisy count is divided by the public expected size
of the validation split f·N, never by the realised count (rule 14), and the noise comes from
the trial's secret.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

from torch import nn

from ..data.dataset import ImageDataset
from ..models.scoring_cnn import correct_count, train_classifier
from ..privacy.ledger import PrivacyLedger
from ..privacy.randomness import RunSecret


# Common random numbers (docs/design.md §6): every trial's scoring classifier starts from the same public initialisation
# and reads its synthetic set in the same order (`train_classifier(seed=...)`), and every trial's synthetic set
# is drawn with the same public codes (`training.outputs.SYNTHETIC_SEED`), so two trials' scores differ by
# their generators, not by the scorer's own randomness. Public: it touches no private data.
SCORE_CLASSIFIER_SEED = 0


@dataclass(frozen=True)
class Score:
    value: float  # noisy accuracy (private) or accuracy (public)
    kind: str  # "private_validation" | "public_validation"
    noise_multiplier: float | None
    expected_validation: float  # the public divisor (f·N), or the size of a public validation set


def score_trial(synthetic: ImageDataset, validation: ImageDataset, ledger: PrivacyLedger,
                noise_multiplier: float | None, epochs: int, max_steps: int | None,
                seed: int = SCORE_CLASSIFIER_SEED, *,
                expected_validation: float | None = None, secret: RunSecret | None = None,
                commit: Callable[[PrivacyLedger], None] | None = None, device: str = "cpu",
                model: nn.Module | None = None) -> Score:
    """Train the fixed classifier on synthetic data (on `device`) and score it.

    `model`: the classifier, when it was trained elsewhere on `synthetic` (a Tune trial trains it
    on its workers' GPU: `tuning.resources.synthesise_and_fit`); it may sit on any device.
    A private score is charged (and `commit`ted to the write-ahead ledger) before the noisy
    count is computed; it needs the public `expected_validation` and the trial's `secret`."""
    if model is None:
        model = train_classifier(synthetic, epochs=epochs, max_steps=max_steps, seed=seed, device=device)
    if noise_multiplier is None:
        if len(validation) == 0:
            raise ValueError("the public validation set is empty")
        return Score(correct_count(model, validation) / len(validation), "public_validation", None,
                     float(len(validation)))
    if expected_validation is None or expected_validation <= 0 or secret is None:
        raise ValueError("a private score needs the public expected validation size f·N > 0 and the trial secret; "
                         "set validation_fraction > 0")
    ledger.charge_gaussian(noise_multiplier)  # charged before the release
    if commit is not None:
        commit(ledger)
    noise = float(secret.stream("noise/score").normal(1)[0])
    noisy = correct_count(model, validation) + noise_multiplier * noise
    return Score(noisy / expected_validation, "private_validation", noise_multiplier, expected_validation)
