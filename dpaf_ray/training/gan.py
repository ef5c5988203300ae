"""What DPAF and the DP-SGD GAN baseline share: the generator, the public conv1, the
Poisson sample of the local shard, the generated batch and the conv1 features.

Sharding: rank r owns the records [offset, offset + n_local) of the training order and
the slice r of the generated batch. Each iteration's draws are made for all n_total
training records from a stream of the run secret keyed by the iteration, so the union of
the ranks' samples is one Poisson sample at rate q, identical for any number of workers
(docs/design.md §5).

Two kinds of randomness, never mixed (docs/design.md rule 13):
- private: Poisson samples, group draws and noise, from the run secret (`privacy.randomness`);
- public: initialisation and generated codes, from the public `--seed` (`training.rng`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..collectives import Collective, LocalCollective, all_reduce_many
from ..models.architecture import architecture_for
from ..models.discriminator import PublicFeatures
from ..models.generator import ConditionalGenerator
from ..devices import host_to_device
from ..privacy.randomness import KeyedStream, RunSecret
from .draw_ahead import DrawAhead, DrawPlan, HostSample, PrefetchedNoise, default_enabled
from .rng import public_stream


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    group_uniforms: torch.Tensor  # each record's own draw for its DPAGG group (rule 1)


def poisson_sample(secret: RunSecret, stream: str, t: int, n_total: int, q: float,
                   local: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration t's Poisson sample at rate q over all `n_total` training records, restricted to
    this rank's `local` slice: (the drawn records' indices within the slice, their own group
    draws as float32). Every rank draws for all records, so the shards' samples form one sample."""
    draws = secret.stream(stream, t)
    included = draws.bernoulli_tensor(n_total, q)[local]
    group_uniforms = draws.uniform_tensor(n_total)[local]
    idx = included.nonzero().squeeze(1)
    return idx, group_uniforms[idx].to(torch.float32)


