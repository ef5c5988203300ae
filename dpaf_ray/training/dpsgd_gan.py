"""The DP-SGD GAN baseline: the same G and the same D without DPAGG; every D layer
after the public conv1 is trained by DP-SGD on per-record losses of real records.
Generated records are never noised: their ordinary gradient is added with a public
normaliser."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..collectives import all_reduce_many
from ..models.discriminator import BaselineDiscriminator
from ..privacy.grad_sample import PerRecordGradients
from ..privacy.mechanisms import clip_and_sum_per_record, gaussian_release
from .draw_ahead import DrawPlan
from .gan import GANTrainerBase


class DPSGDGANTrainer(GANTrainerBase):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.disc = BaselineDiscriminator(self.arch, self.conv1.out_channels, self.num_classes,
                                          cfg.feature_channels).to(self.device)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
        self.per_record = PerRecordGradients(self.disc, cfg.grad_engine)

    def d_iteration(self, t: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        real = self.real_sample(t)
        z, yf, _ = self.fake_codes(t, "fake/d")
        with torch.no_grad():
            h1r, h1f = self.conv1(real.x), self.conv1(self.generator(z, yf))

        per_record = self.per_record((h1r, real.y), lambda logit: F.softplus(-logit))
        clipped = clip_and_sum_per_record(per_record, cfg.clip_sgd)
        noisy = gaussian_release(clipped, self.sigma_sgd * cfg.clip_sgd,
                                 self.noise_stream(t, "dpsgd/d"), self.collective)

        params = self.per_record.params
        loss_fake = F.softplus(self.disc(h1f, yf)).sum()
        fake_grads = all_reduce_many(self.collective, list(torch.autograd.grad(loss_fake, params)))
        for p, gn, gf in zip(params, noisy, fake_grads):
            p.grad = gn / cfg.batch_size + gf / self.fake_batch
        self.opt_d.step()
        return {"loss_d_fake": loss_fake.detach() / max(1, len(yf))}  # tensors until a log line

    def draw_plan(self, t: int) -> DrawPlan:
        return DrawPlan(sample=True, codes=["fake/d"] + (["fake/g"] if self.g_step_after(t) else []), noise=["dpsgd/d"])

    def g_step(self, t: int) -> dict[str, torch.Tensor]:
        z, yf, _ = self.fake_codes(t, "fake/g")
        logit = self.disc(self.conv1(self.generator(z, yf)), yf)
        loss = F.softplus(-logit).sum() / self.fake_batch
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.step_replicated(self.generator, self.opt_g)
        return {"loss_g": loss.detach() * self.collective.world_size}

    def modules(self):
        return {**super().modules(), "disc": self.disc}

    def optimizers(self):
        return {**super().optimizers(), "disc": self.opt_d}
