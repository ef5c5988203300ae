"""Run-level audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are made, and each is put into the training data independently with probability 1/2
(from the audit's secret). The run's releases are then executed as a DPAF run executes them, for
the T iterations and at the noise that the real plan derives from (ε, δ): every iteration draws the
Poisson sample with `training.gan.poisson_sample`, the trainer's own (rate q, from the run secret), bounds, groups and
sums the sampled records with `models.dpagg` and releases them with `dpagg.release`; every k-th
iteration it also clips the sampled records' conv2 gradients with `clip_and_sum_per_record` and
releases them with `gaussian_release` at σ_sgd·C_sgd; and the ledger is charged as `train_loop`
charges it (`plan.schedule.noise_at(t)`, Poisson-sampled).

A white-box adversary sees every release. It knows the canaries and the other records, but not
which canaries are in, which records each iteration sampled, nor the noise. It scores canary j by
the log-likelihood ratio of "j is in the data" summed over iterations, each iteration being a
mixture (sampled with probability q, else not) of Gaussians along j's contribution:
    score_j = Σ_t log(1 − q + q·exp(a_tj − μ_t²/2)),
    a_tj = μ_agg·⟨A_t − E[A_t], ê_j⟩/std_agg (+ μ_sgd·⟨G_t − E[G_t], ĝ_j⟩/std_sgd on conv2 iterations),
then guesses the top k canaries "in" and the bottom k "out", for a few k fixed in advance (each at
confidence 1 − 5 %/len(k), Bonferroni), and turns the number of correct guesses into a bound on ε
with the paper's Theorem 5.2 (`bounds.one_run_epsilon`).

What this audits, exactly: the sequence of releases of one run (sampling, grouping, bounding,
clipping, noise, and the ledger's charge for them), with the discriminator frozen at its
initialisation. Canaries enter as an embedding at DPAGG's input (norm 2·C_agg, so the clip binds)
and as a per-record gradient at conv2's clipped sum (norm 2·C_sgd) — "gradient canaries" in the
paper's white-box sense — in random directions with the other records' 32 main (principal)
directions projected out, where the unknown sample of the other records disturbs them least. The other records are the
data set's images through the real front at initialisation, with their conv2 gradients computed
once against a fixed public upstream gradient per class. The GAN's training dynamics (the rear,
G, Adam) are not run: they are post-processing of these releases, and a frozen model keeps every
canary's contribution known to the adversary, which is the strongest white-box setting.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..data.sources import load_dataset
from ..collectives import LocalCollective
from ..models import dpagg
from ..privacy.ledger import PrivacyLedger
from ..privacy.mechanisms import clip_and_sum_per_record, gaussian_release
from ..privacy.randomness import RunSecret
from ..training.dpaf import DPAFTrainer
from ..training.gan import poisson_sample
from ..training.plan import plan_training
from .bounds import clopper_pearson, one_run_epsilon
from .settings import RunAuditSettings

@dataclass
class RunAudit:
    dataset: str
    records: int
    canaries: int
    iterations: int
    sampling_rate: float
    sigma_agg: float
    sigma_sgd: float
    sgd_every: int
    delta: float
    guesses: list[dict]
    best: dict
    epsilon_lower_bound: float
    epsilon_ledger: float
    verdict: str
    noise_disabled: bool
    seconds: float
    notes: list[str]
    confidence: float = 0.95  # of the bound; each k's guesses are judged at 1 − (1 − confidence)/len(k)

    @property
    def tightness(self) -> float:
        return self.epsilon_lower_bound / self.epsilon_ledger if self.epsilon_ledger > 0 else math.nan

    def to_json(self) -> dict:
        b = self.best
        return {
            "mechanism": "dpaf_training_run",
            "level": "run",
            "canary": (f"{self.canaries} canaries, each in the data with probability 1/2: a DPAGG embedding of norm "
                       "2·C_agg and a conv2 gradient of norm 2·C_sgd, random directions away from the other "
                       "records' 32 principal directions"),
            "dataset": self.dataset, "records": self.records,
            "iterations": self.iterations, "sampling_rate": self.sampling_rate,
            "noise_multipliers": {"sigma_agg": self.sigma_agg, "sigma_sgd": self.sigma_sgd, "sgd_every": self.sgd_every},
            "delta": self.delta,
            "trials": {"canaries": self.canaries, "guesses": b["guesses"], "correct": b["correct"]},
            "tpr": b["tpr"], "tpr_interval": b["tpr_interval"], "fpr": b["fpr"], "fpr_interval": b["fpr_interval"],
            "confidence": self.confidence,
            "guesses": self.guesses,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_theory": self.epsilon_ledger,
            "epsilon_theory_source": "the run's ledger (RDP), as train_loop charges it",
            "tightness": None if math.isnan(self.tightness) else self.tightness,
            "verdict": self.verdict,
            "noise_disabled_for_test": self.noise_disabled,
            "seconds": self.seconds,
            "notes": self.notes,
        }


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _away_from(directions: torch.Tensor, records: torch.Tensor, rank: int = 32) -> torch.Tensor:
    """`directions` with the top principal directions of `records` (uncentred) projected out."""
    r = min(rank, records.shape[1] // 4, records.shape[0])
    if r < 1:
        return directions
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # svd_lowrank's random start: public
        _, _, V = torch.svd_lowrank(records.float(), q=r, niter=3, M=None)
    V = V[:, :r].to(directions.dtype)
    return directions - (directions @ V) @ V.t()


def audit_run(settings: RunAuditSettings = RunAuditSettings(), secret: RunSecret | None = None,
              progress: Callable[[str], None] | None = None, *, data: ImageDataset | None = None,
              test_only_disable_noise: bool = False) -> RunAudit:
    """One audited run. `test_only_disable_noise` (tests only; no command-line switch reaches it)
    executes every release without its noise, to show that the audit then finds a large ε."""
    t0 = time.time()
    secret = secret if secret is not None else RunSecret.fresh()
    overrides = dict(settings.config)
    for name in ("sigma_agg", "sigma_sgd"):
        if getattr(settings, name) is not None:
            overrides[name] = getattr(settings, name)
    cfg = TrainConfig(dataset=settings.dataset, epsilon=settings.epsilon, delta=settings.delta, seed=settings.seed,
                      max_iterations=settings.max_iterations, model="dpaf", **overrides)
    if data is None:
        data = load_dataset(cfg.dataset, "train", cfg.data_root, num_classes=cfg.num_classes)
    if settings.max_records is not None:
        data = data.subset(torch.arange(min(settings.max_records, len(data))))
    N, m, K = len(data), settings.canaries, data.num_classes
    plan = plan_training(cfg.validate(N), N + m // 2)  # public N: the other records and half the canaries
    cfg, T, q = plan.config, plan.iterations, plan.schedule.sampling_rate
    with torch.random.fork_rng(devices=[]):
        trainer = DPAFTrainer(cfg, data, N, 0, LocalCollective(), "cpu", secret=secret.child("trainer"),
                              sampling_rate=q)
    spec = trainer.spec
    std_agg, std_sgd = spec.noise_std, cfg.sigma_sgd * cfg.clip_sgd  # what the adversary assumes
    mu_agg, mu_sgd = cfg.clip_agg / std_agg, cfg.clip_sgd / std_sgd
    noise_factor = 0.0 if test_only_disable_noise else 1.0
    run_spec = dataclasses.replace(spec, sigma=spec.sigma * noise_factor)
    if progress:
        progress(f"run-level audit: {cfg.dataset}, N={N} + {m} canaries (each in w.p. 1/2), T={T}, q={q:.4g}, "
                 f"σ_agg={cfg.sigma_agg:.4g}, σ_sgd={cfg.sigma_sgd:.4g}, k={cfg.sgd_every}"
                 + (" — NOISE DISABLED (test only)" if test_only_disable_noise else ""))

    # -- the other records through the real front at initialisation -------------------------------
    g_pub = torch.Generator().manual_seed(1000 + settings.seed)
    width = spec.embedding_dim + K
    upstream = torch.randn(K, width, generator=g_pub) * spec.expected_group_size  # public, per class
    params = trainer.per_record.params

    def record_loss(out, y, g_row, *pix):  # the per-record objective of DPAFTrainer.private_update
        phi, _ = out
        v = dpagg.bound_records(trainer.embed(phi, pix[0] if pix else None), y, spec)
        return (g_row * v).sum(1)

    v_parts, g_parts = [], [[] for _ in params]
    for start in range(0, N, 256):
        idx = torch.arange(start, min(N, start + 256))
        x, y = data.as_float(idx), data.labels[idx]
        with torch.no_grad():
            h1, pix = trainer.conv1(x), trainer.pixels(x)
            v_parts.append(trainer.bounded(h1, y, pix)[0])
        extras = (y, upstream[y]) + ((pix,) if pix is not None else ())
        for j, gr in enumerate(trainer.per_record((h1, y), record_loss, extras)):
            g_parts[j].append(gr.detach())
    v_others = torch.cat(v_parts)
    grads_others = [torch.cat(p) for p in g_parts]

    # -- canaries: public random directions, each in the data with probability 1/2 (secret) ------
    # Directions away from the other records' main directions, where the unknown sample of the
    # other records moves the releases least (more distinguishable than plain random directions).
    canary_y = torch.randint(K, (m,), generator=g_pub)
    m_emb = spec.embedding_dim
    e = _away_from(torch.randn(m, m_emb, generator=g_pub), v_others[:, :m_emb])
    v_canary = dpagg.bound_records(_unit_rows(e) * 2 * cfg.clip_agg, canary_y, spec)
    e_hat = _unit_rows(v_canary[:, :m_emb])
    P = sum(p.numel() for p in params)
    flat_others = torch.cat([g.reshape(N, -1) for g in grads_others], 1)
    g_hat = _unit_rows(_away_from(torch.randn(m, P, generator=g_pub), flat_others))
    del flat_others
    grads_canary, i = [], 0
    for p in params:
        grads_canary.append((2 * cfg.clip_sgd * g_hat[:, i:i + p.numel()]).reshape(m, *p.shape))
        i += p.numel()
    included = torch.from_numpy(secret.stream("audit/inclusion").bernoulli(m, 0.5))
    inc_ids = included.nonzero().squeeze(1)
    labels_all = torch.cat([data.labels, canary_y[inc_ids]])
    v_all = torch.cat([v_others, v_canary[inc_ids]])
    grads_all = [torch.cat([go, gc[inc_ids]]) for go, gc in zip(grads_others, grads_canary)]
    n_data = len(labels_all)

    # What the adversary expects of the releases without knowing the sample or the inclusions.
    half = 0.5 * torch.ones(m)
    class_onehot_o = F.one_hot(data.labels, K).to(v_others.dtype)
    class_onehot_c = F.one_hot(canary_y, K).to(v_others.dtype)
    exp_class = q * (class_onehot_o.t() @ v_others[:, :m_emb] + class_onehot_c.t() @ (half[:, None] * v_canary[:, :m_emb]))
    clipped_o = clip_and_sum_per_record(grads_others, cfg.clip_sgd)
    clipped_c = clip_and_sum_per_record(grads_canary, cfg.clip_sgd)  # each canary is in w.p. 1/2
    exp_grad = q * torch.cat([(a + 0.5 * b).flatten() for a, b in zip(clipped_o, clipped_c)])
    canary_class = canary_y


    ledger = PrivacyLedger()
    coll = LocalCollective()
    scores = torch.zeros(m, dtype=torch.float64)
    log_q, log_1q = math.log(q), math.log1p(-q)
    for t in range(T):
        ledger.charge_poisson_gaussian(q, plan.schedule.noise_at(t))  # charged before the releases, as train_loop
        idx, group_uniforms = poisson_sample(secret, "poisson", t, n_data, q, slice(0, n_data))  # the trainer's own
        v, y = v_all[idx], labels_all[idx]
        groups = dpagg.assign_groups(y, group_uniforms, spec)
        local = dpagg.group_sums(v, groups, spec.num_groups)
        A = dpagg.release(local, run_spec, trainer.noise_stream(t, "dpagg/real"), coll)
        per_class = A[:, :m_emb].reshape(K, spec.groups_per_class, m_emb).sum(1)
        a_agg = ((per_class - exp_class)[canary_class] * e_hat).sum(1)
        a = (mu_agg / std_agg) * a_agg.double()
        mu2 = mu_agg ** 2
        if t % cfg.sgd_every == 0:
            clipped = clip_and_sum_per_record([g[idx] for g in grads_all], cfg.clip_sgd)
            G = gaussian_release(clipped, std_sgd * noise_factor, trainer.noise_stream(t, "dpsgd/conv2"), coll)
            flat = torch.cat([x.flatten() for x in G]) - exp_grad
            a = a + (mu_sgd / std_sgd) * (g_hat @ flat).double()
            mu2 += mu_sgd ** 2
        scores += torch.logaddexp(torch.full_like(a, log_1q), log_q + a - mu2 / 2)
        if progress and (t + 1) % max(1, T // 5) == 0:
            progress(f"  iteration {t + 1}/{T}")

    # -- guesses and the bound ---------------------------------------------------------------------
    order = torch.argsort(scores, descending=True)
    truth = included[order].numpy().astype(bool)  # canaries from most to least likely "in"
    fractions = [f for f in settings.guess_fractions if 1 <= int(f * m) and 2 * int(f * m) <= m]
    alpha = (1 - settings.confidence) / max(1, len(fractions))
    guesses = []
    n_in, n_out = int(truth.sum()), int((~truth).sum())
    for f in fractions:
        k = int(f * m)
        tp, tn = int(truth[:k].sum()), int((~truth[-k:]).sum())
        fp = k - tp
        eps = one_run_epsilon(m, 2 * k, tp + tn, settings.delta, alpha)
        tpr_lo, tpr_hi = clopper_pearson(tp, max(n_in, 1), settings.confidence)
        fpr_lo, fpr_hi = clopper_pearson(fp, max(n_out, 1), settings.confidence)
        guesses.append({"k_per_side": k, "guesses": 2 * k, "correct": tp + tn, "epsilon_lower_bound": eps,
                        "tpr": tp / max(n_in, 1), "tpr_interval": [float(tpr_lo), float(tpr_hi)],
                        "fpr": fp / max(n_out, 1), "fpr_interval": [float(fpr_lo), float(fpr_hi)]})
    best = max(guesses, key=lambda g: g["epsilon_lower_bound"])
    eps_ledger = ledger.epsilon(settings.delta)
    lower = best["epsilon_lower_bound"]
    notes = [
        "releases executed with the real sampling, DPAGG, clipping and noise functions; discriminator frozen at "
        "initialisation; GAN updates (post-processing) not run",
        f"guesses at k/m in {fractions} on each side, each at confidence 1 − {alpha:.3g} (Bonferroni)",
        f"{n_in} of {m} canaries were in the data",
    ]
    return RunAudit(
        dataset=cfg.dataset, records=N, canaries=m, iterations=T, sampling_rate=q, sigma_agg=cfg.sigma_agg,
        sigma_sgd=cfg.sigma_sgd, sgd_every=cfg.sgd_every, delta=settings.delta, guesses=guesses, best=best,
        epsilon_lower_bound=lower, epsilon_ledger=eps_ledger,
        verdict="VIOLATION" if lower > eps_ledger else "consistent", noise_disabled=test_only_disable_noise,
        seconds=time.time() - t0, notes=notes, confidence=settings.confidence,
    )
