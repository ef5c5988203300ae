"""Release-level audit: how distinguishable one canary is in one release, measured on the real code.

For each kind of release the trainer executes, a neighbouring pair of inputs is built (the same
other records, with and without one canary that reaches the sensitivity bound) and the release is
run many times on each side. The adversary knows everything but the noise, so it tests a threshold
on the projection of the output on the canary's contribution u = (S₁ − S₀)/‖S₁ − S₀‖ (the
likelihood-ratio test of a Gaussian release). Its rates give a lower bound on ε (`distinguish`),
compared with the exact ε of one unsampled Gaussian release at the σ the ledger charges.

Each mechanism runs in two stages, both through the package's own functions:

A. The full path, `real_trials` times per side: the real bounding/clipping code computes the sums,
   the real release function adds noise to all coordinates. This shows what the code does with a
   canary (its contribution's norm is checked against the claimed sensitivity) and measures the
   noise along u (the *noise check*: a χ² test that the real path adds at least the noise that
   stage B adds).
B. The vectorised path, `trials` times per side: the same release function, called with the same
   noise scale and collective, on the projection ⟨S, u⟩ alone. For a release that adds
   i.i.d. N(0, std²) noise to each coordinate this has exactly the distribution of ⟨output, u⟩,
   and it costs one normal per trial instead of d, which is what makes 10⁶ trials affordable.

The audited releases:
- ``dpagg_group_sums``: `models.dpagg` bound_records → assign_groups → group_sums → release, on W
  ranks (W = 2 runs the ranks as threads with a real all-reduce; the adversary sees every rank's
  output and averages them). Canary: an embedding of norm 10·C_agg, so the clip binds and the
  bounded vector has norm exactly Δ = √(C_agg² + κ²); that is the worst case, since DPAGG's input is
  otherwise unconstrained.
- ``dpsgd_conv2``: `DPAFTrainer.private_update` itself (per-record gradients of conv2 and the head,
  clip_and_sum_per_record, gaussian_release with the trainer's own noise scale). The release call is
  intercepted to capture its arguments and replay it. Canary: an image whose upstream gradient
  ∂L/∂A is set ×1000 (an adversarial, released value), so its raw gradient is far above C_sgd and
  its clipped gradient has norm exactly C_sgd along a fixed direction.
- ``noisy_score``: `tuning.scoring.score_trial` (a fixed classifier: epochs = 0 and a public seed,
  the same function of public synthetic data on both sides). Canary: a validation record the
  classifier gets right, so the count moves by exactly 1. score_trial draws one normal per call, so
  stage B replays its noise with `gaussian_release` at the noise multiplier score_trial is given,
  and the noise check on stage A is what ties that replay to score_trial's own noise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import stats

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..collectives import LocalCollective
from ..models.scoring_cnn import correct_count, train_classifier
from ..models import dpagg
from ..privacy.calibration import IterationSchedule
from ..privacy.ledger import Gaussian, PrivacyLedger
from ..privacy.mechanisms import gaussian_release
from ..privacy.randomness import RunSecret
from ..training import dpaf as dpaf_module
from ..training.gan import Batch
from ..tuning import scoring
from .bounds import gaussian_epsilon
from .collective import run_ranks
from .distinguish import ThresholdTest, threshold_test
from .settings import MECHANISMS, ReleaseAuditSettings

@dataclass
class Observations:
    """What a mechanism's two stages produced, before any statistics."""

    mechanism: str
    canary: str
    sigma_claimed: float
    claim_source: str
    epsilon_claimed: float | None  # when the claim is a ledger that is not one Gaussian entry
    sensitivity_claimed: float
    sum_out: np.ndarray  # S₀: pre-noise global sum without the canary (flattened)
    sum_in: np.ndarray  # S₁: with the canary
    full_out: np.ndarray  # (real_trials, d) outputs of the full path as the adversary sees them
    full_in: np.ndarray
    proj_out: np.ndarray  # (trials,) outputs of the vectorised path (already ⟨·, u⟩)
    proj_in: np.ndarray
    noise_std: float  # std that stage B added (per coordinate)
    direction: np.ndarray  # u
    notes: list[str] = field(default_factory=list)


