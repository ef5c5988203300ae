"""Turn a budget (ε, δ) and a compute plan into T and the noise multipliers (docs/design.md rule 12).

Budget first, as users think (Opacus' `make_private_with_epsilon(target_epsilon, epochs)`):

    T  ← --iterations | --epochs (T = epochs/q) | --time-budget-minutes (speed probe on
         generated data, no privacy cost) | the resolution's measured default
    σ  ← both multipliers scaled together, up or down, in the ratio --noise-split, so that
         T iterations (plus any fixed releases) spend exactly the budget

With explicit --sigma-agg and --sigma-sgd the noise stays as given and T is derived from
the budget instead (capped by --max-iterations, which then lowers the noise to fit).

The plan only decides how long to train and how much noise to add; every ε that is
reported comes from the ledger of what ran.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from ..models.generator import RELEASE_KNOBS
from ..privacy.calibration import IterationSchedule, Phase, iterations_for_budget, noise_scale_for_iterations
from ..privacy.ledger import Entry, PrivacyConfigError, entry_from_json, epsilon_from_rdp, rdp_curve, validate_budget

# Measured best T per image size at the default batch (bench/results/k2_900: 900 iterations at 28×28;
# longer runs did not pay). The larger sizes are not measured on this project's hardware yet.
DEFAULT_ITERATIONS = {28: 900, 32: 900, 64: 2000, 128: 2000}
# Beyond this effective noise multiplier no signal survives (DPAGG's signal-to-noise needs
# b·C_agg ≫ σ_agg·Δ·√m, docs/design.md §4): such a budget is refused, with the knob that helps.
MAX_NOISE_MULTIPLIER = 1000.0
# DPAGG's noise on one group mean, σ_agg·C_agg/b in units of C_agg, past which the released class
# means no longer teach G (measured at B = 256, b = 128, T = 900, evaluate defaults): 0.039 still
# trained (Fashion-MNIST ε = 0.2, σ_agg 5.0: 56.6 %, diversity 0.58); 0.070 and 0.119 collapsed to
# 11–16 % (mnist-5k ε = 1, σ_agg 9.0 at T = 300 and 15.2 at T = 900). A warning, not a refusal.
NOISY_GROUP_MEAN = 0.05
# The DP label classifier's noise on its mean gradient, σ_c·C_c/B_c in units of C_c, past which it
# is measured to teach G wrong labels (T = 900, weight 0.3, evaluate defaults): 0.0013 and 0.0030
# trained a classifier of 82–83 % and 78–79 % and gained ~2 points (Fashion-MNIST ε = 10 and 1,
# B_c = 1024); 0.0134 trained ones of 29–39 % and lost 8–13 points (mnist-5k ε = 10, B_c = 256, seeds 0–1).
NOISY_CLASSIFIER_MEAN = 0.006
# With --classifier-weight 0 it only labels the release (post-processing), which is measured to help
# further out (0.0086 on Fashion-MNIST at ε = 0.2, bench/results/utility_15); past this it is a warning too.
NOISY_LABELLER_MEAN = 0.009


@dataclass(frozen=True)
class ClassifierTier:
    """One tier of the default DP label-classifier phase (classifier_steps None): `steps` DP-SGD steps
    where the planned noise on the classifier's mean gradient, σ_c/B_c, is at most `noise_limit`, with
    `knobs` set where the run left them unset (None). `measured`: the evidence, in one line."""

    steps: int
    noise_limit: float
    knobs: dict[str, float]
    measured: str


# The default phase's tiers, longest first; past every limit it is off. The measurements behind each
# (Fashion-MNIST, weight 0.3, split 1, evaluate defaults): docs/results.md, "Classifier-phase tiers".
CLASSIFIER_TIERS: tuple[ClassifierTier, ...] = (
    ClassifierTier(1000, 0.002, {"uncertain_fraction": 0.5, "between_class_fraction": 1.0},
                   "ε = 10 (0.0013): 73.0 % (4 seeds) against 71.2 % without the phase; at 0.0032 (ε = 1) it lost 0.7"),
    ClassifierTier(300, 0.0035, {"between_class_fraction": 1.0},
                   "ε = 1 (0.0030): 72.1 % against 70.1 %; all images between classes +0.4 there, −0.4 at 0.0042"),
    ClassifierTier(300, 0.0045, {},
                   "ε = 0.5 (0.0042), labelling the release: 71.8 % against 67.5 % without the phase"),
    ClassifierTier(75, 0.0045, {"classifier_weight": 0.0, "classifier_batch": 4096, "classifier_noise": 4.0,
                                "uncertain_fraction": 0.5},
                   "ε = 0.2 (0.0043), labels only: 70.4 % against 61.1 % without; as G's teacher it collapsed G"),
    ClassifierTier(300, NOISY_LABELLER_MEAN, {"classifier_weight": 0.0},
                   "ε = 0.2 at B_c 1024 (0.0086), labels only: 63.8 % against 61.1 %; where B_c 4096 is too many"),
)
# Knobs of a tier that only choose how the release is sampled (RELEASE_KNOBS, post-processing) are no part of
# the plan, so tiers that differ only in them are planned once.
# The tiers are chosen by their noise on the mean gradient (above), whatever share of the records a batch is,
# up to a quarter of them (docs/heldout.md: the held-out screen of this rule). Measured on Fashion-MNIST at
# q_c = B_c/N ≤ 0.076; at 0.28 (mnist-5k, B_c = 1024) the noise limits already leave the phase off.
AUTO_CLASSIFIER_MAX_SAMPLING_RATE = 0.25
# Share of a time budget kept for the probe's spread, and the seconds kept for the rest of the command
# (start-up, the probe, writing the release) where they are not measured (`overhead_seconds` None: a trial).
TIME_RESERVE_FRACTION, TIME_RESERVE_SECONDS = 0.1, 15.0


@dataclass(frozen=True)
class TrainingPlan:
    config: TrainConfig  # with the noise multipliers and T actually used (config.iterations: GAN iterations)
    schedule: IterationSchedule
    iterations: int  # every iteration the loop runs: a classifier phase's steps, then the GAN iterations
    planned_epsilon: float  # for information; the report uses the ledger
    noise_factor: float = 1.0  # multiplier applied to the base σs (the noise split at σ_sgd = 1, or the given σs)
    how: str = ""  # where T and σ came from, for the printed plan
    seconds_per_iteration: float | None = None  # from the speed probe, when there was one
    # The command's time outside the loop that its time budget covers: spent before training (start-up,
    # data, probe) plus the release's estimate; None where not measured (TIME_RESERVE_SECONDS is kept).
    overhead_seconds: float | None = None

    @property
    def effective_noise(self) -> float:
        return self.schedule.cycle[0]

    @property
    def estimated_seconds(self) -> float | None:
        return None if self.seconds_per_iteration is None else self.seconds_per_iteration * self.iterations

    @property
    def warnings(self) -> list[str]:
        """Plans that spend the budget correctly but are measured to release nothing useful."""
        c = self.config
        if c.model != "dpaf" or c.sigma_agg is None:
            return []
        out = []
        group_mean = noisy_group_mean(c.sigma_agg, c.group_size, "more records (a smaller q needs less noise) or a "
                                      "larger --epsilon lower it; the budget is spent correctly either way")
        if group_mean:
            out.append(group_mean)
        for ph in self.schedule.prefix:  # the DP label classifier's phase
            mean_noise = ph.noise / c.classifier_batch  # in units of C_c
            if c.classifier_weight == 0 and c.classifier_labels and mean_noise <= NOISY_LABELLER_MEAN:
                continue  # it only labels the release, measured to help up to NOISY_LABELLER_MEAN
            if mean_noise > NOISY_CLASSIFIER_MEAN:
                out.append(f"the DP label classifier's noise on its mean gradient, σ_c/B_c = {ph.noise:.3g}/"
                           f"{c.classifier_batch} = {mean_noise:.4f}, is past {NOISY_CLASSIFIER_MEAN:g}, where it "
                           "teaches G wrong labels (measured: 0.0134 trained 29–39 % classifiers and lost 8–13 points "
                           "on mnist-5k at ε = 10; 0.0030 trained a 78 % one and gained 2 points on Fashion-MNIST at "
                           "ε = 1). On data this small drop the phase (--classifier-steps 0); more records or a "
                           "larger --epsilon lower it")
        return out

    def describe(self) -> list[str]:
        c = self.config
        noise = (f"σ_agg={c.sigma_agg:.4g}, σ_sgd={c.sigma_sgd:.4g}, σ_eff={self.effective_noise:.4g} "
                 f"(conv2 every {c.sgd_every} it.)" if c.model == "dpaf" else f"σ={c.sigma_sgd:.4g}")
        P = self.schedule.prefix_iterations
        lines = [f"plan: T={self.iterations - P} iterations ({self.how}), q={self.schedule.sampling_rate:.4g}, {noise}",
                 f"plan: expected ε={self.planned_epsilon:.4f} of {c.epsilon:g} at δ={c.delta:g}"]
        for ph in self.schedule.prefix:
            lines.insert(0, f"plan: first a DP label classifier: {ph.iterations} DP-SGD steps at q_c={ph.sampling_rate:.4g}, "
                            f"σ_c={ph.noise:.4g}, C_c={c.classifier_clip:g} (its own Poisson samples)")
        lines += [f"plan: WARNING: {w}" for w in self.warnings]
        if self.estimated_seconds is not None:
            lines.append(f"plan: about {_fmt(self.estimated_seconds)} of training "
                         f"({self.seconds_per_iteration * 1000:.0f} ms/iteration measured on generated data)")
        return lines


def noisy_group_mean(sigma_agg: float, group_size: int, fix: str) -> str | None:
    """The warning for DPAGG noise on one group mean (σ_agg·C_agg/b, in units of C_agg: one record's
    signal is at most C_agg) past NOISY_GROUP_MEAN, or None. One check for a single run's plan and for
    a search's reference (`tuning.reference.reference_warnings`); `fix` names the knobs that lower it."""
    noise = sigma_agg / group_size
    if noise <= NOISY_GROUP_MEAN:
        return None
    return (f"DPAGG's noise on a group mean, σ_agg/b = {sigma_agg:.3g}/{group_size} = {noise:.3f}, is past "
            f"{NOISY_GROUP_MEAN:g}, where the class means stop teaching G (measured: σ_agg/b = 0.070 and 0.119 "
            "released 11–16 % on mnist-5k at ε = 1, and search trials at 0.17 scored 17–23 % on a Fashion-MNIST "
            f"subsample; 0.039 still trained); {fix}")


