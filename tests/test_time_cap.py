"""A run or trial cut by its wall-clock cap says so (issue #38): on the console when it stops, in the
release summary the CLI prints, in metrics.json and the privacy report, and in the search's summary;
`python -m dpaf_ray results` shows it per trial (tests/test_results.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from dpaf_ray.config import TrainConfig
from dpaf_ray.run import run_train
from dpaf_ray.tuning.results import TrialResult
from dpaf_ray.tuning.tuner import time_cap_lines

REPO = Path(__file__).resolve().parents[1]


def test_a_run_cut_by_its_time_cap_says_so_on_the_console_and_in_its_records(tmp_path, monkeypatch):
    from dpaf_ray.training.dpaf import DPAFTrainer

    original = DPAFTrainer.d_iteration

    def slowed(self, t):  # 0.4 s an iteration: after the first window of 2 (≥ 0.8 s) the 0.6 s cap bites
        time.sleep(0.4)
        return original(self, t)

    monkeypatch.setattr(DPAFTrainer, "d_iteration", slowed)
    lines: list[str] = []
    cfg = TrainConfig(dataset="mnist-5k", epsilon=10, batch_size=32, group_size=16, feature_channels=4, num_threads=1,
                      iterations=6, checkpoint_every=2, log_every=2, seed=0, time_budget_minutes=0.01)
    metrics = run_train(cfg, tmp_path / "r", num_synthetic=50, progress=lines.append, force=True)
    planned = metrics["iterations_planned"]
    assert metrics["stopped_early"] and metrics["iterations_executed"] == 2 < planned

    console = "\n".join(lines)
    stopped = [ln for ln in lines if ln.startswith("STOPPED EARLY")]
    assert len(stopped) == 1 and f"after 2 of {planned} planned iterations" in stopped[0]
    assert "time cap (time budget 0.01 min)" in stopped[0] and "the ledger holds ε=" in stopped[0]
    done = lines.index(next(ln for ln in lines if ln.startswith("done:")))
    assert lines[done + 1].startswith("WARNING: the released generator was cut by the time cap")
    assert "the rest is not" in lines[done + 1], console

    record = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert f"after 2 of {planned} planned iterations" in record["time_cap"]
    report = json.loads((tmp_path / "r" / "release" / "privacy_report.json").read_text())
    assert report["iterations_executed"] == 2 and report["iterations_planned"] == planned
    assert "cut by the time cap" in report["time_cap"]

    again: list[str] = []  # the finished run, rerun, still says it
    run_train(cfg, tmp_path / "r", progress=again.append)
    assert "cut by the time cap" in again[0]


def test_a_run_that_is_not_cut_says_nothing_of_a_cap(tmp_path):
    lines: list[str] = []
    cfg = TrainConfig(dataset="mnist-5k", epsilon=10, batch_size=32, group_size=16, feature_channels=4, num_threads=1,
                      iterations=2, checkpoint_every=2, log_every=2, seed=0, time_budget_minutes=30)
    metrics = run_train(cfg, tmp_path / "r", num_synthetic=50, progress=lines.append, force=True)
    assert not metrics["stopped_early"] and "time_cap" not in metrics
    assert not any("STOPPED EARLY" in ln or "time cap" in ln for ln in lines)
    assert "time_cap" not in json.loads((tmp_path / "r" / "release" / "privacy_report.json").read_text())


def test_the_cli_prints_the_cut_and_the_privacy_summary_shows_it(tmp_path):
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--dataset", "mnist-5k", "--epsilon", "10",
                        "--iterations", "4", "--time-budget-minutes", "1e-7", "--batch-size", "32", "--group-size", "16",
                        "--feature-channels", "4", "--num-threads", "1", "--checkpoint-every", "2", "--num-synthetic",
                        "50", "--seed", "0", "--force", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    # the cap bites at the first window boundary it is checked at past 6 µs: iteration 0 or 2
    assert re.search(r"STOPPED EARLY: cut by the time cap \(time budget 1e-07 min\) after [02] of 4 planned", r.stdout)
    assert "WARNING: the released generator was cut by the time cap" in r.stdout
    s = subprocess.run([sys.executable, "-m", "dpaf_ray", "privacy", str(out / "release" / "privacy_report.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert s.returncode == 0, s.stderr
    assert "time cap: cut by the time cap" in s.stdout


def _trial(name: str, score: float, done: int, planned: int) -> TrialResult:
    return TrialResult(name, "finished", score, iterations=done, iterations_planned=planned,
                       stopped_early=done < planned)


def test_the_search_summary_names_the_released_trial_cut_and_counts_the_cut_ones(tmp_path):
    best, other = _trial("t_best", 0.6, 200, 400), _trial("t_other", 0.3, 400, 400)
    lines = time_cap_lines([best, other], best, tmp_path, released_is_best=True)
    assert "the released trial t_best was cut by its time cap after 200 of 400 planned iterations" in lines[0]
    assert "1 of 2 trials were cut by trial.time_budget_minutes" in lines[1]
    assert f"python -m dpaf_ray results {tmp_path}" in lines[1]
    assert time_cap_lines([_trial("a", 0.6, 400, 400)], None, tmp_path, True) == []
    cut_not_released = time_cap_lines([other, _trial("t_cut", 0.1, 100, 400)], other, tmp_path, True)
    assert len(cut_not_released) == 1 and "1 of 2 trials" in cut_not_released[0]


# ---------------------------------------------------------------- --time-budget-minutes covers the whole command


def test_the_plan_takes_the_command_s_time_outside_the_loop_off_the_budget():
    from dpaf_ray.training.plan import TIME_RESERVE_FRACTION, plan_training

    cfg = TrainConfig(epsilon=10, batch_size=32, group_size=16, feature_channels=4, seed=0, time_budget_minutes=2)
    usable = 2 * 60 * (1 - TIME_RESERVE_FRACTION)
    spent = plan_training(cfg, 3600, 28, seconds_per_iteration=0.5, overhead_seconds=30.0)
    assert spent.iterations == int((usable - 30) / 0.5) and spent.overhead_seconds == 30
    assert "less 30 s of start-up, probe and release" in spent.how
    assert plan_training(cfg, 3600, 28, 0.5, overhead_seconds=0.0).iterations == int(usable / 0.5)


def test_prepare_measures_what_was_spent_before_training_and_reserves_the_release(monkeypatch):
    from dpaf_ray import run

    monkeypatch.setattr(run, "seconds_per_iteration", lambda *a, **k: 0.5)
    monkeypatch.setattr(run, "estimate_release_seconds", lambda *a, **k: 5.0)
    cfg = TrainConfig(dataset="mnist-5k", epsilon=10, batch_size=32, group_size=16, feature_channels=4, seed=0,
                      time_budget_minutes=2)
    before = time.monotonic()
    _, _, plan, _ = run.prepare(cfg, started=before - 40.0, num_synthetic=100)
    spent = time.monotonic() - before + 40.0
    assert 45.0 <= plan.overhead_seconds <= spent + 5.0  # 40 s before, the loading, and the release's 5 s
    assert plan.iterations == int((2 * 60 * 0.9 - plan.overhead_seconds) / 0.5)
    _, _, unmeasured, _ = run.prepare(cfg)  # no start time (a caller that does not cover its start-up)
    assert unmeasured.overhead_seconds is None and unmeasured.iterations > plan.iterations


def test_the_loop_stops_where_the_budget_less_the_release_runs_out():
    import dataclasses

    import torch

    from dpaf_ray.data.dataset import ImageDataset
    from dpaf_ray.training.loop import train_loop
    from dpaf_ray.training.plan import plan_training

    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (200, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.randint(0, 3, (200,), generator=g), 3, "random")
    cfg = TrainConfig(batch_size=32, group_size=16, seed=1, iterations=4, checkpoint_every=2, log_every=2,
                      num_threads=1, epsilon=50, time_budget_minutes=1)
    plan = plan_training(cfg, len(ds))
    assert not train_loop(plan, ds, len(ds), progress=None).stopped_early
    lines: list[str] = []
    cut = train_loop(dataclasses.replace(plan, overhead_seconds=60.0), ds, len(ds), progress=lines.append)
    assert cut.stopped_early and cut.iterations_done == 0 and sum(e.count for e in cut.ledger.entries) == 0
    assert any(ln.startswith("STOPPED EARLY") and "after 0 of 4" in ln for ln in lines)


def test_the_preflight_fix_for_a_short_budget_counts_the_time_outside_the_loop():
    import math

    import pytest

    from dpaf_ray.training.plan import plan_training
    from dpaf_ray.training.preflight import MIN_TIME_BUDGET_ITERATIONS, PreflightError, preflight

    cfg = TrainConfig(epsilon=10, batch_size=32, group_size=16, feature_channels=4, seed=0, time_budget_minutes=1)
    plan = plan_training(cfg, 3600, 28, seconds_per_iteration=0.1, overhead_seconds=600.0)
    with pytest.raises(PreflightError) as err:
        preflight(plan, 3600, 10, 28, 0.1)
    minutes = math.ceil((MIN_TIME_BUDGET_ITERATIONS * 0.1 + 600) / 0.9 / 60)
    assert f"--time-budget-minutes {minutes}" in str(err.value)


def test_the_release_estimate_is_measured_and_grows_with_the_synthetic_set():
    from dpaf_ray.release import estimate_release_seconds

    small = estimate_release_seconds((1, 28, 28), 3, 50, sample=50)
    assert 0 < small < estimate_release_seconds((1, 28, 28), 3, 50_000, sample=50)
