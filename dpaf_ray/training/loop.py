"""The training loop: charge, iterate, log, checkpoint. Same code in-process and on Ray Train workers.

Ledger charging (docs/design.md §5, rules 11 and 16): at each window boundary the ledger is charged
for the whole coming window of iterations and written to the write-ahead ledger file
(`OUT/ledger.json`) *before* any of them runs. A run that dies anywhere, before its first
checkpoint included, has therefore charged on disk every release it executed. A restarted
run continues the ledger it finds (re-executed iterations are charged again: the ledger
may over-count, never under-count). A time budget stops only at a boundary, so a run
that stops early has charged exactly what it executed.

Progress lines show both ε executed (iterations that ran) and ε charged (which already
covers the rest of the current window).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..collectives import Collective, LocalCollective, all_reduce_many
from ..privacy.calibration import IterationSchedule
from ..privacy.ledger import PrivacyLedger
from ..privacy.randomness import RunSecret
from .checkpoint import CheckpointSink, cpu_state
from .dpaf import DPAFTrainer
from .dpsgd_gan import DPSGDGANTrainer
from .gan import GANTrainerBase
from .plan import TrainingPlan

Progress = Callable[[str], None]
# The longest default write-ahead window, as a share of T: a run interrupted and never resumed holds
# at most this much of its plan charged beyond what ran (the 500-iteration default held all of T).
WINDOW_SHARE = 0.05


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C inside the loop: where it stopped, what was charged, and which checkpoint is kept."""

    def __init__(self, iteration: int, total: int, epsilon_charged: float, target: float,
                 checkpoint_iteration: int | None) -> None:
        super().__init__(iteration)
        self.iteration, self.total = iteration, total
        self.epsilon_charged, self.target = epsilon_charged, target
        self.checkpoint_iteration = checkpoint_iteration


@dataclass
class TrainResult:
    trainer: GANTrainerBase
    ledger: PrivacyLedger
    plan: TrainingPlan
    iterations_done: int
    stopped_early: bool
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def secret_for(cfg: TrainConfig) -> RunSecret:
    """A fresh run secret, or (`--reproducible-noise`, tests and benchmarks only) one derived from the public seed."""
    if cfg.reproducible_noise:
        if cfg.seed is None:
            raise ValueError("reproducible noise needs a public seed")
        return RunSecret.from_public_seed(cfg.seed)
    return RunSecret.fresh()


def make_trainer(cfg: TrainConfig, shard: ImageDataset, n_total: int, offset: int,
                 collective: Collective, device: str, secret: RunSecret | None = None,
                 sampling_rate: float | None = None, schedule: IterationSchedule | None = None) -> GANTrainerBase:
    """`schedule`: the plan's, whose prefix fixes the classifier phase's public q_c (as charged)."""
    if cfg.model != "dpaf":
        return DPSGDGANTrainer(cfg, shard, n_total, offset, collective, device, secret=secret,
                               sampling_rate=sampling_rate)
    q_c = schedule.prefix[0].sampling_rate if schedule is not None and schedule.prefix else None
    return DPAFTrainer(cfg, shard, n_total, offset, collective, device, secret=secret, sampling_rate=sampling_rate,
                       classifier_sampling_rate=q_c)


