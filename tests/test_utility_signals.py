"""Issue #13: the label-classifier phase (a DP-SGD classifier that teaches G) keeps docs/design.md §3.

Each test is built so that a plausible bug fails it: a gradient sum that one record moves by more
than C_c, generated images inside the classifier's clipped sum, a normaliser that uses the realised
batch, an empty sample that is skipped, the classifier sampled from DPAGG's Poisson stream, a phase
that runs without being charged (or charged at DPAGG's q), a ledger that differs from an
independent dp_accounting computation of what ran, a planner that stops spending the budget.
"""
from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch

from dpaf_ray import cli
from dpaf_ray.config import ConfigError, TrainConfig
from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.privacy.calibration import IterationSchedule, Phase
from dpaf_ray.privacy.ledger import PoissonGaussian, PrivacyLedger, effective_noise_multiplier
from dpaf_ray.privacy.mechanisms import clip_and_sum_per_record
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.release import sample_synthetic
from dpaf_ray.training import label_teacher as teacher_module
from dpaf_ray.training.dpaf import DPAFTrainer
from dpaf_ray.training.loop import train_loop
from dpaf_ray.training.plan import plan_training

torch.set_num_threads(1)
SECRET = RunSecret.from_public_seed(0)  # tests only: reproducible noise
DELTA = 1e-5


def tiny_dataset(n: int = 60, k: int = 3, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % k
    return ImageDataset(images, labels[torch.randperm(n, generator=g)], k, "tiny")


DS = tiny_dataset()


def make_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=12, group_size=4, seed=3, feature_channels=4, z_dim=8, num_threads=1,
                classifier_steps=4, classifier_batch=20, classifier_clip=0.5, sigma_agg=2.0, sigma_sgd=1.0)
    base.update(kw)
    return TrainConfig(**base).validate()


def make_trainer(ds: ImageDataset = DS, **kw) -> DPAFTrainer:
    cfg = make_cfg(**kw)
    return DPAFTrainer(cfg, ds, len(ds), secret=SECRET, classifier_sampling_rate=cfg.classifier_batch / len(ds))


