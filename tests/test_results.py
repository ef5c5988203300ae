"""`python -m dpaf_ray results`: the operator's table of a finished search (issue #16)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dpaf_ray.tuning.results import SearchResults


def _trial(out: Path, name: str, score: float, iterations: int, planned: int, stopped: bool) -> None:
    d = out / "trials" / name
    d.mkdir(parents=True)
    (d / "trial.json").write_text(json.dumps({
        "trial": name, "score": score, "epsilon_trial": 3.0 if stopped else 7.0, "epsilon_reference": 7.4,
        "iterations": iterations, "iterations_planned": planned, "stopped_early": stopped, "seconds": 120.0,
        "sampled": {"batch_size": 256}, "knobs": {"sigma_agg": 2.0, "sigma_sgd": 1.0}}))


def _search(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "trials").mkdir(parents=True)
    (out / "trials" / "search_state.json").write_text(json.dumps({"num_trials": 2}))
    (out / "release").mkdir()
    (out / "release" / "score.json").write_text("{}")
    _trial(out, "dpaf_trial_aaaa", 0.6, 400, 400, False)
    _trial(out, "dpaf_trial_bbbb", 0.3, 300, 800, True)
    return out


def test_table_marks_the_best_and_a_trial_stopped_by_its_time_cap(tmp_path):
    results = SearchResults(_search(tmp_path))
    assert results.get_best_result().name == "dpaf_trial_aaaa"
    table = results.table()
    assert "dpaf_trial_aaaa *" in table and "dpaf_trial_bbbb *" not in table
    assert "300/800" in table  # T executed / planned: the budget it did not spend is visible
    assert "dpaf_trial_bbbb: stopped by its time cap after 300 of 800 iterations" in table
    assert "dpaf_trial_aaaa: stopped" not in table
    assert "K = 2 trials" in table


def test_results_command_lists_trials_and_never_writes_into_release(tmp_path):
    out = _search(tmp_path)
    before = {p.name: p.read_bytes() for p in (out / "release").iterdir()}
    r = subprocess.run([sys.executable, "-m", "dpaf_ray", "results", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dpaf_trial_aaaa" in r.stdout and "dpaf_trial_bbbb" in r.stdout
    assert {p.name: p.read_bytes() for p in (out / "release").iterdir()} == before
    assert (out / "trials" / "comparison.png").stat().st_size > 0


def test_results_on_a_folder_without_a_search_says_what_to_pass(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dpaf_ray", "results", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "no search there" in (r.stdout + r.stderr) and "--out of tune.py" in (r.stdout + r.stderr)