class WriteAheadLedger:
    """The ledger file of a run: every charge reaches disk before the releases it covers run."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def load(self) -> PrivacyLedger | None:
        if self.path is None or not self.path.exists():
            return None
        return PrivacyLedger.load(self.path)

    def commit(self, ledger: PrivacyLedger) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ledger.save(self.path)


def train_loop(plan: TrainingPlan, shard: ImageDataset, n_total: int, offset: int = 0,
               collective: Collective | None = None, sink: CheckpointSink | None = None,
               progress: Progress | None = print, device: str = "cpu",
               before_iteration: Callable[[int], None] | None = None, *,
               secret: RunSecret | None = None, journal: WriteAheadLedger | None = None,
               initial_ledger: PrivacyLedger | None = None, replay_charged: bool = False) -> TrainResult:
    """Train for `plan.iterations` iterations on this rank's `shard` of `n_total` training records.

    `secret` drives every private draw (default: `secret_for(plan.config)`); `journal` is the
    write-ahead ledger file (rank 0 writes it); `initial_ledger` is spend carried forward from
    an earlier attempt. A checkpoint found in `sink` is resumed, with its own secret.

    `replay_charged`: the caller restarts an attempt with every public input identical to the one
    that charged `journal` (the same plan, public seed, secret and data; a search's trial,
    `tuning.trial.run_trial`). Iteration t's draws are keyed by (secret, t) and (seed, t), and the
    model state comes from a checkpoint of the same run, so re-running an iteration the journal
    already charged adds the same noise to the same sums: it releases nothing new and is not
    charged again (docs/design.md rule 17). Without it, re-executed iterations are charged again.
    """
    cfg, T = plan.config, plan.iterations
    collective = collective or LocalCollective()
    journal = journal if (journal is not None and collective.rank == 0) else WriteAheadLedger(None)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    state = sink.latest() if sink else None
    if state is not None and "secret" in state:
        secret = RunSecret.from_checkpoint(state["secret"])  # the same noise streams as before the restart
    secret = secret if secret is not None else secret_for(cfg)
    trainer = make_trainer(cfg, shard, n_total, offset, collective, device, secret, plan.schedule.sampling_rate,
                           plan.schedule)
    # The ledger so far: the write-ahead file holds every charge of every attempt.
    ledger = journal.load() or (PrivacyLedger.from_json(state["ledger"]) if state is not None else None) \
        or PrivacyLedger(list(initial_ledger.entries) if initial_ledger else [])
    history: dict[str, list[float]] = {"iteration": [], "epsilon": [], "loss_d": [], "loss_g": []}
    start, charged_through = 0, 0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        history = state["history"]
        start = state["iteration"]
        charged_through = start  # re-executed iterations are charged again
        if progress:
            progress(f"resumed at iteration {start}/{T} with ε={ledger.epsilon(cfg.delta):.3f} already charged")
    if replay_charged and collective.rank == 0:  # identical replays of what the journal charged (see above)
        charged_through = max(charged_through, charged_iterations(ledger) - charged_iterations(initial_ledger))
    executed = PrivacyLedger(list(ledger.entries))  # what had run (or been charged) before this attempt
    if replay_charged:  # the journal also holds the charged window this attempt replays: count up to `start`
        executed = PrivacyLedger(list(initial_ledger.entries) if initial_ledger else [])
        for i in range(start):
            executed.charge_poisson_gaussian(*plan.schedule.release_at(i))

    t0 = time.time()
    last_log_t, last_log_time = start, t0
    stopped_early = False
    stats: dict[str, float | torch.Tensor] = {}  # losses stay on the device until a log line reads them
    t = end = start
    saved_at = start if state is not None else None
    try:
        while t < T:
            if t == start or t == end:
                end = window_end(t, T, cfg.checkpoint_every)
                if _out_of_time(cfg, t0, t - start, end - t, collective, trainer.device, plan.overhead_seconds or 0.0):
                    stopped_early = True  # nothing of the next window is charged or run
                    if progress and collective.rank == 0:
                        progress(f"STOPPED EARLY: {time_cap_note(t, T, cfg.time_budget_minutes)}; the ledger holds "
                                 f"ε={ledger.epsilon(cfg.delta):.3f} of {cfg.epsilon:g}, for what ran")
                    break
                for i in range(max(t, charged_through), end):  # charge before anything is released
                    ledger.charge_poisson_gaussian(*plan.schedule.release_at(i))
                charged_through = max(charged_through, end)
                journal.commit(ledger)  # on disk before the window's first release (rule 16)
                if t != start and sink is not None:  # the saved ledger already covers this window
                    save(sink, trainer, ledger, history, t, plan, secret)
                    saved_at = t
            if before_iteration is not None:
                before_iteration(t)
            stats.update(trainer.d_iteration(t))
            if (t + 1) % cfg.d_steps_per_g == 0:
                stats.update(trainer.g_step(t))
            executed.charge_poisson_gaussian(*plan.schedule.release_at(t))
            t += 1
            if t % cfg.log_every == 0 or t == T:
                eps = executed.epsilon(cfg.delta)
                now = time.time()
                rate = (t - last_log_t) / max(1e-9, now - last_log_time)
                last_log_t, last_log_time = t, now
                history["iteration"].append(t)
                history["epsilon"].append(eps)
                history["loss_d"].append(float(stats.get("loss_d", stats.get("loss_d_fake", float("nan")))))
                history["loss_g"].append(float(stats.get("loss_g", float("nan"))))
                if progress and collective.rank == 0:
                    left = (T - t) / max(rate, 1e-9)
                    charged = ledger.epsilon(cfg.delta)
                    progress(f"iter {t}/{T} | ε executed {eps:.3f}, charged {charged:.3f} of {cfg.epsilon:g} "
                             f"(δ={cfg.delta:g}) | {_losses(history, t <= trainer.prefix_iterations)} | "
                             f"{_speed(rate)} | {_fmt(left)} left")
                if sink is not None and _report_now(t, cfg):
                    sink.report({"iteration": t, "epsilon": eps, "loss_d": history["loss_d"][-1],
                                 "loss_g": history["loss_g"][-1]})
    except KeyboardInterrupt:
        raise TrainingInterrupted(t, T, ledger.epsilon(cfg.delta), cfg.epsilon, saved_at) from None
    trainer.draw_ahead.close()  # the draws made ahead for iteration T are never used
    if sink is not None:
        save(sink, trainer, ledger, history, t, plan, secret)
    return TrainResult(trainer, ledger, plan, t, stopped_early, time.time() - t0, history)


def charged_iterations(ledger: PrivacyLedger | None) -> int:
    """Iterations a ledger charges: one Poisson-sampled Gaussian per iteration (classifier phase included);
    a score or another fixed release is a plain Gaussian and does not count."""
    from ..privacy.ledger import PoissonGaussian

    return sum(e.count for e in ledger.entries if isinstance(e, PoissonGaussian)) if ledger is not None else 0


def window_end(t: int, T: int, every: int | None) -> int:
    """The end of the write-ahead window that starts at iteration t (docs/design.md rule 16).

    `every` given (--checkpoint-every): windows end at its multiples. Unset: the window is as
    long as the iterations before it, 1, 1, 2, 4, ..., up to WINDOW_SHARE of T; an interruption
    then holds at most the iterations that ran plus one window, and one at iteration 0 one
    iteration, where the RDP to (ε, δ) conversion grows fastest. Every window ends where the
    uninterrupted run's would, also after a resume, which starts at a window's end."""
    if every is not None:
        return min(T, (t // every + 1) * every)
    longest = max(1, int(WINDOW_SHARE * T))
    return min(T, t + min(longest, max(1, t)))


def _losses(history: dict[str, list[float]], classifier_phase: bool) -> str:
    # During DPAF's classifier phase neither D's rear nor G trains yet: say so rather than "nan".
    if classifier_phase:
        return "label classifier phase (G starts after it)"
    return f"loss_d {history['loss_d'][-1]:.3f} loss_g {history['loss_g'][-1]:.3f}"


def _report_now(t: int, cfg: TrainConfig) -> bool:
    # ray.train.report waits for a controller poll (~2 s): report only every 10th log line.
    return t % (cfg.log_every * 10) == 0


def save(sink: CheckpointSink, trainer: GANTrainerBase, ledger: PrivacyLedger, history: dict, t: int,
         plan: TrainingPlan, secret: RunSecret) -> None:
    """A checkpoint holds the run secret, so checkpoints are private artefacts (docs/design.md rule 13),
    and the configuration as planned, so a resumed run continues the same plan."""
    state = {"trainer": cpu_state(trainer.state_dict()), "ledger": ledger.to_json(), "history": history,
             "iteration": t, "secret": secret.to_checkpoint(), "config": plan.config.to_dict(),
             "planned_iterations": plan.iterations}
    sink.save(state, {"iteration": t, "epsilon": ledger.epsilon(plan.config.delta)})


def time_cap_note(done: int, planned: int, minutes: float | None) -> str:
    """What a run cut by its wall-clock cap did, in one phrase for the console, the release summary
    and a search's trial records: the model trained on fewer iterations than planned."""
    return (f"cut by the time cap (time budget {minutes:g} min) after {done} of {planned} planned iterations, "
            "because the next write-ahead window would have overrun it; the model trained less than planned")


def _out_of_time(cfg: TrainConfig, t0: float, done: int, window: int, collective: Collective,
                 device: torch.device | str = "cpu", outside_seconds: float = 0.0) -> bool:
    """Stop at a boundary if the next window would overrun the time budget, less the command's time
    outside the loop (`TrainingPlan.overhead_seconds`: before it, and the release's estimate); all ranks agree.

    The flag lives on the training device, so the all-reduce works under NCCL as under gloo."""
    if cfg.time_budget_minutes is None:
        return False
    elapsed = time.time() - t0
    per_iter = elapsed / done if done else 0.0
    stop = elapsed + per_iter * window > cfg.time_budget_minutes * 60 - outside_seconds
    flag = all_reduce_many(collective, [torch.tensor([1.0 if stop else 0.0], device=device)])[0]
    return bool(flag.item() > 0)


def _speed(iterations_per_second: float) -> str:
    """'3.2 it/s', or for slow runs '4.7 s/it' (a rate below 0.05 it/s would print as 0.0 it/s)."""
    if iterations_per_second >= 1:
        return f"{iterations_per_second:.1f} it/s"
    return f"{1 / max(iterations_per_second, 1e-9):.1f} s/it"


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