def capture(monkeypatch, name: str) -> list[dict]:
    """Spy on a function used by the label teacher (clip_and_sum_per_record or gaussian_release)."""
    seen: list[dict] = []
    original = getattr(teacher_module, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append({"args": args, "out": [o.detach().clone() for o in out]})
        return out

    monkeypatch.setattr(teacher_module, name, spy)
    return seen


def norm(tensors) -> float:
    return math.sqrt(sum(t.pow(2).sum().item() for t in tensors))


# ------------------------------------------------------------------ sensitivity of the release


def test_classifier_clipped_sum_moves_by_at_most_c_when_one_record_is_added_or_removed(monkeypatch):
    clip = 0.05  # far below typical cross-entropy gradient norms, so every record is clipped
    tr = make_trainer(classifier_clip=clip, classifier_batch=40)
    seen = capture(monkeypatch, "clip_and_sum_per_record")
    tr.d_iteration(0)
    grads = seen[0]["args"][0]
    n = grads[0].shape[0]
    assert n >= 10 and seen[0]["args"][1] == clip
    raw = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    assert (raw > clip).all(), "the test needs gradients above the bound"
    full = clip_and_sum_per_record(grads, clip)
    worst = 0.0
    for j in range(n):  # remove record j
        keep = torch.tensor([i for i in range(n) if i != j])
        d = norm(f - l for f, l in zip(full, clip_and_sum_per_record([g[keep] for g in grads], clip)))
        assert d <= clip * (1 + 1e-5), (j, d)
        worst = max(worst, d)
    assert worst >= 0.99 * clip
    # add a record whose gradient is enormous: still moves the sum by C_c at most
    x = DS.as_float(torch.arange(1)) * 1e4
    big = tr.teacher.per_record((x,), teacher_module.record_loss, (DS.labels[:1],))
    more = clip_and_sum_per_record([torch.cat([g, b]) for g, b in zip(grads, big)], clip)
    assert norm(m - f for m, f in zip(more, full)) <= clip * (1 + 1e-5)


def test_a_record_gradient_depends_only_on_that_record():
    tr = make_trainer()
    idx_a, idx_b = torch.tensor([5, 0, 1, 2]), torch.tensor([7, 8, 9, 5])
    ga = tr.teacher.per_record((DS.as_float(idx_a),), teacher_module.record_loss, (DS.labels[idx_a],))
    gb = tr.teacher.per_record((DS.as_float(idx_b),), teacher_module.record_loss, (DS.labels[idx_b],))
    for a, b in zip(ga, gb):  # record 5 first in one batch, last in the other
        assert torch.allclose(a[0], b[-1], rtol=1e-5, atol=1e-7)


def test_release_noise_is_sigma_c_times_c_and_the_update_divides_by_the_expected_batch(monkeypatch):
    B, clip, sigma = 20, 0.5, 40.0
    tr = make_trainer(classifier_batch=B, classifier_clip=clip, sigma_sgd=sigma / 2, classifier_noise=2.0)
    assert tr.teacher.sigma == pytest.approx(sigma)  # σ_c = classifier_noise · σ_sgd
    releases = capture(monkeypatch, "gaussian_release")
    steps: list[torch.Tensor] = []
    monkeypatch.setattr(tr.teacher.opt, "step",
                        lambda *a, **k: steps.append(torch.cat([p.grad.reshape(-1) for p in tr.teacher.model.parameters()])))
    t = next(t for t in range(tr.prefix_iterations)
             if tr.real_sample(t, stream=teacher_module.POISSON_STREAM, q=tr.teacher.q).x.shape[0] != B)
    tr.d_iteration(t)
    (rel,) = releases
    assert rel["args"][1] == pytest.approx(sigma * clip)  # noise std σ_c·C_c
    grad = steps[0]
    assert grad.numel() > 20_000
    # the gradient is noise/B (the signal is at most C_c·n/B ≪ the noise): std σ_c·C_c/B, not /n
    assert (grad.std() * B).item() == pytest.approx(sigma * clip, rel=0.05)


def test_an_empty_classifier_sample_still_releases_and_updates(monkeypatch):
    ds = tiny_dataset(40, seed=8)
    cfg = make_cfg(classifier_batch=1, classifier_steps=60)
    tr = DPAFTrainer(cfg, ds, len(ds), secret=SECRET, classifier_sampling_rate=1 / 40)
    empty = [t for t in range(60)
             if tr.real_sample(t, stream=teacher_module.POISSON_STREAM, q=tr.teacher.q).x.shape[0] == 0]
    assert empty
    seen = capture(monkeypatch, "clip_and_sum_per_record")
    before = [p.detach().clone() for p in tr.teacher.model.parameters()]
    tr.d_iteration(empty[0])
    assert len(seen) == 1 and seen[0]["args"][0][0].shape[0] == 0  # released on n = 0
    assert any(not torch.equal(b, a) for b, a in zip(before, tr.teacher.model.parameters()))


# ------------------------------------------------------- generated records stay outside the sum


def test_phase_one_never_runs_the_generator_and_clips_exactly_its_own_poisson_sample(monkeypatch):
    tr = make_trainer()
    seen = capture(monkeypatch, "clip_and_sum_per_record")

    def no_generator(*a, **k):
        raise AssertionError("the generator ran during the classifier phase")

    monkeypatch.setattr(tr.generator, "forward", no_generator)
    for t in range(tr.prefix_iterations):
        seen.clear()
        own = tr.real_sample(t, stream=teacher_module.POISSON_STREAM, q=tr.teacher.q)
        tr.d_iteration(t)
        assert tr.g_step(t) == {}
        assert len(seen) == 1 and all(g.shape[0] == own.x.shape[0] for g in seen[0]["args"][0])


def test_phase_two_never_updates_the_classifier_and_g_gets_its_gradient(monkeypatch):
    tr = make_trainer(classifier_steps=2)
    for t in range(2):
        tr.d_iteration(t)
    frozen = [p.detach().clone() for p in tr.teacher.model.parameters()]
    seen = capture(monkeypatch, "clip_and_sum_per_record")
    g_before = [p.detach().clone() for p in tr.generator.parameters()]
    for t in range(2, 6):
        tr.d_iteration(t)
        stats = tr.g_step(t)
        assert "loss_classifier" in stats
    assert not seen, "the classifier made a release after its phase"
    assert all(torch.equal(a, b) for a, b in zip(frozen, tr.teacher.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, tr.generator.parameters()))


def test_gs_classifier_loss_is_the_frozen_classifiers_cross_entropy():
    """G's loss from the frozen classifier: its cross-entropy on G's images over the public batch size."""
    tr = make_trainer(classifier_steps=2)
    for t in range(2):
        tr.d_iteration(t)
    xf = torch.rand(6, 1, 28, 28, requires_grad=True)
    yf = torch.arange(6) % 3
    ce = torch.nn.functional.cross_entropy(tr.teacher.model(xf), yf, reduction="none").detach()
    assert torch.allclose(tr.teacher.generator_loss(xf, yf), ce.sum() / tr.fake_batch)


def test_classifier_samples_come_from_their_own_stream():
    tr = make_trainer(batch_size=20, classifier_batch=20)
    same_q = tr.teacher.q
    assert same_q == pytest.approx(tr.q)
    dpagg = [tr.real_sample(t).x for t in range(4)]
    own = [tr.real_sample(t, stream=teacher_module.POISSON_STREAM, q=same_q).x for t in range(4)]
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(dpagg, own))


