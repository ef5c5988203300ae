"""End to end: `python tune.py` on the seconds-sized search space, as a subprocess with its own local Ray
(docs/design.md §6): the release holds exactly the five files, its ε covers the whole search and can be recomputed
from the report alone, the realised K stays in trials/, every trial stayed under the reference, and an
interrupted search resumes without re-drawing K.

Each subprocess runs in its own session (process group) and carries a unique environment tag that Ray's
processes inherit; whatever still carries the tag after the run is killed by pid, and reported.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import yaml

from dpaf_ray.privacy.ledger import PrivacyLedger, rdp_curve
from dpaf_ray.privacy.tuning import Reference
from dpaf_ray.release import RELEASE_FILES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"
TAG_VAR = "DPAF_E2E_TAG"


# ----------------------------------------------------------------------- subprocess handling


def _tagged_pids(tag: str) -> list[int]:
    """Our own processes (the tune.py driver and the Ray processes it started) carrying `tag`."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


def _reap(proc: subprocess.Popen, tag: str, grace: float = 45.0) -> list[int]:
    """Make sure nothing we started survives: wait, then SIGKILL the group and any tagged pid.
    Returns the pids that were still alive after `grace` seconds (for the caller to report)."""
    deadline = time.time() + grace
    while time.time() < deadline and (proc.poll() is None or _tagged_pids(tag)):
        time.sleep(0.5)
    survivors = _tagged_pids(tag)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group we created
    except (ProcessLookupError, PermissionError):
        pass
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


def _start(args: list[str], log: Path, tag: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TUNE_DISABLE_SIGINT_HANDLER")}
    env[TAG_VAR] = tag
    return subprocess.Popen([sys.executable, "tune.py", *args], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _tail(log: Path, n: int = 60) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if not ln.startswith(("│", "├", "╭", "╰"))]
    return "\n".join(lines[-n:])


def run_tune(args: list[str], log: Path, timeout: float = 600) -> int:
    tag = uuid.uuid4().hex
    proc = _start(args, log, tag)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _reap(proc, tag, grace=0)
        pytest.fail(f"tune.py {' '.join(args)} ran past {timeout}s\n{_tail(log)}")
    survivors = _reap(proc, tag)
    assert not survivors, f"processes survived tune.py's exit (killed now): {survivors}"
    return rc


# ---------------------------------------------------------------------- independent checks


def dp_event(d: dict) -> dp_accounting.DpEvent:
    """A dp_accounting event from the report's JSON alone (not via dpaf_ray's ledger)."""
    kind = d["kind"]
    if kind == "poisson_gaussian":
        one = dp_accounting.PoissonSampledDpEvent(d["sampling_rate"], dp_accounting.GaussianDpEvent(d["noise_multiplier"]))
        return dp_accounting.SelfComposedDpEvent(one, d["count"])
    if kind == "gaussian":
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(d["noise_multiplier"]), d["count"])
    if kind == "composed":
        return dp_accounting.ComposedDpEvent([dp_event(e) for e in d["events"]])
    if kind == "repeat_and_select":
        shape = math.inf if d["shape"] == "inf" else float(d["shape"])
        return dp_accounting.dp_event.RepeatAndSelectDpEvent(dp_event(d["event"]), float(d["mean"]), shape)
    raise AssertionError(f"unknown event kind {kind!r} in the privacy report")


