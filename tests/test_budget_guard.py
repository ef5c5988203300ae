"""What protects a private budget in a user's first hour: a finished run is final, a plan that
cannot learn is refused before anything is charged, and an interruption holds little."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpaf_ray import cli
from dpaf_ray.config import TrainConfig
from dpaf_ray.privacy.ledger import PrivacyLedger
from dpaf_ray.training.loop import WINDOW_SHARE, window_end
from dpaf_ray.training.plan import plan_training

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "8", "--group-size", "4", "--feature-channels", "4", "--num-threads", "1",
         "--num-synthetic", "10", "--seed", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "data"
    for k in range(3):
        d = root / f"c{k}"
        d.mkdir(parents=True)
        for i in range(12):
            Image.new("L", (28, 28), color=(17 * i + 60 * k) % 256).save(d / f"{i}.png")
    return root


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dpaf_ray", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _digest(d: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@pytest.mark.smoke
def test_rerunning_a_finished_out_reports_the_release_and_touches_nothing(tmp_path, images):
    out = tmp_path / "run"
    cmd = ["train", "--dataset", str(images), "--epsilon", "10", "--iterations", "3", "--out", str(out), "--force",
           *SMALL]
    first = _cli(*cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    release, ledger = _digest(out / "release"), (out / "ledger.json").read_bytes()
    again = _cli(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    eps = PrivacyLedger.load(out / "ledger.json").epsilon(1e-5)
    assert str(out / "release") in again.stdout and f"ε={eps:.3f}" in again.stdout, again.stdout
    assert "iter " not in again.stdout  # nothing trained
    assert _digest(out / "release") == release and (out / "ledger.json").read_bytes() == ledger
    # --no-resume cannot rewrite it either
    refused = _cli(*cmd, "--no-resume")
    assert refused.returncode == 2 and "never rewritten" in refused.stderr
    assert _digest(out / "release") == release and (out / "ledger.json").read_bytes() == ledger


@pytest.mark.smoke
def test_a_plan_that_cannot_learn_is_refused_before_anything_is_charged(tmp_path, images):
    """36 records at ε = 1: DPAGG's noise drowns the class means. Exit 2, the fixes in numbers,
    no ledger (nothing charged) and nothing written."""
    out = tmp_path / "run"
    r = _cli("train", "--dataset", str(images), "--epsilon", "1", "--iterations", "400", "--out", str(out), *SMALL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused before anything was charged" in r.stderr and "--force" in r.stderr
    assert "σ_agg/b" in r.stderr and "--epsilon " in r.stderr and "records" in r.stderr
    assert not (out / "ledger.json").exists() and not (out / "release").exists()


def test_a_time_budget_too_short_to_train_is_refused_with_the_minutes_that_would_do(tmp_path, images, monkeypatch,
                                                                                     capsys):
    from dpaf_ray import run

    monkeypatch.setattr(run, "seconds_per_iteration", lambda *a, **k: 0.5)  # a loaded machine
    # The budget covers the whole command: 20 s before the plan (the command's clock) and 10 s for the release.
    clock = iter([0.0, 20.0])
    monkeypatch.setattr(run, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(run, "estimate_release_seconds", lambda *a, **k: 10.0)
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", str(images), "--epsilon", "1e6", "--time-budget-minutes", "2",
                   "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "T = 156 iterations" in err, err  # (2 min · 0.9 − 20 s − 10 s) / 0.5 s
    assert "--time-budget-minutes 5" in err and "--iterations 400" in err  # (400 · 0.5 s + 30 s) / 0.9 → 5 min
    assert not (out / "ledger.json").exists()


@pytest.mark.smoke
def test_default_windows_are_short_at_the_start_and_a_small_share_of_T():
    for T in (20, 100, 900, 2000):
        ends, t = [], 0
        while t < T:
            t = window_end(t, T, None)
            ends.append(t)
        lengths = [b - a for a, b in zip([0] + ends, ends)]
        assert lengths[0] == 1 and ends[-1] == T
        assert max(lengths) <= max(1, WINDOW_SHARE * T)
        assert lengths[:4] == sorted(lengths[:4])  # 1, 1, 2, 4, ... then capped
    assert window_end(0, 900, 500) == 500 and window_end(500, 900, 500) == 900  # --checkpoint-every as given


def test_an_interruption_at_iteration_0_holds_one_short_window_and_rerunning_continues_at_the_same_noise(
        tmp_path, images, monkeypatch, capsys):
    from dpaf_ray.training.dpaf import DPAFTrainer

    T = 60
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(images), "--epsilon", "10", "--iterations", str(T), "--out", str(out),
            "--force", "--log-every", "20", *SMALL]
    original = DPAFTrainer.d_iteration

    def interrupted(self, t):
        raise KeyboardInterrupt

    monkeypatch.setattr(DPAFTrainer, "d_iteration", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    held = PrivacyLedger.load(out / "ledger.json")
    charged = sum(e.count for e in held.entries)
    assert 1 <= charged <= 0.1 * T, charged
    assert f"ε={held.epsilon(1e-5):.3f}" in err and "RDP" in err and "same command" in err, err
    assert not (out / "release").exists()

    monkeypatch.setattr(DPAFTrainer, "d_iteration", original)
    assert cli.main(argv) == 0
    resumed = json.loads((out / "config.json").read_text())
    n_train = 0.9 * 36
    alone = plan_training(TrainConfig(dataset=str(images), epsilon=10, iterations=T, batch_size=8, group_size=4,
                                      feature_channels=4), n_train, 28).config
    for name in ("sigma_agg", "sigma_sgd"):
        assert resumed[name] == pytest.approx(getattr(alone, name), rel=0.02)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["epsilon"] <= 10 * (1 + 1e-6)
