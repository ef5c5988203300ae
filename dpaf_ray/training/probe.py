"""How long one iteration takes here, measured on generated data (no private record is read,
so the probe costs no privacy). The planner turns a time budget into T with it."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..privacy.randomness import RunSecret
from .loop import make_trainer

PROBE_WARMUP, PROBE_ITERATIONS = 2, 6


def seconds_per_iteration(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int, n_train: float,
                          device: str = "cpu", iterations: int = PROBE_ITERATIONS) -> float:
    """Mean wall time of a full iteration (D step, and G steps when due) at the planned batch size,
    over a whole k-cycle so that iterations with and without the DP-SGD release both count."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    n = max(cfg.batch_size * 4, min(int(n_train), 20_000))  # the Poisson draw covers N records: keep N similar
    g = torch.Generator().manual_seed(0)
    fake = ImageDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                        torch.randint(0, num_classes, (n,), generator=g), num_classes, "probe (generated)")
    base = cfg.base_sigmas()
    probe_cfg = dataclasses.replace(cfg, sigma_agg=base[0], sigma_sgd=base[1], seed=cfg.seed or 0)
    trainer = make_trainer(probe_cfg, fake, n, 0, None, device, RunSecret.fresh(), cfg.batch_size / n_train)
    steps = max(iterations, 2 * cfg.sgd_every, cfg.d_steps_per_g)

    def one(t: int) -> None:
        trainer.d_iteration(t)
        if (t + 1) % cfg.d_steps_per_g == 0:
            trainer.g_step(t)

    for t in range(PROBE_WARMUP):
        one(t)
    _sync(device)
    t0 = time.perf_counter()
    for t in range(PROBE_WARMUP, PROBE_WARMUP + steps):
        one(t)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


__all__ = ["seconds_per_iteration"]
