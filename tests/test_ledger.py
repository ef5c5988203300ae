"""The privacy ledger (docs/design.md rules 9 and 11, §5): what is charged, how ε follows from it, and that it
survives JSON and crashes without under-counting.

ε is recomputed here *independently* of dp_accounting: the RDP of the Poisson-subsampled Gaussian at
integer orders α (Mironov, Talwar, Zhang 2019, add/remove-one neighbours)

    A_α = Σ_{k=0}^{α} C(α,k) (1-q)^{α-k} q^k exp((k²-k)/(2σ²)),   RDP(α) = log(A_α)/(α-1),

composed by adding curves, and converted to (ε, δ) with either the plain conversion
ε = min_α RDP(α) + log(1/δ)/(α-1) (Mironov 2017), or the improved one that dp_accounting uses,
ε = min_α RDP(α) + log((α-1)/α) - (log δ + log α)/(α-1) (Canonne, Kamath, Steinke 2020). The plain
one is always larger; at δ = 1e-5 it is larger by ~15 % for ε ≈ 6 and ~35 % for ε ≈ 1.4.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch

from dpaf_ray import cli
from dpaf_ray.config import TrainConfig
from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.privacy.ledger import (
    Gaussian,
    PoissonGaussian,
    PrivacyLedger,
    RepeatAndSelect,
    effective_noise_multiplier,
    rdp_curve,
)
from dpaf_ray.training.checkpoint import LEDGER_FILE, LocalCheckpointSink, read_checkpoint_dir
from dpaf_ray.training.dpaf import DPAFTrainer
from dpaf_ray.release import RELEASE_FILES
from dpaf_ray.training.loop import train_loop
from dpaf_ray.training.plan import plan_training

torch.set_num_threads(1)

DELTA = 1e-5
INT_ORDERS = tuple(range(2, 257))


# ----------------------------------------------------------------- independent accounting


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rdp_poisson_gaussian(q: float, sigma: float, alpha: int) -> float:
    """Mironov et al. 2019, integer α ≥ 2, 0 < q < 1 (exact, in log space)."""
    if q == 1.0:
        return alpha / (2 * sigma ** 2)
    terms = []
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        terms.append(log_binom + (alpha - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0)
                     + (k * k - k) / (2 * sigma ** 2))
    return _logsumexp(terms) / (alpha - 1)


def curve(events: list[tuple[float, float, int]]) -> list[float]:
    """Composed RDP at INT_ORDERS of (q, σ, count) Poisson-Gaussian events."""
    return [sum(c * rdp_poisson_gaussian(q, s, a) for q, s, c in events) for a in INT_ORDERS]


def eps_plain(rdp: list[float], delta: float) -> float:
    return min(r + math.log(1 / delta) / (a - 1) for a, r in zip(INT_ORDERS, rdp))


def eps_improved(rdp: list[float], delta: float) -> float:
    return min(r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a, r in zip(INT_ORDERS, rdp))


def test_independent_rdp_matches_known_values():
    # q = 1: plain Gaussian, RDP = α/(2σ²)
    assert rdp_poisson_gaussian(1.0, 2.0, 7) == pytest.approx(7 / 8)
    # α = 2 closed form: log(1 + q²(e^{1/σ²} - 1))
    q, s = 0.1, 1.3
    assert rdp_poisson_gaussian(q, s, 2) == pytest.approx(math.log(1 + q * q * (math.exp(1 / s ** 2) - 1)))


# --------------------------------------------------------------------------- helpers


def tiny_dataset(n: int = 64, k: int = 3, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % k, k, "tiny")


def make_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=8, group_size=4, seed=5, feature_channels=4, z_dim=8, num_threads=1,
                sigma_agg=2.0, sigma_sgd=1.0, checkpoint_every=500, log_every=10)
    base.update(kw)
    return TrainConfig(**base)


def check_against_independent(ledger: PrivacyLedger, events: list[tuple[float, float, int]], delta: float) -> float:
    """The ledger's ε against our own accountant; returns the ledger's ε."""
    indep = curve(events)
    # same RDP values at the integer orders, to float precision
    assert np.allclose(rdp_curve(ledger.entries, INT_ORDERS), indep, rtol=1e-9, atol=1e-12)
    assert PrivacyLedger(list(ledger.entries), INT_ORDERS).epsilon(delta) == pytest.approx(
        eps_improved(indep, delta), rel=1e-9)
    eps = ledger.epsilon(delta)
    # the ledger's grid adds fractional orders, so its ε can only be lower than the integer-order one
    # (by < 5 % here), and the plain conversion is looser still: by ~15 % at ε ≈ 6, ~27 % at ε ≈ 1.4
    # (the log(1/δ)/(α-1) term dominates at small ε)
    assert eps <= eps_improved(indep, delta) + 1e-9
    assert eps >= 0.9 * eps_improved(indep, delta)
    assert eps <= eps_plain(indep, delta) + 1e-9
    assert eps >= 0.7 * eps_plain(indep, delta)
    return eps


def per_iteration_sigmas(ledger: PrivacyLedger) -> list[tuple[float, float]]:
    out = []
    for e in ledger.entries:
        assert isinstance(e, PoissonGaussian)
        out += [(e.sampling_rate, e.noise_multiplier)] * e.count
    return out


# ------------------------------------------------------------------ rule 9: one σ_eff per iteration


def test_dpaf_iteration_is_charged_as_one_poisson_gaussian_with_sigma_eff(monkeypatch):
    N, B, T, s_agg, s_sgd = 64, 8, 20, 2.0, 1.0
    ds = tiny_dataset(N)
    plan = plan_training(make_cfg(batch_size=B, iterations=T, sigma_agg=s_agg, sigma_sgd=s_sgd, sgd_every=1), N)
    sgd_at: list[int] = []
    orig = DPAFTrainer.private_update

    def spy(self, t, *a):
        sgd_at.append(t)
        return orig(self, t, *a)

    monkeypatch.setattr(DPAFTrainer, "private_update", spy)
    res = train_loop(plan, ds, N, progress=None)
    q, s_eff = B / N, 1.0 / math.sqrt(s_agg ** -2 + s_sgd ** -2)
    assert sgd_at == list(range(T))
    sig = per_iteration_sigmas(res.ledger)
    assert len(sig) == T
    assert all(qq == pytest.approx(q, rel=1e-12) and s == pytest.approx(s_eff, rel=1e-12) for qq, s in sig)

    eps = check_against_independent(res.ledger, [(q, s_eff, T)], DELTA)
    indep = curve([(q, s_eff, T)])

    # DPAGG alone would cost less: the DP-SGD release is not free
    assert eps > PrivacyLedger([PoissonGaussian(q, s_agg, T)]).epsilon(DELTA)
    # The forbidden accounting (two separately subsampled curves added) under-counts: at q = 1/8,
    # T = 20, σ_agg = 2, σ_sgd = 1 it gives ε ≈ 6.0 (plain conversion) against ≈ 7.4 for one
    # subsampled Gaussian with σ_eff ≈ 0.894 (the curves only add up without subsampling, where
    # α/(2σ_eff²) = α/(2σ_agg²) + α/(2σ_sgd²)). The ledger must not match it.
    naive = curve([(q, s_agg, T), (q, s_sgd, T)])
    assert eps_improved(naive, DELTA) < 0.95 * eps_improved(indep, DELTA)
    assert eps > 1.03 * eps_improved(naive, DELTA)


def test_conv2_every_k_charges_sigma_eff_exactly_on_the_dp_sgd_iterations(monkeypatch):
    N, B, T, k, s_agg, s_sgd = 64, 8, 20, 3, 2.0, 1.5
    ds = tiny_dataset(N)
    plan = plan_training(make_cfg(batch_size=B, iterations=T, sigma_agg=s_agg, sigma_sgd=s_sgd, sgd_every=k,
                                  checkpoint_every=7), N)
    sgd_at: list[int] = []
    orig = DPAFTrainer.private_update

    def spy(self, t, *a):
        sgd_at.append(t)
        return orig(self, t, *a)

    monkeypatch.setattr(DPAFTrainer, "private_update", spy)
    res = train_loop(plan, ds, N, progress=None)
    s_eff = effective_noise_multiplier(s_agg, s_sgd)
    assert s_eff == pytest.approx((s_agg ** -2 + s_sgd ** -2) ** -0.5)
    sig = [s for _, s in per_iteration_sigmas(res.ledger)]
    assert len(sig) == T
    assert sum(1 for s in sig if s == pytest.approx(s_eff)) == math.ceil(T / k)
    assert sum(1 for s in sig if s == pytest.approx(s_agg)) == T - math.ceil(T / k)
    charged_eff = [t for t, s in enumerate(sig) if s == pytest.approx(s_eff)]
    assert charged_eff == sgd_at  # σ_eff exactly where the DP-SGD release ran
    q = B / N
    check_against_independent(res.ledger, [(q, s_eff, math.ceil(T / k)), (q, s_agg, T - math.ceil(T / k))], DELTA)


def test_dpsgd_gan_charges_sigma_sgd_every_iteration():
    N, B, T = 64, 8, 6
    plan = plan_training(make_cfg(model="dpsgd-gan", batch_size=B, iterations=T, sigma_sgd=1.1), N)
    res = train_loop(plan, tiny_dataset(N), N, progress=None)
    assert per_iteration_sigmas(res.ledger) == [(B / N, 1.1)] * T


# ------------------------------------------------------------------------ rule 11: JSON


def _mixed_ledger() -> PrivacyLedger:
    led = PrivacyLedger()
    led.charge_poisson_gaussian(0.01, 0.9, 30)
    led.charge_poisson_gaussian(0.01, 0.9, 5)  # merged
    led.charge_poisson_gaussian(0.01, 2.0, 7)
    led.charge_gaussian(40.0)
    led.charge_repeat_and_select([PoissonGaussian(0.01, 1.2, 50), Gaussian(30.0)], mean=4.0, shape=math.inf)
    led.charge_repeat_and_select([PoissonGaussian(0.02, 1.5, 10)], mean=3.0, shape=1.0)
    return led


def test_ledger_json_round_trip(tmp_path):
    led = _mixed_ledger()
    assert isinstance(led.entries[0], PoissonGaussian) and led.entries[0].count == 35
    text = json.dumps(led.to_json())  # plain JSON, no NaN/Infinity tokens
    assert "Infinity" not in text and "NaN" not in text
    back = PrivacyLedger.from_json(json.loads(text))
    assert back.entries == led.entries
    assert back.orders == led.orders
    assert np.array_equal(back.rdp(), led.rdp())
    assert back.epsilon(DELTA) == led.epsilon(DELTA)
    led.save(tmp_path / "l.json")
    loaded = PrivacyLedger.load(tmp_path / "l.json")
    assert loaded.entries == led.entries and loaded.epsilon(1e-6) == led.epsilon(1e-6)
    assert isinstance(loaded.entries[-2], RepeatAndSelect) and math.isinf(loaded.entries[-2].shape)


def test_ledger_epsilon_matches_dp_accounting_composition_directly():
    led = _mixed_ledger()
    acc = dp_accounting.rdp.RdpAccountant(list(led.orders))
    acc.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(0.9)), 35),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(2.0)), 7),
        dp_accounting.GaussianDpEvent(40.0),
        dp_accounting.dp_event.RepeatAndSelectDpEvent(dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.2)), 50),
            dp_accounting.GaussianDpEvent(30.0)]), 4.0, math.inf),
        dp_accounting.dp_event.RepeatAndSelectDpEvent(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.5)), 10), 3.0, 1.0),
    ]))
    assert led.epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert PrivacyLedger().epsilon(DELTA) == 0.0


# ----------------------------------------------- the privacy report of a real `train` run


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    # the brief's command, with a smaller batch so it runs in seconds on 2 CPUs
    rc = cli.main(["train", "--epsilon", "10", "--iterations", "20", "--seed", "1", "--out", str(out),
                   "--num-synthetic", "100", "--checkpoint-every", "10", "--log-every", "10",
                   "--batch-size", "32", "--group-size", "16", "--feature-channels", "4", "--num-threads", "1"])
    assert rc == 0
    return out


def _all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_all_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_all_keys(v) for v in obj)) if obj else set()
    return set()


def test_privacy_report_lets_anyone_recompute_epsilon(cli_run, capsys):
    report = json.loads((cli_run / "release" / "privacy_report.json").read_text())
    for key in ("epsilon", "target_epsilon", "delta", "accountant", "knobs", "events", "assumptions"):
        assert key in report
    assert report["reproducible_noise"] is False and report["private"] is True
    assert report["assumptions"]["data_set_size_public"] == 4000
    assert report["target_epsilon"] == 10 and report["delta"] == 1e-5
    assert "seed" not in _all_keys(report)
    assert "data_root" not in report["knobs"]
    events = report["events"]
    assert events and all(set(e) == {"kind", "sampling_rate", "noise_multiplier", "count"} for e in events)
    assert all(e["kind"] == "poisson_gaussian" for e in events)
    assert sum(e["count"] for e in events) == 20
    n_train = 3600  # q = B / ((1 - f)·N): the public expected size of mnist-5k's 4,000 records minus 10 %
    # the planner set both σs from the budget in the ratio --noise-split (default 1)
    s_agg, s_sgd = report["knobs"]["sigma_agg"], report["knobs"]["sigma_sgd"]
    assert s_agg / s_sgd == pytest.approx(TrainConfig().noise_split)
    s_eff = (s_agg ** -2 + s_sgd ** -2) ** -0.5
    k = TrainConfig().sgd_every  # conv2 (σ_eff) on iterations 0, k, 2k, ...; DPAGG alone (σ_agg) between
    sigmas = [e["noise_multiplier"] for e in events for _ in range(e["count"])]
    assert sigmas == pytest.approx([s_eff if t % k == 0 else s_agg for t in range(20)])
    assert report["epsilon"] >= 0.99 * 10  # the whole budget is spent in the 20 iterations asked for
    for e in events:
        assert e["sampling_rate"] == pytest.approx(32 / n_train)

    # 1) our own accountant, from the events alone
    eps = report["epsilon"]
    assert 0 < eps <= report["target_epsilon"]
    own = PrivacyLedger([PoissonGaussian(e["sampling_rate"], e["noise_multiplier"], e["count"]) for e in events])
    assert check_against_independent(own, [(e["sampling_rate"], e["noise_multiplier"], e["count"])
                                           for e in events], report["delta"]) == pytest.approx(eps, rel=1e-12)
    # 2) dp_accounting directly, on the report's orders and on its default orders
    evs = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        e["sampling_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])), e["count"]) for e in events]
    acc = dp_accounting.rdp.RdpAccountant(report["orders"])
    acc.compose(dp_accounting.ComposedDpEvent(evs))
    assert eps == pytest.approx(acc.get_epsilon(report["delta"]), rel=1e-9)
    acc2 = dp_accounting.rdp.RdpAccountant()
    acc2.compose(dp_accounting.ComposedDpEvent(evs))
    assert eps == pytest.approx(acc2.get_epsilon(report["delta"]), rel=0.05)
    # 3) the `privacy` sub-command agrees
    capsys.readouterr()
    assert cli.main(["privacy", str(cli_run / "release" / "privacy_report.json"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert cli.main(["privacy", str(cli_run)]) == 0  # a readable summary, from the run folder too
    readable = capsys.readouterr().out
    assert f"ε = {eps:.4g} at δ = 1e-05" in readable and "(agrees)" in readable and "private: yes" in readable
    # the metrics and the checkpoint's ledger say the same
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["epsilon"] == pytest.approx(eps, rel=1e-12) and metrics["iterations_executed"] == 20
    ckpt_ledger = PrivacyLedger.from_json(json.loads((cli_run / "checkpoint" / LEDGER_FILE).read_text()))
    assert ckpt_ledger.epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    assert PrivacyLedger.load(cli_run / "ledger.json").epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    assert sorted(p.name for p in (cli_run / "release").iterdir()) == sorted(RELEASE_FILES)


# ------------------------------------------------------ §5: crashes may over-count, never under-count


def test_completed_run_with_checkpoints_charges_exactly_what_ran(tmp_path):
    N, T = 64, 23
    plan = plan_training(make_cfg(iterations=T, checkpoint_every=10), N)
    res = train_loop(plan, tiny_dataset(N), N, sink=LocalCheckpointSink(tmp_path), progress=None)
    assert sum(e.count for e in res.ledger.entries) == T
    state = read_checkpoint_dir(tmp_path / "checkpoint")
    assert state["iteration"] == T
    assert PrivacyLedger.from_json(state["ledger"]).entries == res.ledger.entries
    on_disk = PrivacyLedger.from_json(json.loads((tmp_path / "checkpoint" / LEDGER_FILE).read_text()))
    assert on_disk.entries == res.ledger.entries


def test_crash_inside_a_window_never_under_counts(tmp_path, monkeypatch):
    N, T = 64, 20
    plan = plan_training(make_cfg(iterations=T, checkpoint_every=10, log_every=5), N)
    ds = tiny_dataset(N)
    executed: list[int] = []
    crash = {"at": 15}
    orig = DPAFTrainer.d_iteration

    def d_iteration(self, t):
        if crash["at"] == t:
            crash["at"] = None
            raise RuntimeError("worker died")
        executed.append(t)
        return orig(self, t)

    monkeypatch.setattr(DPAFTrainer, "d_iteration", d_iteration)
    with pytest.raises(RuntimeError, match="worker died"):
        train_loop(plan, ds, N, sink=LocalCheckpointSink(tmp_path), progress=None)
    assert executed == list(range(15))
    res = train_loop(plan, ds, N, sink=LocalCheckpointSink(tmp_path), progress=None)  # resume
    assert executed == list(range(15)) + list(range(10, 20))
    assert res.iterations_done == T
    charged = sum(e.count for e in res.ledger.entries)
    assert charged >= len(executed), f"{len(executed)} iterations ran, {charged} charged"


def test_alternating_mechanisms_compose_like_the_same_events_in_order():
    """k > 1 alternates two mechanisms; ε must equal composing every executed event in order."""
    led = PrivacyLedger()
    for i in range(60):
        led.charge_poisson_gaussian(0.01, 0.8 if i % 2 == 0 else 1.3)
    led.charge_gaussian(20.0)
    led.charge_poisson_gaussian(0.01, 0.8)
    assert len(led.entries) == 62  # the ledger keeps the executed order
    acc = dp_accounting.rdp.RdpAccountant(list(led.orders))
    for e in led.entries:
        acc.compose(e.dp_event())
    assert led.epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    check_against_independent(
        PrivacyLedger([e for e in led.entries if isinstance(e, PoissonGaussian)]),
        [(0.01, 0.8, 31), (0.01, 1.3, 30)], DELTA)