def default_iterations(image_size: int) -> int:
    return DEFAULT_ITERATIONS.get(image_size, 2000)


def schedule_for(cfg: TrainConfig, n_train: float) -> IterationSchedule:
    """The schedule of the configured (or base, for the planner to scale) noise multipliers; a phase's
    unset knobs at the values the trainer gives them (TrainConfig.with_default_knobs)."""
    cfg = cfg.with_default_knobs()
    q = cfg.sampling_rate(n_train)
    sigma_agg, sigma_sgd = cfg.base_sigmas()
    if cfg.model == "dpaf":
        schedule = IterationSchedule.dpaf(q, sigma_agg, sigma_sgd, cfg.sgd_every)
        if cfg.prefix_iterations:  # issue #13: the label classifier's DP-SGD phase on its own Poisson samples
            schedule = schedule.with_prefix(Phase(cfg.classifier_batch / n_train, cfg.classifier_noise * sigma_sgd,
                                                  cfg.prefix_iterations))
        return schedule
    return IterationSchedule.dpsgd(q, sigma_sgd)


def fixed_releases(cfg: TrainConfig) -> list[Entry]:
    """Releases outside training that the budget must also cover (a trial's noisy score, an earlier attempt)."""
    return [entry_from_json(e) for e in cfg.extra_fixed_releases]


