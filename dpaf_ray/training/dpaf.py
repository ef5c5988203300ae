"""One DPAF iteration, top to bottom (docs/design.md §2–§3).

    real Poisson sample S ──conv1 (public)──conv2──embed──bound──Σ per group──+noise──▶ A  (DPAGG release)
    generated batch       ──conv1──────────conv2──embed──bound──Σ per group──+noise──▶ A' (same noise, rule 5)
    rear(A, A') → loss → rear update                               (post-processing)
    every k-th iteration: per-record ∇conv2 of <stopgrad(b·∂L/∂A_g(i)), v_i>,
        clipped to C_sgd, summed, +N(0, σ_sgd²C_sgd²), ÷ B                  (DP-SGD release)
        + the ordinary gradient of the generated records ÷ B              (rule 7)
    every d_steps_per_g iterations: a generator step through D on generated images only.

The ledger is charged by the caller before the iteration runs, so a crash can only
over-count.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models import dpagg
from ..models.discriminator import (PIXEL_MOMENTS, PrivateFeatures, Rear, RecordEmbedding, pixel_statistics,
                                    pixel_statistics_dim)
from ..models.generator import RELEASE_KNOBS
from ..privacy.grad_sample import PerRecordGradients
from ..privacy.mechanisms import clip_and_sum_per_record, gaussian_release
from ..privacy.randomness import KeyedStream
from ..collectives import all_reduce_many
from .draw_ahead import DrawPlan
from .gan import GANTrainerBase
from . import label_teacher
from .label_teacher import LabelTeacher

# Decay of the running average of released conv2 class means that G matches (post-processing); the value
# every measured run used (docs/results.md, "Tried, not kept").
FEATURE_EMA = 0.99


class DPAFTrainer(GANTrainerBase):
    def __init__(self, *args, classifier_sampling_rate: float | None = None, **kwargs) -> None:
        """`classifier_sampling_rate`: the public q_c of the plan's classifier phase (default B_c·q/B)."""
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.private = PrivateFeatures(self.arch, self.conv1.out_channels, self.num_classes,
                                       cfg.feature_channels).to(self.device)
        pixel_dim = (pixel_statistics_dim(PIXEL_MOMENTS, self.arch.channels, self.arch.pixel_pooled)
                     if cfg.pixel_statistics else 0)
        self.embed = RecordEmbedding(cfg.embedding, cfg.feature_channels, self.arch.pooled,
                                     pixel_dim=pixel_dim).to(self.device)
        K = self.num_classes
        per_class = max(1, round(cfg.batch_size / (cfg.group_size * K)))
        self.spec = dpagg.DPAggSpec(
            num_classes=K, embedding_dim=self.embed.dim, clip_norm=cfg.clip_agg, kappa=cfg.kappa,
            sigma=self.sigma_agg, groups_per_class=per_class, expected_group_size=cfg.batch_size / (K * per_class),
        )
        self.rear = Rear(self.embed.out_shape, K, pixel_dim=pixel_dim).to(self.device)
        self.opt_rear = torch.optim.Adam(self.rear.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
        self.opt_private = torch.optim.Adam(self.private.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
        self.per_record = PerRecordGradients(self.private, cfg.grad_engine)
        # EMA of released real class means: feature-matching target for G (post-processing).
        self.real_class_means = torch.zeros(K, self.embed.dim, device=self.device)
        # Per-coordinate weights of the feature-matching loss: conv2 block, then pixel block.
        self.matching_weights = torch.full((self.embed.dim,), cfg.feature_matching, device=self.device)
        if pixel_dim:
            self.matching_weights[self.embed.dim - pixel_dim:] = cfg.pixel_matching
        self.target_updates = 0  # releases averaged into the target so far (0: no target yet)
        # Issue #13: a DP label classifier trained first (iterations 0 … P−1), then G's teacher.
        self.teacher: LabelTeacher | None = None
        self.prefix_iterations = cfg.prefix_iterations
        if self.prefix_iterations:
            q_c = classifier_sampling_rate if classifier_sampling_rate is not None else \
                self.q * cfg.classifier_batch / cfg.batch_size
            self.teacher = LabelTeacher(self, q_c)

    def released_generator(self):
        """G; after a label-classifier phase, a copy that carries the frozen DP classifier
        to label the synthetic set (`ConditionalGenerator.with_labeller`)."""
        generator = super().released_generator()
        if self.teacher is None or not self.cfg.classifier_labels:
            return generator
        return generator.with_labeller(self.teacher.model, **{k: getattr(self.cfg, k) for k in RELEASE_KNOBS})

    # ------------------------------------------------------------------------------
    def pixels(self, x: torch.Tensor) -> torch.Tensor | None:
        """The block of fixed per-record maps: the public pixel statistics."""
        if not self.cfg.pixel_statistics:
            return None
        return pixel_statistics(x, self.arch.pixel_pooled, PIXEL_MOMENTS)

    def bounded(self, h1: torch.Tensor, y: torch.Tensor, pix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        phi, logit = self.private(h1, y)
        return dpagg.bound_records(self.embed(phi, pix), y, self.spec), logit

    def released(self, v: torch.Tensor, y: torch.Tensor, gu: torch.Tensor, noise: KeyedStream) -> torch.Tensor:
        groups = dpagg.assign_groups(y, gu, self.spec)
        local = dpagg.group_sums(v, groups, self.spec.num_groups)
        return dpagg.release(local, self.spec, noise, self.collective)

    def rear_scores(self, A: torch.Tensor) -> torch.Tensor:
        means, weights = dpagg.normalise(A, self.spec)
        return self.rear(means, weights)

    def d_iteration(self, t: int) -> dict[str, torch.Tensor]:
        cfg, spec = self.cfg, self.spec
        if t < self.prefix_iterations:  # phase one: the label classifier's DP-SGD release only
            return self.teacher.private_step(t)
        real = self.real_sample(t)
        z, yf, guf = self.fake_codes(t, "fake/d")
        with torch.no_grad():
            xf = self.generator(z, yf)
            h1r, h1f = self.conv1(real.x), self.conv1(xf)
            pr, pf = self.pixels(real.x), self.pixels(xf)
            vr, _ = self.bounded(h1r, real.y, pr)
            vf, _ = self.bounded(h1f, yf, pf)
            A_real = self.released(vr, real.y, real.group_uniforms, self.noise_stream(t, "dpagg/real"))
            A_fake = self.released(vf, yf, guf, self.noise_stream(t, "dpagg/fake"))

        # Rear update: a function of the releases only (rule 4).
        A_real.requires_grad_(True)
        A_fake.requires_grad_(True)
        loss_d = F.softplus(-self.rear_scores(A_real)).mean() + F.softplus(self.rear_scores(A_fake)).mean()
        self.opt_rear.zero_grad(set_to_none=True)
        loss_d.backward()
        self.step_from_rank0(self.rear, self.opt_rear)  # one gradient for every copy of the rear
        self.update_feature_target(A_real.detach())

        stats = {"loss_d": loss_d.detach()}  # a tensor: read back only when a log line needs it
        if (t - self.prefix_iterations) % cfg.sgd_every == 0:  # as the schedule's cycle charges it
            scale = spec.expected_group_size  # public: makes C_sgd ≈ 1 meaningful (rule 6)
            g_real = (scale * A_real.grad).detach()
            g_fake = (scale * A_fake.grad).detach()
            stats.update(self.private_update(t, real, (h1r, pr), g_real, (h1f, pf), yf, guf, g_fake))
        return stats

    def draw_plan(self, t: int) -> DrawPlan:
        """The sample, codes and releases of iteration t, in the order d_iteration and g_step use them."""
        if t < self.prefix_iterations:  # the label classifier's own sample and noise
            return DrawPlan(sample=True, sample_stream=label_teacher.POISSON_STREAM, sample_rate=self.teacher.q,
                            noise=[label_teacher.NOISE_RELEASE])
        g = self.g_step_after(t)
        noise = ["dpagg/real", "dpagg/fake"]
        if (t - self.prefix_iterations) % self.cfg.sgd_every == 0:
            noise.append("dpsgd/conv2")
        return DrawPlan(sample=True, codes=["fake/d"] + (["fake/g"] if g else []),
                        noise=noise + (["dpagg/g"] if g else []))

    def private_update(self, t, real, front_real, g_real, front_fake, yf, guf, g_fake) -> dict[str, float]:
        """The DP-SGD release of conv2 (rules 6–8)."""
        cfg, spec = self.cfg, self.spec
        (h1r, pr), (h1f, pf) = front_real, front_fake
        groups_r = dpagg.assign_groups(real.y, real.group_uniforms, spec)

        def real_record_loss(out, y, g_row, *pix):
            phi, _ = out
            v = dpagg.bound_records(self.embed(phi, pix[0] if pix else None), y, spec)
            return (g_row * v).sum(1)

        extras = (real.y, g_real[groups_r]) + ((pr,) if pr is not None else ())
        per_record = self.per_record((h1r, real.y), real_record_loss, extras)
        clipped = clip_and_sum_per_record(per_record, cfg.clip_sgd)
        noisy = gaussian_release(clipped, self.sigma_sgd * cfg.clip_sgd,
                                 self.noise_stream(t, "dpsgd/conv2"), self.collective)

        # Generated records: ordinary batch gradient, public normaliser (rule 7).
        params = self.per_record.params
        groups_f = dpagg.assign_groups(yf, guf, spec)
        vf, _ = self.bounded(h1f, yf, pf)
        fake_obj = (g_fake[groups_f] * vf).sum()
        fake_grads = torch.autograd.grad(fake_obj, params, allow_unused=True)
        fake_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(fake_grads, params)]
        fake_grads = all_reduce_many(self.collective, fake_grads)

        B = cfg.batch_size  # the expected batch qN, never the realised size
        for p, gn, gf in zip(params, noisy, fake_grads):
            p.grad = gn / B + gf / self.fake_batch
        self.opt_private.step()
        return {}

    def matches_features(self) -> bool:
        """Public and fixed once the trainer is built: read back from the device once, not per step."""
        cached = getattr(self, "_matches_features", None)
        if cached is None:
            cached = self._matches_features = bool((self.matching_weights > 0).any())
        return cached

    def update_feature_target(self, A_real: torch.Tensor) -> None:
        if not self.matches_features():
            return
        m, K = self.spec.embedding_dim, self.num_classes
        per_class = self.spec.groups_per_class
        feats = A_real[:, :m].view(K, per_class, m).sum(1)
        counts = (A_real[:, m:] / self.spec.kappa).view(K, per_class, K).sum(1).diagonal()
        means = feats / counts.clamp(min=max(1.0, 0.25 * self.spec.expected_group_size)).unsqueeze(1)
        self.target_updates += 1
        if self.target_updates == 1:
            self.real_class_means.copy_(means)
            return
        # conv2 drifts, so its block follows a running average; the public pixel block never
        # changes meaning, so its target is the plain mean of every release so far (less noise).
        decay = torch.full((m,), FEATURE_EMA, device=means.device)
        if self.embed.pixel_dim:
            decay[m - self.embed.pixel_dim:] = max(FEATURE_EMA, 1 - 1 / self.target_updates)
        self.real_class_means.mul_(decay).add_((1 - decay) * means)

    # ------------------------------------------------------------------------------
    def g_step(self, t: int) -> dict[str, torch.Tensor]:
        """Generator update through D on generated images only (no privacy cost)."""
        cfg, spec = self.cfg, self.spec
        if t < self.prefix_iterations:
            return {}  # G starts after the classifier phase
        z, yf, guf = self.fake_codes(t, "fake/g")
        xf = self.generator(z, yf)
        vf, _ = self.bounded(self.conv1(xf), yf, self.pixels(xf))
        groups = dpagg.assign_groups(yf, guf, spec)
        local = dpagg.group_sums(vf, groups, spec.num_groups)
        m, K = spec.embedding_dim, self.num_classes
        onehot = F.one_hot(yf, K).to(vf.dtype)
        local_class = onehot.t() @ vf[:, :m]  # (K, m) sums per class, for feature matching
        with torch.no_grad():
            A = dpagg.release(local.detach(), spec, self.noise_stream(t, "dpagg/g"), self.collective)
            class_sums = all_reduce_many(self.collective, [local_class.detach()])[0]
            class_counts = all_reduce_many(self.collective, [onehot.sum(0)])[0]
        A.requires_grad_(True)
        class_sums.requires_grad_(True)
        loss_rear = F.softplus(-self.rear_scores(A)).mean()
        loss = loss_rear
        fm = torch.zeros(())
        if self.matches_features() and self.target_updates > 0:
            fake_means = class_sums / class_counts.clamp(min=1).unsqueeze(1)
            fm = ((fake_means - self.real_class_means).pow(2) * self.matching_weights).sum(1).mean()
            loss = loss + fm
        grads = torch.autograd.grad(loss, [A, class_sums], allow_unused=True)
        gA = grads[0]
        gC = grads[1] if grads[1] is not None else torch.zeros_like(class_sums)
        # Local surrogate whose gradient, summed over ranks, is the gradient of the global loss.
        surrogate = (gA[groups] * vf).sum() + (gC * local_class).sum()
        stats = {}
        if self.teacher is not None and cfg.classifier_weight > 0:  # post-processing of the released classifier
            loss_cls = self.teacher.generator_loss(xf, yf)
            surrogate = surrogate + cfg.classifier_weight * loss_cls
            stats["loss_classifier"] = loss_cls.detach()
        self.opt_g.zero_grad(set_to_none=True)
        surrogate.backward()
        self.step_replicated(self.generator, self.opt_g)
        return {"loss_g": loss_rear.detach(), "feature_matching": fm.detach(), **stats}

    # ------------------------------------------------------------------------------
    def modules(self):
        teacher = {"classifier": self.teacher.model} if self.teacher is not None else {}
        return {**super().modules(), "private": self.private, "rear": self.rear, **teacher}

    def optimizers(self):
        teacher = {"classifier": self.teacher.opt} if self.teacher is not None else {}
        return {**super().optimizers(), "private": self.opt_private, "rear": self.opt_rear, **teacher}

    def extra_state(self) -> dict:
        return {"real_class_means": self.real_class_means.clone(), "target_updates": self.target_updates}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.real_class_means.copy_(state["real_class_means"])
            # checkpoints written before target_updates existed only say whether a target exists
            self.target_updates = int(state.get("target_updates", bool(state.get("ema_initialised"))))