def keys_anywhere(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(keys_anywhere(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(keys_anywhere(v) for v in obj)) if obj else set()
    return set()


def reference_of(state: dict) -> Reference:
    return Reference.from_json(state["reference"])


def check_trials_under_reference(out: Path, state: dict) -> list[dict]:
    ref = reference_of(state)
    ref_curve = rdp_curve(ref.entries(), ref.orders)
    # dp_accounting gives inf at low fractional orders where its series does not converge (small σ);
    # the search's bound never uses those orders, and neither does the dominance check
    finite = np.isfinite(ref_curve)
    assert finite.sum() >= len(ref_curve) // 2
    trials = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/trial.json"))]
    for t in trials:
        entries = PrivacyLedger.from_json(t["ledger"]).entries
        curve = rdp_curve(entries, ref.orders)
        over = finite & (curve > ref_curve * (1 + 1e-9) + 1e-12)
        assert not over.any(), (t["trial"], np.asarray(ref.orders)[over], curve[over], ref_curve[over])
    return trials


def check_release(out: Path, target_epsilon: float, delta: float) -> dict:
    release = out / "release"
    assert sorted(p.name for p in release.iterdir()) == sorted(RELEASE_FILES)
    report = json.loads((release / "privacy_report.json").read_text())
    assert report["target_epsilon"] == target_epsilon and report["delta"] == delta
    assert report["epsilon"] <= target_epsilon
    # recomputed from the report's events and orders alone
    acc = dp_accounting.rdp.RdpAccountant(list(report["orders"]))
    acc.compose(dp_accounting.ComposedDpEvent([dp_event(e) for e in report["events"]]))
    assert acc.get_epsilon(delta) == pytest.approx(report["epsilon"], rel=1e-9)
    assert [e["kind"] for e in report["events"]] in (["repeat_and_select"], ["poisson_gaussian", "gaussian"])
    # the realised K stays in the trusted run directory
    for p in release.iterdir():
        assert b"num_trials" not in p.read_bytes(), f"{p.name} mentions num_trials"
    for name in ("privacy_report.json", "score.json"):
        keys = keys_anywhere(json.loads((release / name).read_text()))
        assert not keys & {"num_trials", "k", "K", "trials", "realised_trials"}, (name, keys)
    return report


# ---------------------------------------------------------------------------- the tiny search


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    log = out.parent / "tune.log"
    t0 = time.time()
    rc = run_tune(["--search-space", str(TINY), "--out", str(out)], log, timeout=600)
    return out, rc, log, time.time() - t0


@pytest.mark.timeout(900)
def test_tiny_search_end_to_end(tiny_run):
    out, rc, log, took = tiny_run
    assert rc == 0, _tail(log)
    ss = yaml.safe_load(TINY.read_text())
    report = check_release(out, ss["epsilon"], ss["delta"])
    assert report["search"] == "random"
    assert report["trials_distribution"] == {"kind": "tnb", "mean": ss["expected_trials"], "shape": ss["tnb_shape"]}
    assert report["events"][0]["mean"] == ss["expected_trials"]

    state = json.loads((out / "trials" / "search_state.json").read_text())
    k = state["num_trials"]
    assert isinstance(k, int) and k >= 1  # truncated negative binomial: K >= 1
    # the reference in the report is the one the trials were fitted under, recomputable from its events
    ref = reference_of(state)
    assert report["reference"]["iterations"] == ref.iterations
    assert tuple(report["orders"]) == ref.orders
    assert report["reference"]["events"] == state["reference"]["events"]
    acc = dp_accounting.rdp.RdpAccountant(list(ref.orders))
    acc.compose(dp_accounting.ComposedDpEvent([dp_event(e) for e in report["reference"]["events"]]))
    assert acc.get_epsilon(ss["delta"]) == pytest.approx(report["reference"]["epsilon_alone"], rel=1e-9)

    # K runs were started: never truncated, never re-drawn
    tune_trials = [p for p in (out / "trials" / "ray_tune" / "search").iterdir() if p.is_dir()]
    assert len(tune_trials) == k, (k, [p.name for p in tune_trials])
    trials = check_trials_under_reference(out, state)
    assert 1 <= len(trials) <= k
    ref_b = ss.get("reference", {}).get("batch_size") or max(ss["params"]["batch_size"]["choice"])
    for t in trials:  # every trial runs its planned T (as many epochs as the reference), noise fitted under it
        planned = max(1, round(ss["trial"]["iterations"] * ref_b / t["knobs"]["batch_size"]))
        assert t["iterations"] == t["iterations_planned"] == planned, (t["knobs"]["batch_size"], ref_b)
        assert t["epsilon_trial"] <= t["epsilon_reference"] * (1 + 1e-9)

    # the release is the best trial by noisy score, copied byte for byte
    best = max(trials, key=lambda t: t["score"])
    score = json.loads((out / "release" / "score.json").read_text())
    assert score == {"score": best["score"], "kind": "private_validation",
                     "noise_multiplier": ss["score"]["noise_multiplier"],
                     "expected_validation": best["expected_validation"]}
    assert best["expected_validation"] == pytest.approx(0.1 * 4000)  # the public f·N, not a realised count
    for name in ("generator.pt", "synthetic.parquet", "samples.png"):
        assert (out / "release" / name).read_bytes() == (out / "trials" / best["trial"] / name).read_bytes()
    assert (out / "trials" / "comparison.png").stat().st_size > 0
    # the whole search's charge was on disk (OUT/ledger.json) before any trial, and equals the report's
    assert PrivacyLedger.load(out / "ledger.json").epsilon(ss["delta"]) == pytest.approx(report["epsilon"])
    print(f"tiny search: K={k}, {took:.0f}s")


@pytest.mark.timeout(300)
def test_no_byte_string_of_the_search_secret_is_written_outside_checkpoints(tiny_run):
    """Tune writes every trial's config (params.json, experiment state, tuner.pkl): the search
    secret travels through the object store instead, and no file outside a checkpoint holds
    the secret, the split key, a trial's secret or a stream key derived from them."""
    import torch
    from dpaf_ray.data.splits import SPLIT_LABEL
    from dpaf_ray.privacy.randomness import RunSecret
    from test_privacy_threats import derived_byte_strings, leaks

    out, rc, log, _ = tiny_run
    assert rc == 0, _tail(log)
    secret = RunSecret.from_checkpoint(torch.load(out / "checkpoint" / "search_secret.pt", weights_only=True))
    strings = derived_byte_strings(secret, 3)
    trial_ids = []
    for result in (out / "trials" / "ray_tune" / "search").glob("*/result.json"):
        for line in result.read_text().splitlines():
            trial_ids.append(json.loads(line)["trial_id"])
    assert trial_ids
    for tid in set(trial_ids):
        for name, b in derived_byte_strings(secret.child(f"trial/{tid}"), 3).items():
            strings[f"trial {tid}: {name}"] = b
    strings["split"] = secret.child(SPLIT_LABEL).to_checkpoint()["key"]
    assert leaks(out, strings) == []


@pytest.mark.timeout(300)
def test_same_out_twice_is_refused(tiny_run, tmp_path):
    out, rc, log, _ = tiny_run
    assert rc == 0, _tail(log)
    before = (out / "trials" / "search_state.json").read_bytes()
    rc2 = run_tune(["--search-space", str(TINY), "--out", str(out)], tmp_path / "again.log", timeout=240)
    assert rc2 == 2
    assert "already holds a search" in (tmp_path / "again.log").read_text()
    assert (out / "trials" / "search_state.json").read_bytes() == before


# ------------------------------------------------------------------------ interrupt and resume


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A search with more trials (mean 3, geometric), interrupted with SIGINT after the first trial.json."""
    base = tmp_path_factory.mktemp("resume")
    raw = yaml.safe_load(TINY.read_text())
    raw.update(expected_trials=3, tnb_shape=1.0, trials_distribution="tnb", search="random")
    space = base / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = base / "run"
    log = base / "first.log"
    tag = uuid.uuid4().hex
    t0 = time.time()
    proc = _start(["--search-space", str(space), "--out", str(out)], log, tag)
    state_path = out / "trials" / "search_state.json"
    info = {"out": out, "space": space, "log": log, "k": None, "interrupted": False, "tagged_while_running": 0}
    try:
        while time.time() - t0 < 600 and proc.poll() is None:
            if info["k"] is None and state_path.exists():
                try:
                    info["k"] = json.loads(state_path.read_text())["num_trials"]
                except (json.JSONDecodeError, KeyError):
                    pass
            if list(out.glob("trials/*/trial.json")):
                break
            info["tagged_while_running"] = max(info["tagged_while_running"], len(_tagged_pids(tag)))
            time.sleep(0.5)
        if proc.poll() is None and list(out.glob("trials/*/trial.json")):
            info["interrupted"] = True
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C to the driver and the Ray processes it started
        proc.wait(180)
    except subprocess.TimeoutExpired:
        pass
    finally:
        info["survivors"] = _reap(proc, tag)
    info["rc"] = proc.returncode
    info["k"] = json.loads(state_path.read_text())["num_trials"] if state_path.exists() else info["k"]
    info["trials_done"] = len(list(out.glob("trials/*/trial.json")))
    info["release_after_interrupt"] = (out / "release").exists()
    info["took"] = time.time() - t0
    return info


@pytest.mark.timeout(1500)
def test_resume_finishes_an_interrupted_search(interrupted_run, tmp_path):
    info = interrupted_run
    out = info["out"]
    assert info["k"] is not None, f"no search state was written\n{_tail(info['log'])}"
    assert not info["survivors"], f"processes survived the interrupted run (killed now): {info['survivors']}"
    # the clean-up really sees Ray's processes (driver, gcs, raylet, workers all inherit the tag)
    assert info["tagged_while_running"] >= 3, info["tagged_while_running"]
    k = info["k"]
    state_before = json.loads((out / "trials" / "search_state.json").read_text())
    t0 = time.time()
    rc = run_tune(["--resume", str(out)], tmp_path / "resume.log", timeout=1200)
    assert rc == 0, _tail(tmp_path / "resume.log")
    state_after = json.loads((out / "trials" / "search_state.json").read_text())
    assert state_after == state_before, "--resume must not re-draw K or re-plan the search"
    assert state_after["num_trials"] == k
    ss = yaml.safe_load(info["space"].read_text())
    check_release(out, ss["epsilon"], ss["delta"])
    trials = check_trials_under_reference(out, state_after)
    assert 1 <= len(trials) <= k
    tune_trials = [p for p in (out / "trials" / "ray_tune" / "search").iterdir() if p.is_dir()]
    assert len(tune_trials) == k, "the resumed search must run exactly the K trials drawn at the start"
    print(f"interrupted search: K={k}, {info['trials_done']} trial(s) done at SIGINT, first run "
          f"{info['took']:.0f}s, resume {time.time() - t0:.0f}s")
    if not info["interrupted"] or k == 1:
        pytest.skip(f"K = {k}: the search finished before the interruption could land; resume was checked on a "
                    "finished search only")


@pytest.mark.timeout(60)
def test_interrupted_search_releases_nothing(interrupted_run):
    info = interrupted_run
    if not info["interrupted"] or info["k"] is None or info["k"] < 2 or info["trials_done"] >= info["k"]:
        pytest.skip(f"K = {info['k']}: no trial was left to interrupt")
    assert not info["release_after_interrupt"], (
        f"an interrupted search (K={info['k']}, {info['trials_done']} done) wrote a release, exit {info['rc']}")
    assert info["rc"] != 0