# --------------------------------------------------------------------- charged, and exactly


def independent_epsilon(q_c, sigma_c, P, q, sigma_agg, sigma_sgd, k, T) -> float:
    """ε of P classifier steps then T DPAF iterations, composed directly with dp_accounting."""
    eff = effective_noise_multiplier(sigma_agg, sigma_sgd)
    n_eff = sum(1 for u in range(T) if u % k == 0)
    events = [dp_accounting.SelfComposedDpEvent(
                  dp_accounting.PoissonSampledDpEvent(q_c, dp_accounting.GaussianDpEvent(sigma_c)), P),
              dp_accounting.SelfComposedDpEvent(
                  dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(eff)), n_eff),
              dp_accounting.SelfComposedDpEvent(
                  dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma_agg)), T - n_eff)]
    acc = dp_accounting.rdp.RdpAccountant(list(PrivacyLedger().orders))
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(DELTA)


def test_the_loop_charges_the_classifier_phase_and_the_ledger_matches_dp_accounting(monkeypatch):
    ds = tiny_dataset(60)
    cfg = make_cfg(iterations=5, classifier_steps=3, classifier_batch=15, classifier_noise=1.5, epsilon=50.0,
                   checkpoint_every=4, sgd_every=2)  # explicit σs: T as given, checked against the budget
    plan = plan_training(cfg, len(ds))
    assert plan.iterations == 8 and plan.schedule.prefix_iterations == 3
    c = plan.config
    q_c, q = 15 / 60, 12 / 60
    assert plan.schedule.release_at(0) == (pytest.approx(q_c), pytest.approx(1.5 * c.sigma_sgd))
    assert plan.schedule.release_at(3) == (pytest.approx(q), pytest.approx(effective_noise_multiplier(
        c.sigma_agg, c.sigma_sgd)))
    assert plan.schedule.release_at(4)[1] == pytest.approx(c.sigma_agg)
    ran: list[tuple[int, str]] = []
    orig_step, orig_d = teacher_module.LabelTeacher.private_step, DPAFTrainer.private_update

    def step(self, t):
        ran.append((t, "classifier"))
        return orig_step(self, t)

    def conv2(self, t, *a):
        ran.append((t, "conv2"))
        return orig_d(self, t, *a)

    monkeypatch.setattr(teacher_module.LabelTeacher, "private_step", step)
    monkeypatch.setattr(DPAFTrainer, "private_update", conv2)
    result = train_loop(plan, ds, len(ds), progress=None, secret=SECRET)
    assert ran == [(0, "classifier"), (1, "classifier"), (2, "classifier"), (3, "conv2"), (5, "conv2"), (7, "conv2")]
    entries = [e for e in result.ledger.entries if isinstance(e, PoissonGaussian)]
    assert entries[0] == PoissonGaussian(q_c, 1.5 * c.sigma_sgd, 3)
    assert sum(e.count for e in entries) == 8
    expected = independent_epsilon(q_c, 1.5 * c.sigma_sgd, 3, q, c.sigma_agg, c.sigma_sgd, 2, 5)
    assert result.ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    assert result.ledger.epsilon(DELTA) <= 50.0