@dataclass
class MechanismAudit:
    mechanism: str
    canary: str
    sigma_claimed: float
    claim_source: str
    sensitivity_claimed: float
    canary_contribution_norm: float
    delta: float
    noise_std: float
    trials: dict
    test: ThresholdTest
    noise_check: dict
    epsilon_lower_bound: float
    epsilon_theory: float
    verdict: str
    reasons: list[str]
    notes: list[str]
    confidence: float = 0.95  # of the bound (two tests at (1 + confidence)/2 each)

    @property
    def tightness(self) -> float:
        if self.epsilon_theory in (0.0, math.inf):
            return math.nan
        return self.epsilon_lower_bound / self.epsilon_theory

    def to_json(self) -> dict:
        t = self.test
        return {
            "mechanism": self.mechanism,
            "level": "release",
            "canary": self.canary,
            "claim": {"noise_multiplier": self.sigma_claimed, "source": self.claim_source,
                      "sensitivity": self.sensitivity_claimed},
            "canary_contribution_norm": self.canary_contribution_norm,
            "noise_std": self.noise_std,
            "delta": self.delta,
            "trials": self.trials,
            "threshold": t.threshold,
            "positive_side": "canary in" if t.positive_side == 1 else "canary out",
            "tpr": t.tpr, "tpr_interval": list(t.tpr_interval),
            "fpr": t.fpr, "fpr_interval": list(t.fpr_interval),
            "confidence": self.confidence,
            "interval_confidence": t.confidence,
            "threshold_chosen_by": t.chosen_by,
            "noise_check": self.noise_check,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_theory": _finite_or_str(self.epsilon_theory),
            "tightness": None if math.isnan(self.tightness) else self.tightness,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "notes": self.notes,
        }


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


# ------------------------------------------------------------------------------------- driver


def audit_releases(settings: ReleaseAuditSettings = ReleaseAuditSettings(),
                   mechanisms: Sequence[str] = MECHANISMS, secret: RunSecret | None = None,
                   progress: Callable[[str], None] | None = None) -> list[MechanismAudit]:
    """Audit each named release; `secret` drives the audit's noise (default: a fresh one)."""
    secret = secret if secret is not None else RunSecret.fresh()
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; choose from {list(MECHANISMS)}")
    out = []
    for name in mechanisms:
        obs = OBSERVERS[name](settings, secret.child(f"audit/{name}"))
        out.append(analyse(obs, settings))
        if progress:
            a = out[-1]
            progress(f"{a.mechanism}: ε ≥ {a.epsilon_lower_bound:.3f} (theory {a.epsilon_theory:.3f}) "
                     f"→ {a.verdict}")
    return out


