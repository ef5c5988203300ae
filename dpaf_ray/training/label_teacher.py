"""The label-classifier phase of a DPAF run (issue #13): a DP classifier that teaches G.

    phase one, iterations 0 … P−1 (P = --classifier-steps):
        own Poisson sample S_c at q_c = B_c/N (stream "poisson/classifier", never DPAGG's)
        per-record ∇ of cross-entropy(classifier(x_i), y_i), clipped to C_c, summed over S_c,
        + N(0, σ_c² C_c² I) (stream "noise/dpsgd/classifier"), ÷ B_c (expected, never realised)
        → SGD with momentum                                               (DP-SGD release)
    phase two, iterations P …: the DPAF iterations; the classifier is frozen and G also
        minimises cross-entropy(classifier(G(z, y)), y)                   (post-processing: no cost)

Each step of phase one is one Poisson-sampled Gaussian release of sensitivity C_c, charged
as (q_c, σ_c) by the schedule's prefix (`privacy.calibration.Phase`) before it runs; σ_c =
classifier_noise · σ_sgd, so the planner scales it with the other noise multipliers. Only real
records enter the clipped sum; generated images never reach the classifier's update.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models.label_classifier import LabelClassifier
from ..privacy.grad_sample import PerRecordGradients
from ..privacy.mechanisms import clip_and_sum_per_record, gaussian_release

POISSON_STREAM = "poisson/classifier"
NOISE_RELEASE = "dpsgd/classifier"
# SGD momentum of the classifier on its noisy mean gradients (post-processing of the releases); the value
# every measured run used (docs/results.md, "Tried, not kept").
CLASSIFIER_MOMENTUM = 0.9


def record_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each record's own cross-entropy: the loss whose per-record gradient phase one clips (bench scripts reuse it)."""
    return F.cross_entropy(logits, y, reduction="none")


class LabelTeacher:
    def __init__(self, trainer, sampling_rate: float) -> None:
        cfg = trainer.cfg
        self.trainer, self.cfg, self.q = trainer, cfg, sampling_rate
        self.model = LabelClassifier(trainer.arch, trainer.num_classes).to(trainer.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.classifier_lr, momentum=CLASSIFIER_MOMENTUM)
        self.per_record = PerRecordGradients(self.model, cfg.grad_engine)
        self.sigma = cfg.classifier_noise * trainer.sigma_sgd  # σ_c, as `training.plan.schedule_for` charges it

    def private_step(self, t: int) -> dict[str, float]:
        """One DP-SGD release of the classifier on its own Poisson sample (phase one)."""
        cfg, tr = self.cfg, self.trainer
        real = tr.real_sample(t, stream=POISSON_STREAM, q=self.q)
        per_record = self.per_record((real.x,), record_loss, (real.y,))
        clipped = clip_and_sum_per_record(per_record, cfg.classifier_clip)
        noisy = gaussian_release(clipped, self.sigma * cfg.classifier_clip, tr.noise_stream(t, NOISE_RELEASE),
                                 tr.collective)
        B = cfg.classifier_batch  # the expected batch q_c·N, never the realised size
        for p, g in zip(self.per_record.params, noisy):
            p.grad = g / B
        self.opt.step()
        return {}

    def generator_loss(self, xf: torch.Tensor, yf: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean cross-entropy of the frozen classifier on G's images."""
        self.model.requires_grad_(False)  # phase two: frozen; G's gradient flows through it only
        logits = self.model(xf)
        return F.cross_entropy(logits, yf, reduction="none").sum() / self.trainer.fake_batch
