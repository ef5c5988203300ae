"""bench/heldout.py's table: the ratio is release over DP classifier at the same set and ε, and a
cell without both runs is named as missing instead of being left out silently."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
heldout = pytest.importorskip("heldout")


def _write(results: Path, name: str, **fields) -> None:
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f"{name}.json").write_text(json.dumps(fields))


def test_ratio_and_missing_cells(tmp_path):
    common = {"delta": 1e-5, "epsilon_spent": 9.99, "commands": []}
    for seed, acc in [(0, 0.60), (1, 0.70)]:
        _write(tmp_path, f"a_release_{seed}", set="glyphs-8k", kind="release", epsilon_target=10.0, seed=seed,
               accuracy=acc, train_s=1, eval_s=1, plan=["plan: T=900 iterations (x)"], **common)
    _write(tmp_path, "a_dpsgd", set="glyphs-8k", kind="dpsgd", epsilon_target=10.0, seed=0, accuracy=0.80,
           wall_s=1, **common)
    _write(tmp_path, "b_dpsgd", set="digits-28", kind="dpsgd", epsilon_target=1.0, seed=0, accuracy=0.5,
           wall_s=1, **common)
    cells = {(c["set"], c["epsilon"]): c for c in heldout.cells(heldout.load_results(tmp_path),
                                                                  ["glyphs-8k", "digits-28"], [10.0, 1.0])}
    assert cells[("glyphs-8k", 10.0)]["ratio"] == pytest.approx(0.65 / 0.80)
    assert cells[("digits-28", 1.0)]["ratio"] is None
    text = heldout.write_table(tmp_path, ["glyphs-8k", "digits-28"], [10.0, 1.0]).read_text()
    assert "**0.81**" in text
    assert "Partial table" in text and "digits-28 ε = 1 (release)" in text and "glyphs-8k ε = 1 (release, dpsgd)" in text


def test_a_refused_plan_is_shown_as_refused_with_its_fixes_not_as_missing_or_zero(tmp_path):
    """The pre-flight's refusal is the default's answer for that (N, ε): the cell says so, with the fixes
    it named, and neither averages a 0 % into the release nor reads as not measured."""
    refusal = ("error: refused before anything was charged: this plan is measured not to learn (...). Fixes: "
               "--epsilon 4.1 (or more), or ≥ 7,400 records (this data set has 2,000). --force trains it anyway")
    _write(tmp_path, "r", set="fashion-2k", kind="release", epsilon_target=1.0, seed=0, accuracy=None, refused=refusal,
           epsilon_spent=0.0, train_s=1, eval_s=0, plan=[], delta=1e-5, commands=[])
    _write(tmp_path, "d", set="fashion-2k", kind="dpsgd", epsilon_target=1.0, seed=0, accuracy=0.46, wall_s=1,
           epsilon_spent=0.99, delta=1e-5, commands=[])
    [cell] = heldout.cells(heldout.load_results(tmp_path), ["fashion-2k"], [1.0])
    assert cell["ratio"] is None and cell["refused"] == refusal
    text = heldout.write_table(tmp_path, ["fashion-2k"], [1.0]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fashion-2k"))
    assert "**refused**" in row and "--epsilon 4.1 (or more), or ≥ 7,400 records" in row
    assert "Partial table" not in text


def test_a_search_is_compared_with_the_single_runs_and_kept_out_of_the_ratio(tmp_path):
    """Issue #35's held-out comparison: a search's release goes in its own table against the default
    single runs of the same set and ε; it never enters the release / DP-classifier ratio, and a failed
    search (its report released alone) shows as failed, not as 0 %."""
    common = {"delta": 1e-5, "epsilon_spent": 9.99, "commands": [], "train_s": 1, "eval_s": 1, "plan": []}
    for seed, acc in [(0, 0.60), (1, 0.70)]:
        _write(tmp_path, f"r{seed}", set="glyphs-8k", kind="release", epsilon_target=10.0, seed=seed, accuracy=acc,
               **common)
    _write(tmp_path, "d0", set="glyphs-8k", kind="dpsgd", epsilon_target=10.0, seed=0, accuracy=0.80, wall_s=1,
           **{k: v for k, v in common.items() if k not in ("train_s", "eval_s", "plan")})
    _write(tmp_path, "s0", set="glyphs-8k", kind="search", epsilon_target=10.0, seed=0, accuracy=0.75, **common)
    _write(tmp_path, "s1", set="glyphs-8k", kind="search", epsilon_target=10.0, seed=1, accuracy=None,
           failed="error: no trial finished", **common)
    cell = heldout.cells(heldout.load_results(tmp_path), ["glyphs-8k"], [10.0])[0]
    assert cell["ratio"] == pytest.approx(0.65 / 0.80)  # the search's 75 % is not a single run's
    text = heldout.write_table(tmp_path, ["glyphs-8k"], [10.0]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| glyphs-8k | 10 | 75.0"))
    assert "+10.0" in row and "seed 1: failed" in row and "65.0 ± 7.1" in row