def test_progress_names_the_classifier_phase_instead_of_printing_nan_losses():
    cfg = make_cfg(iterations=2, classifier_steps=2, classifier_batch=15, epsilon=50.0, log_every=1)
    lines: list[str] = []
    train_loop(plan_training(cfg, len(DS)), DS, len(DS), progress=lines.append, secret=SECRET)
    assert len(lines) == 4 and not any("nan" in line for line in lines)
    assert all("label classifier phase" in line for line in lines[:2])
    assert all("loss_d" in line and "loss_g" in line for line in lines[2:])


def test_the_planner_scales_every_sigma_together_and_spends_the_budget():
    n, epsilon = 0.9 * 60000, 1.0
    cfg = TrainConfig(epsilon=epsilon, delta=DELTA, seed=0, classifier_steps=300, classifier_noise=2.0, noise_split=2.0)
    plan = plan_training(cfg, n)
    c = plan.config
    assert plan.iterations == 300 + 900 and c.iterations == 900
    q_c, sigma_c = plan.schedule.release_at(0)
    assert q_c == pytest.approx(1024 / n) and sigma_c == pytest.approx(2.0 * c.sigma_sgd)
    assert c.sigma_agg / c.sigma_sgd == pytest.approx(cfg.noise_split)
    e = independent_epsilon(q_c, sigma_c, 300, 256 / n, c.sigma_agg, c.sigma_sgd, 2, 900)
    assert 0.99 * epsilon <= e <= epsilon
    # the phase is charged, not free: the DPAF iterations alone spend noticeably less
    dpaf_only = [e for e in plan.schedule.entries(plan.iterations) if e.sampling_rate != q_c]
    assert PrivacyLedger(dpaf_only).epsilon(DELTA) < 0.9 * epsilon


def test_schedule_prefix_entries_scaling_and_release_at_agree():
    s = IterationSchedule.dpaf(0.01, 2.0, 1.0, 3).with_prefix(Phase(0.02, 1.5, 4))
    assert [s.release_at(i) for i in range(6)] == [(0.02, 1.5)] * 4 + [(0.01, s.cycle[0]), (0.01, 2.0)]
    for T in (2, 4, 11):
        led = PrivacyLedger()
        for i in range(T):
            led.charge_poisson_gaussian(*s.release_at(i))
        assert led.epsilon(DELTA) == pytest.approx(PrivacyLedger(s.entries(T)).epsilon(DELTA), rel=1e-12)
    s2 = s.scaled(2.0)
    assert s2.prefix[0].noise == 3.0 and s2.cycle[1] == 4.0 and s2.prefix[0].sampling_rate == 0.02


def test_explicit_noise_leaves_the_gan_iterations_after_the_phase():
    kw = dict(epsilon=2.0, delta=DELTA, seed=0, sigma_agg=4.0, sigma_sgd=2.0, classifier_batch=600, batch_size=64,
              group_size=32, classifier_noise=1.0)
    plan = plan_training(TrainConfig(classifier_steps=20, **kw), 6000)
    assert plan.config.iterations == plan.iterations - 20 >= 1
    assert PrivacyLedger(plan.schedule.entries(plan.iterations)).epsilon(DELTA) <= 2.0
    with pytest.raises(ConfigError, match="--classifier-steps"):  # the phase alone would spend the budget
        plan_training(TrainConfig(classifier_steps=200, **kw), 6000)