def analyse(obs: Observations, settings: ReleaseAuditSettings) -> MechanismAudit:
    """Projections → noise check → threshold test → bound, theory and verdict."""
    u = obs.direction
    real_out, real_in = obs.full_out @ u, obs.full_in @ u
    x_out = np.concatenate([obs.proj_out, real_out])
    x_in = np.concatenate([obs.proj_in, real_in])
    test = threshold_test(x_out, x_in, settings.delta, settings.confidence, settings.calibration_fraction)

    # Noise check: along u the real path must add at least the noise that stage B replayed.
    resid = np.concatenate([real_out - obs.sum_out @ u, real_in - obs.sum_in @ u])
    noise_check: dict = {"trials": int(resid.size), "expected_std": obs.noise_std}
    reasons: list[str] = []
    if resid.size and obs.noise_std > 0:
        stat = float(np.sum((resid / obs.noise_std) ** 2))
        p_low = float(stats.chi2.cdf(stat, resid.size))
        noise_check.update(measured_std=float(np.sqrt(np.mean(resid ** 2))), p_value_less_noise=p_low,
                           passed=p_low >= settings.noise_check_level)
        if p_low < settings.noise_check_level:
            reasons.append(f"the full real path adds less noise along the canary (std "
                           f"{noise_check['measured_std']:.4g}) than the replayed release ({obs.noise_std:.4g})")
    else:  # nothing to compare with: a zero replayed noise shows in the bound itself
        noise_check.update(measured_std=float(np.sqrt(np.mean(resid ** 2))) if resid.size else None,
                           p_value_less_noise=None, passed=None)

    contribution = float(np.linalg.norm(obs.sum_in - obs.sum_out))
    if contribution > obs.sensitivity_claimed * (1 + 1e-5) + 1e-9:
        reasons.append(f"the canary moved the pre-noise sum by {contribution:.4g} > the claimed sensitivity "
                       f"{obs.sensitivity_claimed:.4g}")
    if obs.epsilon_claimed is not None:
        theory = obs.epsilon_claimed
    else:
        theory = gaussian_epsilon(obs.sigma_claimed, settings.delta) if obs.sigma_claimed > 0 else 0.0
    if test.epsilon_lower_bound > theory:
        reasons.insert(0, f"ε lower bound {test.epsilon_lower_bound:.4g} exceeds the charged ε {theory:.4g}")
    n_stage_b = len(obs.proj_out)
    trials = {"per_side": int(min(len(x_out), len(x_in))), "vectorised_per_side": int(n_stage_b),
              "real_path_per_side": int(len(obs.full_out)), "calibration_per_side": test.calibration_trials,
              "evaluation_per_side": test.evaluation_trials}
    return MechanismAudit(
        mechanism=obs.mechanism, canary=obs.canary, sigma_claimed=obs.sigma_claimed,
        claim_source=obs.claim_source, sensitivity_claimed=obs.sensitivity_claimed,
        canary_contribution_norm=contribution, delta=settings.delta, noise_std=obs.noise_std, trials=trials,
        test=test, noise_check=noise_check, epsilon_lower_bound=test.epsilon_lower_bound, epsilon_theory=theory,
        verdict="VIOLATION" if reasons else "consistent", reasons=reasons, notes=obs.notes,
        confidence=settings.confidence,
    )


