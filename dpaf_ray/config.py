"""Run configuration, validated once at the boundary.

Every knob of docs/design.md §4 lives here. `validate()` turns an impossible setting into a
`ConfigError` whose message says which option to change and how.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MODELS = ("dpaf", "dpsgd-gan")
GRAD_ENGINES = ("functorch", "opacus")
# The record embedding DPAGG sums (models.discriminator.RecordEmbedding): moments in training; linear is the
# one the conv2 release audit builds (audit.release_level).
EMBEDDINGS = ("linear", "moments")


# The configuration behind docs/results.md's Fashion-MNIST results (bench/results/k2_900: mean 71.0 % over 5
# seeds at ε = 10, 900 iterations, at noise split 2; split 1 and the DP label-classifier phase's knobs since
# bench/results/utility_13_seeds; the phase itself is on where its planned noise is small, see
# training.plan.choose_classifier_phase). TrainConfig's defaults, and so the CLI's, equal it, the knobs left to
# the plan (PLANNED_KNOBS) once resolved (tests/test_planner.py).
MEASURED_BEST: dict[str, Any] = {
    "batch_size": 256, "group_size": 128, "sgd_every": 2, "noise_split": 1.0, "lr_d": 2e-4, "lr_g": 1.5e-4,
    "embedding": "moments", "pixel_statistics": True,
    "feature_matching": 10.0, "pixel_matching": 10.0, "clip_agg": 1.0, "clip_sgd": 1.0,
    "classifier_noise": 2.0, "classifier_weight": 0.3,
}


# The knobs a default plan's classifier tier may set (training.plan.CLASSIFIER_TIERS). None in a TrainConfig
# means "the plan decides": a tier's value, else this one; an explicit value, even this one, is kept.
PLANNED_KNOBS: dict[str, float] = {
    "classifier_batch": 1024, "classifier_noise": 2.0, "classifier_weight": 0.3,
    "between_class_fraction": 0.5, "uncertain_fraction": 0.0,
}


# Options removed (docs/results.md, "Tried, not kept": measured and left off, or never run at another value),
# with the value every run had unless told otherwise: a checkpoint or trial plan written before their removal
# still resumes where it holds that value.
RETIRED: dict[str, Any] = {
    "lr_g_schedule": "constant", "g_steps": 1, "grouping": "class", "head_weight": 0.0,
    "classifier_lr_schedule": "constant", "classifier_margin": 0.0, "pixel_mix_fraction": 0.0,
    "boundary_fraction": 0.0, "teacher_features": False, "classifier_matching": 10.0, "generator_ema": 0.0,
    "generator_width": None, "upsample": "nearest",
    "adversarial_weight": 1.0, "pixel_moments": "mean,sq_mean,rff", "pixel_rff_features": 392, "smooth_output": True,
    "feature_ema": 0.99, "classifier_momentum": 0.9,
}


class ConfigError(ValueError):
    """An invalid option; the message names it and the fix."""


@dataclass
class TrainConfig:
    # data and budget
    dataset: str = "mnist-5k"
    data_root: str | None = None
    epsilon: float = 10.0
    delta: float = 1e-5
    validation_fraction: float = 0.1
    model: str = "dpaf"
    seed: int | None = None  # public randomness only (initialisation, generated codes); None: drawn at random
    reproducible_noise: bool = False  # tests/benchmarks: noise derived from the public seed; the run is NOT private
    num_classes: int | None = None  # public class count, for sources without metadata (Parquet)
    # docs/design.md §4 knobs
    batch_size: int = 256  # B = qN, expected real records per iteration
    group_size: int = 128  # b
    sgd_every: int = 2  # k: conv2's DP-SGD release every k-th iteration
    # noise: by default the planner sets both multipliers from (ε, δ) and T, in the ratio noise_split;
    # an explicit --sigma-agg and/or --sigma-sgd keeps the noise fixed and derives T from the budget instead
    sigma_agg: float | None = None
    sigma_sgd: float | None = None
    noise_split: float = 1.0  # σ_agg/σ_sgd when the planner sets the noise (and when only one σ is given)
    clip_agg: float = 1.0  # C_agg
    clip_sgd: float = 1.0  # C_sgd
    kappa: float = 1.0  # κ: weight of the one-hot label block in DPAGG's record vector, Δ = √(C_agg² + κ²)
    lr_d: float = 2e-4
    lr_g: float = 1.5e-4
    d_steps_per_g: int = 1  # iterations per generator step
    # docs/design.md §3a candidates
    embedding: str = "moments"  # EMBEDDINGS
    feature_matching: float = 10.0  # G matches released class means of the conv2 block (post-processing)
    pixel_matching: float = 10.0  # ... and of the public pixel-statistics block (with pixel_statistics)
    feature_channels: int = 16  # channels of the conv2 features DPAGG releases
    # public statistics of each record's pixels (models.discriminator.PIXEL_MOMENTS) as a second DPAGG block
    pixel_statistics: bool = True
    # issue #13: a DP label classifier (phase one, its own Poisson samples) that teaches G (phase two)
    # P: DP-SGD steps of the label classifier before the DPAF iterations. 0: off; None (the default):
    # with the default plan, a phase of training.plan.CLASSIFIER_TIERS where its planned noise is
    # in the range measured to help, else off (training.plan.choose_classifier_phase)
    classifier_steps: int | None = None
    # None in a knob of PLANNED_KNOBS: the plan decides (its tier's value, else PLANNED_KNOBS')
    classifier_batch: int | None = None  # B_c = q_c·N, its expected batch (1024)
    classifier_clip: float = 0.1  # C_c
    classifier_noise: float | None = None  # σ_c/σ_sgd (2): the planner scales σ_c with the other multipliers
    classifier_lr: float = 4.0  # SGD on the noisy mean gradient
    # weight of cross-entropy(classifier(G(z, y)), y) in G's loss (0.3; 0: the classifier only labels)
    classifier_weight: float | None = None
    # The release after a classifier phase (post-processing of G and the classifier, no cost): the classifier
    # labels the synthetic set, and this fraction of it (0.5; the default phase's tier may set another) is
    # drawn between two classes' label codes. --no-classifier-labels: G's asked labels.
    classifier_labels: bool = True
    between_class_fraction: float | None = None
    # and this fraction of it is the classifier's least certain images of a 3× larger pool, even per label;
    # off (0) unless the default phase's tier sets it
    uncertain_fraction: float | None = None
    z_dim: int = 64
    # execution
    iterations: int | None = None  # T; None: from --epochs, --time-budget-minutes, or the resolution's default
    epochs: float | None = None  # T = epochs / q
    max_iterations: int | None = None  # cap on T; with explicit σs a capped run gets less noise to spend the budget
    time_budget_minutes: float | None = None  # plans T from a speed probe on generated data; also a stop guard
    grad_engine: str = "functorch"  # GRAD_ENGINES: per-record gradients (opacus: the independent cross-check)
    # iterations per write-ahead window (each charged on disk before it runs, then checkpointed); None: short
    # windows, 1, 2, 4, ... up to WINDOW_SHARE of T (training.loop.window_end), so an interruption holds little
    checkpoint_every: int | None = None
    log_every: int = 50
    num_threads: int | None = None
    extra_fixed_releases: list[dict[str, Any]] = field(default_factory=list)

    def validate(self, n_records: int | None = None) -> "TrainConfig":
        def bad(opt: str, msg: str) -> None:
            raise ConfigError(f"--{opt.replace('_', '-')}: {msg}")

        if self.reproducible_noise and self.seed is None:
            bad("reproducible_noise", "needs --seed S (the noise is then derived from S, and the run is not private)")
        if self.num_classes is not None and int(self.num_classes) < 2:
            bad("num_classes", f"must be an integer >= 2, got {self.num_classes}")
        if self.model not in MODELS:
            bad("model", f"must be one of {MODELS}, got {self.model!r}")
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            bad("epsilon", f"must be a finite number > 0, got {self.epsilon}; e.g. --epsilon 10")
        if not (0 < self.delta < 1):
            bad("delta", f"must lie strictly between 0 and 1, got {self.delta}; e.g. --delta 1e-5")
        if not (0 <= self.validation_fraction < 1):
            bad("validation_fraction", f"must lie in [0, 1), got {self.validation_fraction}")
        if self.checkpoint_every is not None and int(self.checkpoint_every) < 1:
            bad("checkpoint_every", f"must be an integer >= 1 (or unset for short windows), got {self.checkpoint_every}")
        for name in ("batch_size", "group_size", "sgd_every", "d_steps_per_g", "feature_channels", "z_dim",
                     "log_every"):
            if int(getattr(self, name)) < 1:
                bad(name, f"must be an integer >= 1, got {getattr(self, name)}")
        for name in ("clip_agg", "clip_sgd", "kappa", "lr_d", "lr_g", "noise_split"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, f"must be > 0, got {v}")
        for name in ("sigma_agg", "sigma_sgd"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                bad(name, f"must be > 0, got {v}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            bad("epochs", f"must be > 0, got {self.epochs}")
        if self.epochs is not None and self.iterations is not None:
            bad("epochs", "give --iterations or --epochs, not both")
        for name in ("feature_matching", "pixel_matching"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.classifier_steps is not None and int(self.classifier_steps) < 0:
            bad("classifier_steps", f"must be an integer >= 0 (0: no classifier phase), got {self.classifier_steps}")
        if self.classifier_steps and self.model != "dpaf":
            bad("classifier_steps", "the label-classifier phase belongs to --model dpaf; use 0 with dpsgd-gan")
        k = self.with_default_knobs()  # an unset knob stands for a value the plan may pick; all are valid
        if int(k.classifier_batch) < 1:
            bad("classifier_batch", f"must be an integer >= 1, got {k.classifier_batch}")
        for name in ("classifier_clip", "classifier_noise", "classifier_lr"):
            v = getattr(k, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, f"must be > 0, got {v}")
        if not (math.isfinite(k.classifier_weight) and k.classifier_weight >= 0):
            bad("classifier_weight", f"must be >= 0, got {k.classifier_weight}")
        if not (0 <= k.between_class_fraction <= 1):
            bad("between_class_fraction", f"must lie in [0, 1] (0: only images of one class), got "
                                          f"{k.between_class_fraction}")
        if not (0 <= k.uncertain_fraction <= 1):
            bad("uncertain_fraction", f"must lie in [0, 1] (0: off), got {k.uncertain_fraction}")
        if self.embedding not in EMBEDDINGS:
            bad("embedding", f"must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.grad_engine not in GRAD_ENGINES:
            bad("grad_engine", f"must be one of {GRAD_ENGINES}, got {self.grad_engine!r}")
        if self.iterations is not None and self.iterations < 1:
            bad("iterations", f"must be >= 1, got {self.iterations}")
        if self.max_iterations is not None and self.max_iterations < 1:
            bad("max_iterations", f"must be >= 1, got {self.max_iterations}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            bad("time_budget_minutes", f"must be > 0, got {self.time_budget_minutes}")
        if self.group_size > self.batch_size:
            bad("group_size", f"b = {self.group_size} is larger than the batch B = {self.batch_size}; use b <= B")
        if n_records is not None and self.batch_size > n_records:
            bad("batch_size", f"B = {self.batch_size} exceeds the {n_records} training records (q = B/N > 1); "
                "lower --batch-size")
        if n_records is not None and self.classifier_steps and k.classifier_batch > n_records:
            bad("classifier_batch", f"B_c = {k.classifier_batch} exceeds the {n_records} training records "
                "(q_c = B_c/N > 1); lower --classifier-batch")
        return self

    @property
    def explicit_noise(self) -> bool:
        """True when the user fixed the noise (then T comes from the budget)."""
        return self.sigma_sgd is not None or (self.model == "dpaf" and self.sigma_agg is not None)

    def base_sigmas(self) -> tuple[float, float]:
        """(σ_agg, σ_sgd): as given (one given σ sets the other through noise_split), or in the
        ratio noise_split at σ_sgd = 1 for the planner to scale."""
        if self.sigma_agg is not None and self.sigma_sgd is not None:
            return self.sigma_agg, self.sigma_sgd
        if self.sigma_sgd is not None:
            return self.noise_split * self.sigma_sgd, self.sigma_sgd
        if self.sigma_agg is not None and self.model == "dpaf":
            return self.sigma_agg, self.sigma_agg / self.noise_split
        return self.noise_split, 1.0

    def with_default_knobs(self) -> "TrainConfig":
        """This configuration with every unset knob of PLANNED_KNOBS at its value there: what a plan that
        sets none of them runs (an explicit classifier phase, a bare config in tests and probes); itself
        when none is unset."""
        unset = {k: v for k, v in PLANNED_KNOBS.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **unset) if unset else self

    @property
    def prefix_iterations(self) -> int:
        """Iterations before the GAN iterations: the label-classifier phase (DPAF only)."""
        return int(self.classifier_steps or 0) if self.model == "dpaf" else 0  # None (auto, unplanned): 0

    def sampling_rate(self, n_records: int) -> float:
        return self.batch_size / n_records

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        changed = sorted(k for k in set(d) & set(RETIRED) if d[k] != RETIRED[k])
        if changed:
            raise ConfigError(f"option(s) {changed} were removed (docs/results.md, \"Tried, not kept\") and this "
                              "configuration sets them; only the version that wrote it can run it")
        d = {k: v for k, v in d.items() if k not in RETIRED}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**d)