def iterations_wanted(cfg: TrainConfig, q: float, image_size: int,
                      seconds_per_iteration: float | None = None,
                      overhead_seconds: float | None = None) -> tuple[int, str]:
    """T from the compute the user asked for, and where it came from. A time budget covers the whole
    command: what it spends outside the loop (`overhead_seconds`) is taken off first."""
    if cfg.iterations is not None:
        return cfg.iterations, "--iterations"
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs / q)), f"--epochs {cfg.epochs:g}"
    if cfg.time_budget_minutes is not None:
        if seconds_per_iteration is None:
            raise ValueError("a time budget needs the speed probe's seconds per iteration")
        usable = training_seconds(cfg.time_budget_minutes, overhead_seconds)
        how = f"--time-budget-minutes {cfg.time_budget_minutes:g}"
        if overhead_seconds is not None:
            how += f", less {overhead_seconds:.0f} s of start-up, probe and release"
        return max(1, int(usable / seconds_per_iteration)), how
    return default_iterations(image_size), f"the default for {image_size}×{image_size}"


def training_seconds(budget_minutes: float, overhead_seconds: float | None = None) -> float:
    """The seconds of a time budget the training loop may plan with: less the probe's spread
    (TIME_RESERVE_FRACTION) and the command's time outside the loop (TIME_RESERVE_SECONDS when unmeasured)."""
    overhead = TIME_RESERVE_SECONDS if overhead_seconds is None else overhead_seconds
    return budget_minutes * 60 * (1 - TIME_RESERVE_FRACTION) - overhead