# -------------------------------------------------------------------------------- knobs


def test_knobs_are_validated_and_reach_the_cli():
    with pytest.raises(ConfigError, match="--classifier-steps"):
        TrainConfig(model="dpsgd-gan", classifier_steps=10).validate()
    with pytest.raises(ConfigError, match="--classifier-lr"):
        TrainConfig(classifier_lr=0.0).validate()
    with pytest.raises(ConfigError, match="--classifier-batch"):
        TrainConfig(classifier_steps=1, classifier_batch=10_000).validate(5000)
    args = cli.build_parser().parse_args(["train", "--out", "x", "--classifier-steps", "7", "--classifier-noise",
                                          "1.5", "--classifier-weight", "0.5"])
    cfg = cli.config_from_args(args)
    knobs = (cfg.classifier_steps, cfg.classifier_noise, cfg.classifier_weight)
    assert knobs == (7, 1.5, 0.5)


def test_checkpoint_carries_the_classifier():
    a = make_trainer()
    a.d_iteration(0)
    b = make_trainer()
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.teacher.model.parameters(), b.teacher.model.parameters()):
        assert torch.equal(pa, pb)


# ------------------------------------ the release: the DP classifier labels the synthetic set


def trained_release(tmp_path, **kw):
    """A trainer after its classifier phase and two GAN iterations, and its release saved and loaded."""
    from dpaf_ray.models.generator import load_generator

    tr = make_trainer(classifier_steps=2, **kw)
    for t in range(4):
        tr.d_iteration(t)
        tr.g_step(t)
    released = tr.released_generator()
    released.save(tmp_path / "generator.pt")
    return tr, released, load_generator(tmp_path / "generator.pt")


def test_the_released_labeller_is_the_frozen_phase_one_classifier_and_g_is_untouched(tmp_path):
    """What the release ships beyond G is exactly the classifier that phase one's charged DP-SGD steps
    made (phase two never changes it), so labelling with it is post-processing."""
    tr = make_trainer(classifier_steps=2)
    for t in range(2):
        tr.d_iteration(t)
    after_phase_one = {k: v.clone() for k, v in tr.teacher.model.state_dict().items()}
    for t in range(2, 5):
        tr.d_iteration(t)
        tr.g_step(t)
    released = tr.released_generator()
    assert released is not tr.generator and tr.generator.labeller is None  # training's G carries nothing
    assert all(torch.equal(after_phase_one[k], v) for k, v in released.labeller.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(tr.generator.parameters(),
                                                 [p for n, p in released.named_parameters() if not n.startswith("labeller.")]))
    assert not any(p.requires_grad for p in released.labeller.parameters())


def label_codes_used(generator, monkeypatch, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, the label code of each image), spying on G's decoder."""
    codes: list[torch.Tensor] = []
    decode = generator.decode

    def spy(z, label_codes):
        codes.append(label_codes.detach().clone())
        return decode(z, label_codes)

    monkeypatch.setattr(generator, "decode", spy)
    x, y = sample_synthetic(generator, n, seed=seed)
    return x, y, torch.cat(codes)


def is_a_class_code(generator, codes: torch.Tensor) -> torch.Tensor:
    rows = generator.label_embedding.weight.detach()
    return (codes[:, None, :] - rows[None]).abs().amax(2).min(1).values < 1e-6


def test_every_synthetic_label_is_the_classifiers_and_half_the_codes_lie_between_classes(tmp_path, monkeypatch):
    tr, released, loaded = trained_release(tmp_path, uncertain_fraction=0.0)
    x, y, codes = label_codes_used(released, monkeypatch, 400, seed=5)
    between = ~is_a_class_code(released, codes)
    assert 150 < int(between.sum()) < 250  # Binomial(400, ~0.5 less the draws with y1 = y2)
    with torch.no_grad():
        assert torch.equal(y, released.labeller(x).argmax(1))
    _, _, pure_codes = label_codes_used(tr.generator.with_labeller(tr.teacher.model, 0.0), monkeypatch, 100, seed=1)
    assert bool(is_a_class_code(released, pure_codes).all())
    xl, yl = sample_synthetic(loaded, 400, seed=5)  # the saved release draws the same set
    assert torch.equal(yl, y) and torch.allclose(xl, x)


