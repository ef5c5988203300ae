"""The training loop: charge, iterate, log, checkpoint. Same code in-process and on Ray Train workers.

Ledger charging (DESIGN §5, rule 11): at each checkpoint boundary the ledger is charged
for the whole coming window of iterations *before* any of them runs, and saved with the
checkpoint. A worker that dies inside the window restarts from the checkpoint, whose
ledger already covers the lost window, and charges the re-executed iterations again: the
ledger may over-count, never under-count. A time budget stops only at a boundary, so a
run that stops early has charged exactly what it executed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..distributed.collectives import Collective, LocalCollective, all_reduce_many
from ..privacy.ledger import PrivacyLedger
from .checkpoint import CheckpointSink, cpu_state
from .dpaf import DPAFTrainer
from .dpsgd_gan import DPSGDGANTrainer
from .gan import GANTrainerBase
from .plan import TrainingPlan

Progress = Callable[[str], None]


@dataclass
class TrainResult:
    trainer: GANTrainerBase
    ledger: PrivacyLedger
    plan: TrainingPlan
    iterations_done: int
    stopped_early: bool
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def make_trainer(cfg: TrainConfig, shard: ImageDataset, n_total: int, offset: int,
                 collective: Collective, device: str) -> GANTrainerBase:
    cls = DPAFTrainer if cfg.model == "dpaf" else DPSGDGANTrainer
    return cls(cfg, shard, n_total, offset, collective, device)


def train_loop(plan: TrainingPlan, shard: ImageDataset, n_total: int, offset: int = 0,
               collective: Collective | None = None, sink: CheckpointSink | None = None,
               progress: Progress | None = print, device: str = "cpu",
               before_iteration: Callable[[int], None] | None = None) -> TrainResult:
    cfg, T = plan.config, plan.iterations
    collective = collective or LocalCollective()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    trainer = make_trainer(cfg, shard, n_total, offset, collective, device)
    ledger = PrivacyLedger()
    history: dict[str, list[float]] = {"iteration": [], "epsilon": [], "loss_d": [], "loss_g": []}
    start, charged_through = 0, 0
    state = sink.latest() if sink else None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        ledger = PrivacyLedger.from_json(state["ledger"])
        history = state["history"]
        start = state["iteration"]
        charged_through = start  # re-executed iterations are charged again
        if progress:
            progress(f"resumed at iteration {start}/{T} with ε={ledger.epsilon(cfg.delta):.3f} already charged")

    window = max(1, cfg.checkpoint_every)
    t0 = time.time()
    last_log_t, last_log_time = start, t0
    stopped_early = False
    stats: dict[str, float] = {}
    t = start
    while t < T:
        if t % window == 0 or t == start:
            if _out_of_time(cfg, t0, t - start, window, collective):
                stopped_early = True  # nothing of the next window is charged or run
                break
            end = min(T, (t // window + 1) * window)
            for i in range(max(t, charged_through), end):  # charge before anything is released
                ledger.charge_poisson_gaussian(plan.schedule.sampling_rate, plan.schedule.noise_at(i))
            charged_through = max(charged_through, end)
            if t != start and sink is not None:  # the saved ledger already covers this window
                save(sink, trainer, ledger, history, t, cfg.delta)
        if before_iteration is not None:
            before_iteration(t)
        trainer.set_generator_lr(t, T)
        stats.update(trainer.d_iteration(t))
        if (t + 1) % cfg.d_steps_per_g == 0:
            for step in range(cfg.g_steps):
                stats.update(trainer.g_step(t, step))
        t += 1
        if t % cfg.log_every == 0 or t == T:
            eps = ledger.epsilon(cfg.delta)
            now = time.time()
            rate = (t - last_log_t) / max(1e-9, now - last_log_time)
            last_log_t, last_log_time = t, now
            history["iteration"].append(t)
            history["epsilon"].append(eps)
            history["loss_d"].append(stats.get("loss_d", stats.get("loss_d_fake", float("nan"))))
            history["loss_g"].append(stats.get("loss_g", float("nan")))
            if progress and collective.rank == 0:
                left = (T - t) / max(rate, 1e-9)
                progress(f"iter {t}/{T} | ε spent {eps:.3f}/{cfg.epsilon:g} (δ={cfg.delta:g}) | "
                         f"loss_d {history['loss_d'][-1]:.3f} loss_g {history['loss_g'][-1]:.3f} | "
                         f"{rate:.1f} it/s | {_fmt(left)} left")
            if sink is not None and _report_now(t, cfg):
                sink.report({"iteration": t, "epsilon": eps, "loss_d": history["loss_d"][-1],
                             "loss_g": history["loss_g"][-1]})
    if sink is not None:
        save(sink, trainer, ledger, history, t, cfg.delta)
    return TrainResult(trainer, ledger, plan, t, stopped_early, time.time() - t0, history)


def _report_now(t: int, cfg: TrainConfig) -> bool:
    # ray.train.report waits for a controller poll (~2 s): report only every 10th log line.
    return t % (cfg.log_every * 10) == 0


def save(sink: CheckpointSink, trainer: GANTrainerBase, ledger: PrivacyLedger, history: dict, t: int,
         delta: float) -> None:
    state = {"trainer": cpu_state(trainer.state_dict()), "ledger": ledger.to_json(), "history": history,
             "iteration": t}
    sink.save(state, {"iteration": t, "epsilon": ledger.epsilon(delta)})


def _out_of_time(cfg: TrainConfig, t0: float, done: int, window: int, collective: Collective) -> bool:
    """Stop at a boundary if the next window would overrun the time budget; all ranks agree."""
    if cfg.time_budget_minutes is None:
        return False
    elapsed = time.time() - t0
    per_iter = elapsed / done if done else 0.0
    stop = elapsed + per_iter * window > cfg.time_budget_minutes * 60
    flag = all_reduce_many(collective, [torch.tensor([1.0 if stop else 0.0])])[0]
    return bool(flag.item() > 0)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