class GANTrainerBase:
    def __init__(self, cfg: TrainConfig, shard: ImageDataset, n_total: int, offset: int = 0,
                 collective: Collective | None = None, device: str = "cpu", *,
                 secret: RunSecret | None = None, sampling_rate: float | None = None) -> None:
        """`n_total`: training records over all shards; `sampling_rate`: the public q of the
        plan (default B/n_total); `secret`: the run secret (default: a fresh one)."""
        # A plan's config holds every knob; a bare one (tests, probes) runs unset knobs at PLANNED_KNOBS'
        # values, as `plan.schedule_for` charges them.
        self.cfg, self.shard, self.n_total, self.offset = cfg.with_default_knobs(), shard, n_total, offset
        self.collective = collective or LocalCollective()
        self.device = torch.device(device)
        self.num_classes = shard.num_classes
        self.secret = secret if secret is not None else RunSecret.fresh()
        self.q = sampling_rate if sampling_rate is not None else cfg.sampling_rate(n_total)
        # The planned noise multipliers (a plan's config always has them; a bare config, in tests
        # and probes, gets the base ratio). The ledger is charged from the plan, never from here.
        self.sigma_agg, self.sigma_sgd = cfg.base_sigmas()
        self.fake_batch = cfg.batch_size  # public size of the generated batch
        self.prefix_iterations = 0  # iterations of a phase before the GAN iterations (DPAF's classifier phase)
        self.arch = architecture_for(shard.shape)
        torch.manual_seed(cfg.seed)  # public: model initialisation only; identical on every rank
        self.generator = ConditionalGenerator(self.arch, self.num_classes, cfg.z_dim,
                                              smooth_output=True,  # measured better (docs/results.md)
                                              class_names=shard.class_names).to(self.device)
        self.conv1 = PublicFeatures(self.arch, public_seed=0).to(self.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
        w, r = self.collective.world_size, self.collective.rank
        self.fake_slice = slice(r * self.fake_batch // w, (r + 1) * self.fake_batch // w)
        # The next iteration's host-side draws, made while the device runs this one (on CUDA).
        self.draw_ahead = DrawAhead(self, default_enabled(self.device))

    # --- per-iteration data -------------------------------------------------------
    def real_sample(self, t: int, stream: str = "poisson", q: float | None = None) -> Batch:
        """This rank's part of the Poisson sample of iteration t, with each record's own group draw.

        A release on its own sample (the label-classifier phase) names its own `stream` and rate `q`."""
        ahead = self.draw_ahead.draws(t)
        host = ahead.sample if ahead is not None and ahead.sample_key == (stream, q) else None
        if ahead is not None:
            if host is not None:
                ahead.sample = None
            self.draw_ahead.count(host is not None)
        return Batch(*(host or self.host_sample(t, stream, q)).to(self.device))

    def host_sample(self, t: int, stream: str = "poisson", q: float | None = None) -> HostSample:
        """The draws and records of `real_sample` on the host (pinned when bound for CUDA)."""
        idx, gu = poisson_sample(self.secret, stream, t, self.n_total, self.q if q is None else q,
                                 slice(self.offset, self.offset + len(self.shard)))
        cuda = self.device.type == "cuda"
        images, labels = self.shard.images[idx], self.shard.labels[idx]
        if cuda:
            images, labels, gu = images.pin_memory(), labels.pin_memory(), gu.pin_memory()
        return HostSample(images, labels, gu)

    def fake_codes(self, t: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, uniform labels and group draws of this rank's slice of the generated batch (public)."""
        ahead = self.draw_ahead.draws(t)
        codes = ahead.codes.pop(name, None) if ahead is not None else None
        if ahead is not None:
            self.draw_ahead.count(codes is not None)
        codes = codes if codes is not None else self.host_codes(t, name)
        z, y, gu = (host_to_device(c, self.device) for c in codes)
        return z, y, gu

    def host_codes(self, t: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = public_stream(self.cfg.seed, name, t)
        z = torch.randn(self.fake_batch, self.cfg.z_dim, generator=g)[self.fake_slice]
        y = torch.randint(self.num_classes, (self.fake_batch,), generator=g)[self.fake_slice]
        gu = torch.rand(self.fake_batch, generator=g)[self.fake_slice]
        return z, y, gu

    def noise_stream(self, t: int, release: str) -> KeyedStream:
        """The private noise of one release of iteration t (drawn ahead by rank 0 where draw-ahead is on)."""
        stream = self.noise_stream_raw(t, release)
        if not self.draw_ahead.enabled:
            return stream
        return PrefetchedNoise(stream, release, self.draw_ahead.draws(t), self.draw_ahead)  # type: ignore[return-value]

    def noise_stream_raw(self, t: int, release: str) -> KeyedStream:
        return self.secret.stream("noise/" + release, t)

    def draw_plan(self, t: int) -> DrawPlan:
        """What iteration t will draw (`DrawAhead` makes it ahead); subclasses name their releases."""
        return DrawPlan()

    def g_step_after(self, t: int) -> bool:
        """Whether `train_loop` runs a generator step after the D iteration t (public schedule)."""
        return (t + 1) % self.cfg.d_steps_per_g == 0

    # --- replicated updates ---------------------------------------------------------
    def step_replicated(self, module: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Sum the local gradients of a replicated module over ranks, then step."""
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, all_reduce_many(self.collective, grads)):
            p.grad = g
        opt.step()

    def released_generator(self) -> ConditionalGenerator:
        """What the release holds: G."""
        return self.generator

    def step_from_rank0(self, module: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Step a replicated module that every rank computes whole (the rear: a function of
        released values only) with rank 0's gradient, so that non-deterministic kernels (cuDNN
        backward passes) cannot make the copies drift apart. The other ranks add zeros, so the
        sum is rank 0's gradient exactly and W = 1 equals W = 2 bit for bit."""
        if self.collective.world_size > 1:
            params = [p for p in module.parameters() if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if self.collective.rank != 0:
                grads = [torch.zeros_like(g) for g in grads]
            for p, g in zip(params, all_reduce_many(self.collective, grads)):
                p.grad = g
        opt.step()

    def sample_images(self, labels: torch.Tensor, seed: int = 12345, batch: int = 500) -> torch.Tensor:
        """Generated images for `labels` (post-processing: no privacy cost)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        self.generator.eval()
        with torch.no_grad():
            for i in range(0, len(labels), batch):
                y = labels[i:i + batch].to(self.device)
                z = torch.randn(len(y), self.cfg.z_dim, generator=g).to(self.device)
                out.append(self.generator(z, y).cpu())
        self.generator.train()
        return torch.cat(out) if out else torch.zeros(0, *self.shard.shape)

    # --- checkpoint state -------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g}

    def state_dict(self) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