def test_without_a_labeller_the_synthetic_set_is_gs_asked_classes(tmp_path):
    tr, _, _ = trained_release(tmp_path, classifier_labels=False)
    released = tr.released_generator()
    assert released.labeller is None
    x, y = sample_synthetic(released, 50, seed=2)
    x2, y2 = released.sample(50, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    no_phase = make_trainer(classifier_steps=0)
    assert no_phase.released_generator().labeller is None


def test_least_certain_takes_the_smallest_margins_evenly_per_label_and_fills_a_short_class():
    from dpaf_ray.release import least_certain

    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 1)
    margin = torch.rand(21, generator=torch.Generator().manual_seed(0))
    pick = least_certain(labels, margin, 9, 3)  # 3 per label; label 2 has one, two more from the rest
    assert len(pick) == len(set(pick.tolist())) == 9
    assert 20 in pick.tolist()
    for c in (0, 1):
        idx = (labels == c).nonzero().flatten()
        lowest = set(idx[margin[idx].argsort()[:3]].tolist())
        assert lowest <= set(pick.tolist())
    left = sorted(set(range(21)) - set(pick.tolist()), key=lambda i: margin[i])
    extra = set(pick.tolist()) - {20} - {i for c in (0, 1) for i in
                                         (labels == c).nonzero().flatten()[margin[labels == c].argsort()[:3]].tolist()}
    assert len(extra) == 2 and max(margin[list(extra)]) <= margin[left[0]]


def test_the_uncertain_share_is_the_classifiers_least_sure_images_labelled_by_it(tmp_path):
    """Post-processing of the two releases only: the chosen images are G's, labelled by the classifier's
    argmax; their margins are the pool's smallest; the set has exactly n images and the saved release
    draws it again."""
    _, released, loaded = trained_release(tmp_path, uncertain_fraction=0.5)
    assert loaded.uncertain_fraction == 0.5
    x, y = sample_synthetic(released, 300, seed=4)
    assert x.shape[0] == y.shape[0] == 300
    with torch.no_grad():
        probs = released.labeller(x).softmax(1)
    assert torch.equal(y, probs.argmax(1))
    top2 = probs.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    assert margin[150:].mean() < margin[:150].mean()  # the chosen half is less certain than a plain draw
    xl, yl = sample_synthetic(loaded, 300, seed=4)
    assert torch.equal(yl, y) and torch.allclose(xl, x)
    none = released.with_labeller(released.labeller, released.between_class_fraction, 0.0)
    assert sample_synthetic(none, 10, seed=4)[0].shape[0] == 10


def test_between_class_fraction_is_validated_and_reaches_the_cli():
    with pytest.raises(ConfigError, match="--uncertain-fraction"):
        TrainConfig(uncertain_fraction=-0.1).validate()
    assert cli.config_from_args(cli.build_parser().parse_args(
        ["train", "--out", "x", "--uncertain-fraction", "0"])).uncertain_fraction == 0
    with pytest.raises(ConfigError, match="--between-class-fraction"):
        TrainConfig(between_class_fraction=1.5).validate()
    args = cli.build_parser().parse_args(["train", "--out", "x", "--between-class-fraction", "0.2",
                                          "--no-classifier-labels"])
    cfg = cli.config_from_args(args)
    assert (cfg.between_class_fraction, cfg.classifier_labels) == (0.2, False)