def plan_training(cfg: TrainConfig, n_train: float, image_size: int = 28,
                  seconds_per_iteration: float | None = None, overhead_seconds: float | None = None) -> TrainingPlan:
    """The plan for `n_train` expected training records (public: (1 − f)·N); `overhead_seconds`: the
    command's measured time outside the loop, which its time budget also covers. Its config holds a
    number in every knob (the classifier phase and PLANNED_KNOBS included)."""
    if cfg.classifier_steps is None:
        return choose_classifier_phase(cfg, n_train, image_size, seconds_per_iteration, overhead_seconds)
    return _plan_with_phase(cfg, n_train, image_size, seconds_per_iteration, overhead_seconds)


def _plan_with_phase(cfg: TrainConfig, n_train: float, image_size: int, seconds_per_iteration: float | None,
                     overhead_seconds: float | None) -> TrainingPlan:
    """plan_training for a run whose classifier phase is given (classifier_steps set); knobs it left
    unset get PLANNED_KNOBS' values."""
    cfg = cfg.with_default_knobs()
    validate_budget(cfg.epsilon, cfg.delta)
    cfg.validate(n_train)
    extra = fixed_releases(cfg)
    schedule = schedule_for(cfg, n_train)
    P = schedule.prefix_iterations  # a classifier phase runs first; T counts the GAN iterations after it
    base = rdp_curve(extra) if extra else 0.0

    def eps(s: IterationSchedule, t: int) -> float:
        return epsilon_from_rdp(base + s.rdp(t), cfg.delta)

    def with_factor(factor: float, T: int, how: str) -> TrainingPlan:
        sigma_agg, sigma_sgd = cfg.base_sigmas()
        planned = dataclasses.replace(cfg, sigma_agg=sigma_agg * factor if cfg.model == "dpaf" else cfg.sigma_agg,
                                      sigma_sgd=sigma_sgd * factor, iterations=T)
        s = schedule_for(planned, n_train)
        return TrainingPlan(planned, s, P + T, eps(s, P + T), factor, how, seconds_per_iteration, overhead_seconds)

    if not cfg.explicit_noise:  # budget first: T from the compute, σ from the budget
        T, how = iterations_wanted(cfg, schedule.sampling_rate, image_size, seconds_per_iteration, overhead_seconds)
        if cfg.max_iterations is not None and T > cfg.max_iterations:
            T, how = cfg.max_iterations, f"{how}, capped by --max-iterations"
        factor = _noise_factor(schedule, P + T, cfg, extra)
        return with_factor(factor, T, how + "; noise from the budget")

    # explicit noise: T from the budget (or as given, checked); a single given σ sets the other by the split
    sigma_agg, sigma_sgd = cfg.base_sigmas()
    cfg = dataclasses.replace(cfg, sigma_agg=sigma_agg if cfg.model == "dpaf" else cfg.sigma_agg, sigma_sgd=sigma_sgd)
    if cfg.iterations is not None or cfg.epochs is not None:
        T, how = iterations_wanted(cfg, schedule.sampling_rate, image_size)
        e = eps(schedule, P + T)
        if e > cfg.epsilon:
            opt = "--iterations" if cfg.iterations is not None else "--epochs"
            raise ConfigError(
                f"{opt}: {T} iterations at σ_agg={cfg.sigma_agg}, σ_sgd={cfg.sigma_sgd} would spend ε={e:.3g} > "
                f"target {cfg.epsilon:g}; drop --sigma-agg/--sigma-sgd to let the planner set the noise for this T, "
                "or lower T")
        return TrainingPlan(cfg, schedule, P + T, e, 1.0, how + "; noise as given", seconds_per_iteration,
                            overhead_seconds)
    T = iterations_for_budget(schedule, cfg.epsilon, cfg.delta, extra) - P
    if T < 1:
        raise ConfigError(f"--classifier-steps: the {P} classifier steps alone spend ε={cfg.epsilon:g} at the given "
                          "noise; lower --classifier-steps, raise --classifier-noise or drop the explicit sigmas")
    how = "from the budget at the given noise"
    if cfg.time_budget_minutes is not None and seconds_per_iteration is not None:
        T_time, _ = iterations_wanted(cfg, schedule.sampling_rate, image_size, seconds_per_iteration,
                                      overhead_seconds)
        if T_time < T:
            T, how = T_time, f"{how}, cut to fit --time-budget-minutes {cfg.time_budget_minutes:g} (budget left unspent)"
    if cfg.max_iterations is not None and T > cfg.max_iterations:
        factor = noise_scale_for_iterations(schedule, P + cfg.max_iterations, cfg.epsilon, cfg.delta, extra)
        return with_factor(factor, cfg.max_iterations, f"{how}, capped by --max-iterations; noise lowered to fit")
    return TrainingPlan(dataclasses.replace(cfg, iterations=T), schedule, P + T, eps(schedule, P + T), 1.0, how,
                        seconds_per_iteration, overhead_seconds)


