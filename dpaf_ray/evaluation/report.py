"""One call that benchmarks a synthetic data set against the real one.

Benchmark only (docs/design.md §7): it reads the real test split, so nothing here may feed back into
tuning or model selection; private trial scoring uses `models.scoring_cnn.correct_count` on the private
validation split with noise added, elsewhere.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.evaluation.diversity import within_class_diversity
from dpaf_ray.evaluation.downstream import DEFAULT_EPOCHS, check_compatible, train_and_score
from dpaf_ray.evaluation.fid import domain_fid, inception_fid

#: Records per side used for FID statistics: enough for stable 128-d (domain) covariances and
#: the usual 10k convention, without making CPU runs take hours.
DEFAULT_MAX_FID_RECORDS = 10_000


def evaluate(
    synthetic: ImageDataset,
    real_train: ImageDataset,
    real_test: ImageDataset,
    *,
    epochs: int = DEFAULT_EPOCHS,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    max_train_records: int | None = None,
    max_fid_records: int | None = DEFAULT_MAX_FID_RECORDS,
    diversity_per_class: int = 200,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Downstream accuracy, real-data accuracy, FID(s) and diversity of `synthetic`.

    - `downstream_accuracy`: fixed CNN trained on `synthetic`, tested on `real_test`.
    - `real_data_accuracy`: the same CNN and budget trained on `real_train`; that model is also
      the feature extractor for `fid_domain`.
    - `fid_domain`: FID between `real_test` and `synthetic` in that classifier's penultimate
      features (the held-out split, because the extractor was fit on `real_train`).
    - `fid_inception`: only present when Inception weights are given (argument or
      `$DPAF_INCEPTION_WEIGHTS`); also against `real_test`.
    - `diversity_ratio`, `within_class_distance_synthetic`, `within_class_distance_real`:
      same-class mean pairwise distances (real = `real_train`), ratio over shared classes.

    `max_train_records` caps both classifier training sets; `max_fid_records` caps each side of
    the FID statistics.
    """
    check_compatible(synthetic, real_test)
    check_compatible(real_train, real_test)
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            progress(f"evaluate [{time.time() - t0:5.0f}s] {msg}")

    def epochs_done(step: str) -> Callable[[int, int], None]:
        started = time.time()

        def report(done: int, total: int) -> None:
            spent = time.time() - started
            say(f"{step}: epoch {done}/{total} done, about {_minutes(spent / done * (total - done))} left for this CNN")
        return report

    n_syn = len(synthetic) if max_train_records is None else min(len(synthetic), max_train_records)
    say(f"1/4 training the downstream CNN on {n_syn} synthetic images ({epochs} epochs)")
    _, downstream = train_and_score(
        synthetic, real_test, epochs=epochs, seed=seed, batch_size=batch_size,
        max_train_records=max_train_records, device=device, on_epoch=epochs_done("1/4 downstream CNN"),
    )
    say(f"2/4 downstream accuracy {downstream:.4f}; training the same CNN on real data (the reference)")
    real_model, real_acc = train_and_score(
        real_train, real_test, epochs=epochs, seed=seed, batch_size=batch_size,
        max_train_records=max_train_records, device=device, on_epoch=epochs_done("2/4 real-data CNN"),
    )
    say(f"3/4 real-data accuracy {real_acc:.4f}; FID")
    result: dict = {
        "downstream_accuracy": downstream,
        "real_data_accuracy": real_acc,
        "fid_domain": domain_fid(real_test, synthetic, real_model, max_records=max_fid_records, seed=seed),
    }
    fid_inc = inception_fid(
        real_test, synthetic, inception_weights, device=device, max_records=max_fid_records, seed=seed
    )
    if fid_inc is not None:
        result["fid_inception"] = fid_inc

    say("4/4 within-class diversity")
    syn_div = within_class_diversity(synthetic, diversity_per_class, seed)
    real_div = within_class_diversity(real_train, diversity_per_class, seed)
    common = sorted(set(syn_div["per_class"]) & set(real_div["per_class"]))
    ratio = math.nan
    if common:
        real_mean = sum(real_div["per_class"][k] for k in common) / len(common)
        syn_mean = sum(syn_div["per_class"][k] for k in common) / len(common)
        ratio = syn_mean / real_mean if real_mean > 0 else math.nan
    result["diversity_ratio"] = ratio
    result["within_class_distance_synthetic"] = syn_div["mean"]
    result["within_class_distance_real"] = real_div["mean"]
    return result


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"
