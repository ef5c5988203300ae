"""Evaluation: a benchmark of synthetic data, not part of the private release (docs/design.md §7).

Downstream accuracy, FID (domain and, with local weights, Inception), within-class diversity and
pictures. Results on the real test split never feed back into tuning. The classifier it trains
is the fixed scoring CNN of `dpaf_ray.models.scoring_cnn`.
"""
from dpaf_ray.evaluation.diversity import diversity_ratio, within_class_diversity
from dpaf_ray.evaluation.downstream import downstream_accuracy, real_data_accuracy
from dpaf_ray.evaluation.fid import (
    INCEPTION_WEIGHTS_ENV,
    domain_fid,
    feature_statistics,
    frechet_distance,
    inception_fid,
    load_inception,
    resolve_inception_weights,
)
from dpaf_ray.pictures import grid_size, save_curves, save_sample_grid
from dpaf_ray.evaluation.report import evaluate

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "diversity_ratio",
    "domain_fid",
    "downstream_accuracy",
    "evaluate",
    "feature_statistics",
    "frechet_distance",
    "grid_size",
    "inception_fid",
    "load_inception",
    "real_data_accuracy",
    "resolve_inception_weights",
    "save_curves",
    "save_sample_grid",
    "within_class_diversity",
]