def test_a_run_with_the_phase_releases_the_labelled_set_its_generator_pt_redraws(tmp_path):
    """Through the train path: the release's synthetic labels are the shipped classifier's, the
    shipped classifier is the checkpoint's, and the ledger charged its DP-SGD steps."""
    import dpaf_ray
    from dpaf_ray.data import load_dataset
    from dpaf_ray.models.generator import load_generator
    from dpaf_ray.training.checkpoint import LocalCheckpointSink
    from dpaf_ray.release import SYNTHETIC_SEED

    run = dpaf_ray.train("mnist-5k", epsilon=10, out=tmp_path / "run", iterations=2, classifier_steps=3,
                         classifier_batch=256, batch_size=64, group_size=32, num_threads=1, num_synthetic=120, progress=None)
    released = load_generator(run.release_path / "generator.pt")
    assert released.labeller is not None and released.between_class_fraction == 0.5
    table = load_dataset(str(run.release_path / "synthetic.parquet"), "train")
    x, y = sample_synthetic(released, 120, seed=SYNTHETIC_SEED)
    assert torch.equal(table.labels, y)
    with torch.no_grad():  # the classifier's labels of the published (uint8-rounded) images
        assert (released.labeller(table.as_float(torch.arange(120))).argmax(1) == y).float().mean() > 0.95
    state = LocalCheckpointSink(run.path, True).latest()["trainer"]["modules"]["classifier"]
    assert all(torch.equal(state[k], v) for k, v in released.labeller.state_dict().items())
    events = json.loads((run.release_path / "privacy_report.json").read_text())["events"]
    assert any(e.get("count") == 3 and e["sampling_rate"] == pytest.approx(256 / 3600, rel=0.05) for e in events
               if e["kind"] == "poisson_gaussian"), events
    knobs = json.loads((run.release_path / "privacy_report.json").read_text())["knobs"]
    assert knobs["classifier_labels"] is True and knobs["between_class_fraction"] == 0.5


def test_a_nearly_empty_class_in_the_classifier_labelled_set_is_reported():
    from types import SimpleNamespace

    from dpaf_ray.release import label_balance_warning

    labelled = SimpleNamespace(labeller=object())  # a release that carries its DP classifier
    images = torch.zeros(300, 1, 28, 28, dtype=torch.uint8)
    even = ImageDataset(images, torch.arange(300) % 3, 3, "synthetic")
    assert label_balance_warning(labelled, even) is None
    skewed = ImageDataset(images, torch.tensor([0] * 200 + [1] * 90 + [2] * 10), 3, "synthetic")
    warning = label_balance_warning(labelled, skewed)
    assert warning and "[2]" in warning and "10 of 300" in warning and "--no-classifier-labels" in warning
    assert label_balance_warning(SimpleNamespace(labeller=None), skewed) is None  # G's asked classes


def test_a_search_release_repeats_its_best_trials_label_balance_warning(tmp_path):
    """A search releases the best trial's files; the warning its trial recorded must reach the user."""
    from dpaf_ray.release import write_artefacts
    from dpaf_ray.tuning.search_space import load_search_space
    from dpaf_ray.tuning.reference import plan_search
    from dpaf_ray.tuning.tuner import finish_search

    _, released, _ = trained_release(tmp_path)
    ss = load_search_space("search_spaces/tiny.yaml")
    state = {**plan_search(ss, 5000, (1, 28, 28), 10), "n_records": 5000, "image_shape": [1, 28, 28],
             "num_classes": 10, "num_trials": 2}  # the drawn K covers both trial folders below
    for name, warning in (("t0", None), ("t1", "class(es) [2] nearly empty")):
        trial = tmp_path / "out" / "trials" / name
        write_artefacts(trial, released, 30)
        (trial / "trial.json").write_text(json.dumps(
            {"trial": name, "score": 0.5 if warning else 0.4, "score_kind": "noisy", "score_noise_multiplier": 20.0,
             "expected_validation": 500, "epsilon_trial": 1.0, "epsilon_reference": 1.0, "iterations": 5,
             "knobs": {}, "sampled": {}, "warning": warning}))
    said: list[str] = []
    finish_search(ss, state, tmp_path / "out", None, said.append)
    assert said[-1] == "WARNING: class(es) [2] nearly empty", said