def _unit(diff: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(diff))
    if norm == 0.0:
        u = np.zeros_like(diff)
        u[0] = 1.0
        return u
    return diff / norm


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def _public_generator(seed: int) -> torch.Generator:
    """The audit's inputs (other records, canaries) are synthetic and public."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- DPAGG release


def _observe_dpagg(settings: ReleaseAuditSettings, secret: RunSecret) -> Observations:
    W = settings.world_size
    K, m, per_class, n_per_rank = 4, 12, 2, 16  # public shape of the audit's DPAGG layer
    spec = dpagg.DPAggSpec(num_classes=K, embedding_dim=m, clip_norm=settings.clip_agg, kappa=settings.kappa,
                           sigma=settings.sigma, groups_per_class=per_class,
                           expected_group_size=float(n_per_rank * W) / (K * per_class))
    # The claim: what the ledger charges an iteration that releases DPAGG only (t mod k ≠ 0).
    schedule = IterationSchedule.dpaf(0.01, spec.sigma, settings.sigma, 2)
    sigma_claimed = schedule.noise_at(1)
    g = _public_generator(11)
    others = []
    for _ in range(W):
        emb = torch.randn(n_per_rank, m, generator=g, dtype=torch.float64) * 2 * torch.rand(n_per_rank, 1, generator=g,
                                                                                           dtype=torch.float64)
        others.append((emb, torch.randint(K, (n_per_rank,), generator=g), torch.rand(n_per_rank, generator=g,
                                                                                      dtype=torch.float64)))
    canary_e = torch.randn(1, m, generator=g, dtype=torch.float64)
    canary_e = canary_e / canary_e.norm() * 10 * settings.clip_agg  # the clip binds: ‖v‖ = Δ exactly
    canary = (canary_e, torch.tensor([1]), torch.tensor([0.3], dtype=torch.float64))
    holder = W - 1  # the canary sits on the last rank (for W = 2, the one that adds no noise)

    def local_sums(rank: int, side: int) -> torch.Tensor:
        e, y, gu = others[rank]
        if side == 1 and rank == holder:
            e, y, gu = torch.cat([e, canary[0]]), torch.cat([y, canary[1]]), torch.cat([gu, canary[2]])
        v = dpagg.bound_records(e, y, spec)
        return dpagg.group_sums(v, dpagg.assign_groups(y, gu.float(), spec), spec.num_groups)

    locals_ = {(r, s): local_sums(r, s) for r in range(W) for s in (0, 1)}
    sums = [sum(locals_[(r, s)] for r in range(W)).flatten().numpy() for s in (0, 1)]
    u = _unit(sums[1] - sums[0])
    u_t = torch.from_numpy(u)

    def on_ranks(fn: Callable) -> np.ndarray:
        """fn(rank, collective) on W ranks; the adversary averages what the ranks output."""
        if W == 1:
            outs = [fn(0, LocalCollective())]
        else:
            outs = run_ranks(W, lambda coll: fn(coll.rank, coll))
        return np.mean([o.numpy() for o in outs], axis=0)

    full, proj = [], []
    for side in (0, 1):
        R = settings.real_trials

        def full_release(rank, coll, side=side):
            batch = locals_[(rank, side)].unsqueeze(0).expand(R, *locals_[(rank, side)].shape).contiguous()
            out = dpagg.release(batch, spec, secret.stream(f"full/{side}"), coll)
            return out.reshape(R, -1)

        full.append(on_ranks(full_release) if R else np.zeros((0, u.size)))
        parts = []
        for c, n in enumerate(_chunks(settings.trials, settings.chunk)):
            def projected(rank, coll, side=side, c=c, n=n):
                value = float(locals_[(rank, side)].flatten() @ u_t)
                return dpagg.release(torch.full((n,), value, dtype=torch.float64), spec,
                                     secret.stream(f"projected/{side}", c), coll)

            parts.append(on_ranks(projected))
        proj.append(np.concatenate(parts) if parts else np.zeros(0))
    return Observations(
        mechanism="dpagg_group_sums",
        canary=f"embedding of norm 10·C_agg (clip binds: bounded norm Δ = {spec.sensitivity:.4g}), class 1, "
               f"on rank {holder} of {W}; {n_per_rank} other records per rank",
        sigma_claimed=sigma_claimed,
        claim_source="IterationSchedule.dpaf(...).noise_at(t) for an iteration without a conv2 release",
        epsilon_claimed=None, sensitivity_claimed=spec.sensitivity,
        sum_out=sums[0], sum_in=sums[1], full_out=full[0], full_in=full[1], proj_out=proj[0], proj_in=proj[1],
        noise_std=spec.noise_std, direction=u,
        notes=[f"world size {W}" + ("; the adversary averages the ranks' outputs" if W > 1 else "")],
    )


# ------------------------------------------------------------------------------ conv2 DP-SGD release


def _tiny_images(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def _observe_conv2(settings: ReleaseAuditSettings, secret: RunSecret) -> Observations:
    K, n_others = 2, 6
    cfg = TrainConfig(batch_size=8, group_size=4, sgd_every=1, feature_channels=2, embedding="linear",
                      pixel_statistics=False, sigma_agg=settings.sigma, sigma_sgd=settings.sigma,
                      clip_agg=settings.clip_agg, kappa=settings.kappa, clip_sgd=settings.clip_sgd, seed=0, z_dim=8)
    g = _public_generator(12)
    images = _tiny_images(n_others + 1, g)
    labels = torch.randint(K, (n_others + 1,), generator=g)
    ds = ImageDataset(images, labels, K, "audit-conv2")
    with torch.random.fork_rng(devices=[]):
        trainer = dpaf_module.DPAFTrainer(cfg, ds, len(ds), 0, LocalCollective(), "cpu",
                                          secret=secret.child("trainer"))
    spec = trainer.spec
    width = spec.embedding_dim + K
    # Upstream gradient ∂L/∂A: a released value, so the adversary may choose it; ×1000 makes every
    # record's raw gradient far larger than C_sgd, so each clipped gradient has norm C_sgd exactly.
    g_real = torch.randn(spec.num_groups, width, generator=g) * 1000.0
    with torch.no_grad():
        xf = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
        h1f = trainer.conv1(xf)
    yf, guf = torch.randint(K, (2,), generator=g), torch.rand(2, generator=g)
    g_fake = torch.randn(spec.num_groups, width, generator=g)
    gu = torch.rand(n_others + 1, generator=g)
    state = copy.deepcopy((trainer.private.state_dict(), trainer.opt_private.state_dict()))
    R = settings.real_trials

    captured: list[dict] = []
    for side in (0, 1):
        idx = torch.arange(n_others + side)  # the canary is the last record
        x = ds.as_float(idx)
        with torch.no_grad():
            h1 = trainer.conv1(x)
        real = Batch(x, ds.labels[idx], gu[idx])
        original = dpaf_module.gaussian_release
        record: dict = {}

        def recorder(local_sums, noise_std, noise, collective, record=record, original=original):
            record.update(sums=[s.detach().clone() for s in local_sums], std=float(noise_std), fn=original,
                          collective=collective)
            batch = [s.detach().unsqueeze(0).expand(max(R, 1), *s.shape).contiguous() for s in local_sums]
            outs = original(batch, noise_std, noise, collective)
            record["outputs"] = outs
            return [o[0] for o in outs]

        dpaf_module.gaussian_release = recorder  # for this one call: see the module docstring
        try:
            trainer.private_update(side, real, (h1, trainer.pixels(x)), g_real, (h1f, trainer.pixels(xf)), yf, guf,
                                   g_fake)
        finally:
            dpaf_module.gaussian_release = original
            trainer.private.load_state_dict(state[0])
            trainer.opt_private.load_state_dict(state[1])
        if "sums" not in record:
            raise RuntimeError("DPAFTrainer.private_update made no gaussian_release call: nothing to audit")
        captured.append(record)

    sums = [torch.cat([s.flatten().double() for s in rec["sums"]]).numpy() for rec in captured]
    u = _unit(sums[1] - sums[0])
    u_t = torch.from_numpy(u)
    full = [torch.cat([o.reshape(max(R, 1), -1).double() for o in rec["outputs"]], 1).numpy()[:R] for rec in captured]
    proj = []
    for side, rec in enumerate(captured):
        value = float(torch.from_numpy(sums[side]) @ u_t)
        parts = [rec["fn"]([torch.full((n,), value, dtype=torch.float64)], rec["std"],
                           secret.stream(f"projected/{side}", c), rec["collective"])[0].numpy()
                 for c, n in enumerate(_chunks(settings.trials, settings.chunk))]
        proj.append(np.concatenate(parts) if parts else np.zeros(0))
    stds = {rec["std"] for rec in captured}
    notes = [f"{sum(p.numel() for p in trainer.per_record.params)} released coordinates (conv2 and head of a "
             f"{cfg.feature_channels}-channel conv2); {n_others} other records"]
    if len(stds) > 1:
        notes.append(f"the two sides used different noise scales {sorted(stds)}")
    return Observations(
        mechanism="dpsgd_conv2",
        canary="28×28 image with upstream gradient ×1000: raw per-record gradient ≫ C_sgd, clipped to norm C_sgd "
               "along a fixed direction",
        sigma_claimed=cfg.sigma_sgd,
        claim_source="TrainConfig.sigma_sgd, the σ_sgd that IterationSchedule.dpaf composes into σ_eff",
        epsilon_claimed=None, sensitivity_claimed=cfg.clip_sgd,
        sum_out=sums[0], sum_in=sums[1], full_out=full[0], full_in=full[1], proj_out=proj[0], proj_in=proj[1],
        noise_std=min(stds), direction=u, notes=notes,
    )


# ------------------------------------------------------------------------------------- noisy score


def _observe_score(settings: ReleaseAuditSettings, secret: RunSecret) -> Observations:
    K, n_others, seed = 2, 5, 0
    g = _public_generator(13)
    synthetic = ImageDataset(_tiny_images(4, g), torch.tensor([0, 1, 0, 1]), K, "audit-synthetic")
    model = train_classifier(synthetic, epochs=0, seed=seed)  # what score_trial trains with epochs = 0
    canary_image = _tiny_images(1, g)
    probe = ImageDataset(canary_image, torch.zeros(1, dtype=torch.long), K, "probe")
    with torch.no_grad():
        canary_label = int(model(probe.as_float()).argmax(1)[0])  # a record the classifier gets right
    other_images, other_labels = _tiny_images(n_others, g), torch.randint(K, (n_others,), generator=g)
    sides = [ImageDataset(other_images, other_labels, K, "audit-validation"),
             ImageDataset(torch.cat([other_images, canary_image]), torch.cat([other_labels, torch.tensor([canary_label])]),
                          K, "audit-validation+canary")]
    counts = [float(correct_count(model, v)) for v in sides]
    expected = n_others + 0.5  # public f·N
    sigma = settings.sigma
    outputs: list[list[float]] = [[], []]
    charges: list[tuple] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny forward passes: more threads only contend
    try:
        for side in (0, 1):
            for i in range(settings.real_trials):
                ledger = PrivacyLedger()
                score = scoring.score_trial(synthetic, sides[side], ledger, sigma, epochs=0, max_steps=0, seed=seed,
                                            expected_validation=expected, secret=secret.child(f"trial/{side}/{i}"))
                outputs[side].append(score.value * expected)
                charges.append(tuple(ledger.entries))
    finally:
        torch.set_num_threads(threads)
    distinct = set(charges)
    notes: list[str] = []
    sigma_claimed, eps_claimed = sigma, None
    if len(distinct) == 1 and len(charges[0]) == 1 and isinstance(charges[0][0], Gaussian) and charges[0][0].count == 1:
        sigma_claimed = charges[0][0].noise_multiplier
    elif charges:
        # Not one Gaussian charge: the claim is whatever the least-charged call's ledger says.
        eps_claimed = min(PrivacyLedger(list(c)).epsilon(settings.delta) for c in distinct)
        notes.append(f"score_trial charged {sorted({str(c) for c in distinct})}, not one Gaussian release")
    proj = []
    for side in (0, 1):
        parts = [gaussian_release([torch.full((n,), counts[side], dtype=torch.float64)], sigma,
                                  secret.stream(f"projected/{side}", c), LocalCollective())[0].numpy()
                 for c, n in enumerate(_chunks(settings.trials, settings.chunk))]
        proj.append(np.concatenate(parts) if parts else np.zeros(0))
    notes.append("stage B replays score_trial's noise (σ · one normal of the trial secret) with gaussian_release; "
                 "the noise check compares it with score_trial's own releases")
    return Observations(
        mechanism="noisy_score",
        canary="a validation image labelled with the fixed classifier's own prediction: the count moves by exactly 1",
        sigma_claimed=sigma_claimed, claim_source="the ledger entry that score_trial charges",
        epsilon_claimed=eps_claimed, sensitivity_claimed=1.0,
        sum_out=np.array([counts[0]]), sum_in=np.array([counts[1]]),
        full_out=np.array(outputs[0]).reshape(-1, 1), full_in=np.array(outputs[1]).reshape(-1, 1),
        proj_out=proj[0], proj_in=proj[1], noise_std=sigma, direction=np.array([1.0]), notes=notes,
    )


OBSERVERS: dict[str, Callable[[ReleaseAuditSettings, RunSecret], Observations]] = {
    "dpagg_group_sums": _observe_dpagg,
    "dpsgd_conv2": _observe_conv2,
    "noisy_score": _observe_score,
}