def _noise_factor(schedule: IterationSchedule, T: int, cfg: TrainConfig, extra: list[Entry]) -> float:
    """The factor on the base σs that spends exactly the budget in T iterations; refused past the limit."""
    limit = MAX_NOISE_MULTIPLIER / schedule.cycle[0]
    try:
        factor = noise_scale_for_iterations(schedule, T, cfg.epsilon, cfg.delta, extra, max_factor=2 * limit)
    except PrivacyConfigError:
        factor = math.inf
    if factor > limit:
        needs = "more than" if math.isinf(factor) else f"{schedule.cycle[0] * factor:.3g},"
        raise ConfigError(
            f"--epsilon {cfg.epsilon:g}: spending it over T={T} iterations at q={schedule.sampling_rate:.3g} needs "
            f"an effective noise multiplier of {needs} beyond the limit {MAX_NOISE_MULTIPLIER:g} where no signal "
            "survives; lower --iterations (or --epochs, --time-budget-minutes) or --batch-size, or raise --epsilon")
    return factor


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def choose_classifier_phase(cfg: TrainConfig, n_train: float, image_size: int = 28,
                            seconds_per_iteration: float | None = None,
                            overhead_seconds: float | None = None) -> TrainingPlan:
    """The default (classifier_steps None): the first tier of CLASSIFIER_TIERS whose planned noise on a
    mean gradient is within its limit, else none. Every input is public (the budget, N, the knobs), so
    the choice costs no privacy. It goes with the default plan only: with a given T (--iterations,
    --epochs, a time budget) or given noise the phase would take over a short run or change the compute
    asked for, so it stays off unless asked for. A tier sets only the knobs the run left unset (None)."""
    off = dataclasses.replace(cfg, classifier_steps=0)
    why = None
    if cfg.model != "dpaf":
        return _plan_with_phase(off, n_train, image_size, seconds_per_iteration, overhead_seconds)
    if (cfg.iterations, cfg.epochs, cfg.time_budget_minutes) != (None, None, None) or cfg.explicit_noise:
        why = ("the default phase goes with the default plan (it was measured at T = 900 with noise from the budget), "
               "and this run sets its own T or noise; pass --classifier-steps P to add it")
    else:
        given = cfg.with_default_knobs()
        planned: dict[tuple, TrainingPlan | Exception] = {}
        for tier in CLASSIFIER_TIERS:
            steps, limit = tier.steps, tier.noise_limit
            knobs = {k: v for k, v in tier.knobs.items() if getattr(cfg, k) is None}
            if knobs.get("classifier_weight") == 0 and not cfg.classifier_labels:
                continue  # a classifier that neither teaches G nor labels the release would waste budget
            batch = knobs.get("classifier_batch", given.classifier_batch)
            if batch > AUTO_CLASSIFIER_MAX_SAMPLING_RATE * n_train:
                why = (f"B_c = {batch:g} is more than {AUTO_CLASSIFIER_MAX_SAMPLING_RATE:g} of the {n_train:g} "
                       "training records, where the phase is not measured")
                continue
            knobs["classifier_steps"] = steps
            key = tuple(sorted((k, v) for k, v in knobs.items() if k not in RELEASE_KNOBS))
            if key not in planned:
                try:
                    planned[key] = _plan_with_phase(dataclasses.replace(cfg, **dict(key)), n_train, image_size,
                                                    seconds_per_iteration, overhead_seconds)
                except (ConfigError, PrivacyConfigError) as e:
                    planned[key] = e
            if isinstance(planned[key], Exception):
                why = f"it does not fit the budget ({planned[key]})"
                continue
            on = dataclasses.replace(planned[key], config=dataclasses.replace(planned[key].config, **knobs))
            noise = on.schedule.prefix[0].noise / batch
            if noise <= limit:
                role = "".join(f", {k} {v:g}" for k, v in knobs.items() if k != "classifier_steps")
                if knobs.get("classifier_weight") == 0:
                    role += ": it only labels the release, G is not taught by it at this noise"
                return dataclasses.replace(on, how=f"{on.how}; the default DP label-classifier phase of {steps} steps "
                                                   f"(σ_c/B_c = {noise:.4f} ≤ {limit:g}{role}; --classifier-steps 0 "
                                                   "drops it)")
            why = (f"its noise σ_c/B_c = {noise:.4f} would be past {limit:g}, where it is not measured to help "
                   "(more records or a larger --epsilon lower it)")
    plan = _plan_with_phase(off, n_train, image_size, seconds_per_iteration, overhead_seconds)
    return dataclasses.replace(plan, how=f"{plan.how}; no DP label-classifier phase by default: {why}")
