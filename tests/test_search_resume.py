"""A resumed search never selects from more than the K it drew, never rewrites a release, and
completes an interrupted trial with the noise of its first attempt (docs/design.md rules 16–17, issue #35).

Fast tests call the refusals on prepared run directories (no Ray) and replay an interrupted
training run in-process; the slow tests SIGKILL `python tune.py` at each phase of a search and
resume it until it releases, and kill a Ray Train worker inside a trial (DPAF_TEST_FAIL_AT).
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpaf_ray.config import TrainConfig
from dpaf_ray.privacy.ledger import PrivacyLedger, rdp_curve
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.privacy.tuning import Reference
from dpaf_ray.release import RELEASE_FILES
from dpaf_ray.training.loop import WriteAheadLedger, charged_iterations, train_loop
from dpaf_ray.training.plan import plan_training
from dpaf_ray.tuning import cli
from dpaf_ray.tuning.search_space import load_search_space
from dpaf_ray.tuning.reference import plan_search, search_ledger
from dpaf_ray.tuning.trial import FAULT_PHASES, KILL_DRIVER_ENV, _atomic_json
from dpaf_ray.tuning.tuner import (
    SearchRefused,
    check_no_trials_beside_fresh_tuner,
    check_selection_within_k,
    finish_search,
    run_search,
    save_search_secret,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"


# ------------------------------------------------------------------ prepared run directories


def _search_dir(tmp_path: Path, k: int = 2) -> tuple[object, dict, Path]:
    """A search as `run_search` leaves it after planning: state (with K = k), secret, charged ledger."""
    ss = load_search_space(TINY)
    state = plan_search(ss, 5000, (1, 28, 28), 10)
    state["num_trials"] = k
    out = tmp_path / "run"
    (out / "trials").mkdir(parents=True)
    save_search_secret(out, RunSecret.fresh())
    search_ledger(ss, state).save(out / "ledger.json")
    _atomic_json(out / "trials" / "search_state.json", state)
    return ss, state, out


def _trial_folder(out: Path, name: str) -> Path:
    d = out / "trials" / name
    d.mkdir(parents=True)
    (d / "trial.json").write_text(json.dumps({"trial": name, "score": 0.5, "knobs": {}}))
    return d


def _release(out: Path) -> dict[str, tuple[bytes, int]]:
    rel = out / "release"
    rel.mkdir()
    for name in RELEASE_FILES:
        (rel / name).write_text(name)
    (rel / "privacy_report.json").write_text(json.dumps({"epsilon": 3.25, "delta": 1e-5, "target_epsilon": 10.0}))
    return _snapshot(rel)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_resume_of_a_released_search_says_where_and_what_it_cost_and_touches_nothing(tmp_path, capsys):
    ss, _, out = _search_dir(tmp_path)
    before = _release(out)
    ledger = (out / "ledger.json").read_bytes()
    lines: list[str] = []
    assert run_search(ss, out, resume=True, progress=lines.append) == (out / "release").absolute()
    assert str(out / "release") in lines[0] and "ε=3.250" in lines[0], lines
    assert cli.main(["--resume", str(out)]) == 0
    printed = capsys.readouterr()
    assert "already released" in printed.out and "Nothing was run" in printed.out and not printed.err
    # this command released nothing: no "release: …" line as a fresh search prints
    assert not any(line.startswith("release:") for line in printed.out.splitlines()), printed.out
    assert _snapshot(out / "release") == before and (out / "ledger.json").read_bytes() == ledger
    assert not (out / "trials" / "ray_tune").exists()  # no search was started


@pytest.mark.parametrize("note", ["no trial finished: nothing usable was released",
                                  "K = 0 trials were drawn: nothing was trained"], ids=["no-trial-finished", "k0"])
def test_resume_of_a_search_that_released_only_its_report_fails_and_touches_nothing(tmp_path, capsys, note):
    """finish_search released the report alone (no trial finished, or K = 0): a resume exits 1 saying the search
    failed, holds only its report and needs another --out; release/ and the ledger stay byte for byte."""
    from dpaf_ray.tuning.tuner import SearchFailed

    ss, _, out = _search_dir(tmp_path, k=0 if note.startswith("K = 0") else 2)
    rel = out / "release"
    rel.mkdir()
    (rel / "score.json").write_text(json.dumps({"score": None, "note": note}, indent=1))
    (rel / "privacy_report.json").write_text(json.dumps({"epsilon": 3.25, "delta": 1e-5, "target_epsilon": 10.0}))
    before, ledger = _snapshot(rel), (out / "ledger.json").read_bytes()
    with pytest.raises(SearchFailed) as err:
        run_search(ss, out, resume=True, progress=lambda m: pytest.fail(f"printed {m!r}"))
    message = str(err.value)
    assert message.startswith("the search failed: its release holds only the privacy report")
    assert "already released" in message and "ε=3.250" in message and "another --out" in message
    assert f"holds only the privacy report ({note})" in message, message
    assert cli.main(["--resume", str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith("error: the search failed") and "another --out" in printed.err
    assert "release:" not in printed.out, printed.out
    assert _snapshot(rel) == before and (out / "ledger.json").read_bytes() == ledger
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "ledger.json", "release", "trials"]
    assert not (out / "trials" / "ray_tune").exists()  # no search was started


def test_resume_of_a_release_without_its_generator_is_no_usable_release(tmp_path, capsys):
    """A release/ whose score.json is unreadable and which holds no generator is not read as usable either."""
    ss, _, out = _search_dir(tmp_path)
    _release(out)
    (out / "release" / "generator.pt").unlink()
    (out / "release" / "score.json").unlink()
    before = _snapshot(out / "release")
    assert cli.main(["--resume", str(out)]) == 1
    assert "holds only the privacy report" in capsys.readouterr().err
    assert _snapshot(out / "release") == before


def test_finish_never_rewrites_an_existing_release(tmp_path):
    ss, state, out = _search_dir(tmp_path, k=1)
    _trial_folder(out, "dpaf_trial_a")
    before = _release(out)
    with pytest.raises(SearchRefused, match="never rewritten"):
        finish_search(ss, state, out, None, print)
    assert _snapshot(out / "release") == before


def test_finish_refuses_to_select_among_more_trial_folders_than_k(tmp_path):
    ss, state, out = _search_dir(tmp_path, k=1)
    _trial_folder(out, "dpaf_trial_a")
    (out / "trials" / "dpaf_trial_b").mkdir()  # a trial that started (and failed) counts as a run too
    with pytest.raises(SearchRefused, match="more than the number of trials"):
        finish_search(ss, state, out, None, print)
    assert not (out / "release").exists() and not (out / "release.tmp").exists()
    check_selection_within_k(out, 2)  # exactly K is fine
    (out / "trials" / "ray_tune").mkdir()  # Tune's own storage is no trial
    check_selection_within_k(out, 2)


def test_resume_without_tunes_experiment_refuses_a_fresh_tuner_beside_existing_trials(tmp_path, capsys):
    ss, _, out = _search_dir(tmp_path, k=2)
    _trial_folder(out, "dpaf_trial_a")
    ledger = (out / "ledger.json").read_bytes()
    with pytest.raises(SearchRefused) as err:
        run_search(ss, out, resume=True, progress=lambda m: None)
    message = str(err.value)
    assert "dpaf_trial_a" in message and str(out / "trials") in message
    assert "--storage-path" in message and "delete" in message and "stays as charged" in message
    assert cli.main(["--resume", str(out)]) == 2
    assert "dpaf_trial_a" in capsys.readouterr().err
    assert (out / "ledger.json").read_bytes() == ledger and not (out / "trials" / "ray_tune").exists()
    # the operator deleted the old trials: a fresh Tuner may run the K trials (the ledger stays)
    import shutil

    shutil.rmtree(out / "trials" / "dpaf_trial_a")
    check_no_trials_beside_fresh_tuner(out, out / "trials" / "ray_tune" / "search")


def test_a_new_search_is_refused_where_an_earlier_one_left_trials_or_a_ledger(tmp_path):
    ss, _, out = _search_dir(tmp_path)
    (out / "trials" / "search_state.json").unlink()  # state lost, trials and ledger remain
    _trial_folder(out, "dpaf_trial_a")
    ledger = (out / "ledger.json").read_bytes()
    with pytest.raises(SearchRefused, match="earlier search"):
        run_search(ss, out, resume=False, progress=lambda m: None)
    assert (out / "ledger.json").read_bytes() == ledger
    assert not (out / "trials" / "search_state.json").exists()


# --------------------------------------------------- an interrupted attempt, replayed exactly


class MemorySink:
    """Checkpoints kept in memory (as a trial's folder would keep them)."""

    def __init__(self) -> None:
        self.state = None

    def latest(self):
        return copy.deepcopy(self.state)

    def save(self, state, metrics) -> None:
        self.state = copy.deepcopy(state)

    def report(self, metrics) -> None:
        pass


class Crash(RuntimeError):
    pass


def _params(result) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in result.trainer.modules().values() for p in m.parameters()])


def _images(n: int = 200, classes: int = 3) -> "ImageDataset":
    from dpaf_ray.data.dataset import ImageDataset

    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, classes, (n,), generator=g), classes, "random")


@pytest.mark.parametrize("crash_at", [2, 5])  # before the first checkpoint; mid-window after one
def test_a_restarted_attempt_replays_the_same_noise_on_the_same_sums_and_charges_nothing_twice(tmp_path, crash_at):
    """The attempt that resumes a trial (same plan, public seed and secret) ends exactly where an
    uninterrupted run ends, bit for bit, and its ledger is the uninterrupted one: iterations the
    journal charged are replays (identical releases), not new releases."""
    torch.set_num_threads(1)
    ds = _images()
    cfg = TrainConfig(batch_size=32, group_size=16, seed=7, iterations=9, log_every=3, checkpoint_every=3,
                      num_threads=1, epsilon=50, classifier_steps=0)
    plan = plan_training(cfg, len(ds))
    secret = RunSecret.fresh()
    whole = train_loop(plan, ds, len(ds), sink=MemorySink(), progress=None, secret=secret,
                       journal=WriteAheadLedger(tmp_path / "whole.json"))

    def crash(t: int) -> None:
        if t == crash_at:
            raise Crash(t)

    sink, journal = MemorySink(), WriteAheadLedger(tmp_path / "trial.json")
    with pytest.raises(Crash):
        train_loop(plan, ds, len(ds), sink=sink, progress=None, secret=secret, journal=journal,
                   before_iteration=crash, replay_charged=True)
    first = charged_iterations(journal.load())
    assert first > crash_at  # write-ahead: the crashed window was charged before it ran
    resumed = train_loop(plan, ds, len(ds), sink=sink, progress=None, secret=secret, journal=journal,
                         replay_charged=True)
    assert torch.equal(_params(resumed), _params(whole))  # the same releases, so the same model
    assert resumed.ledger.entries == whole.ledger.entries == journal.load().entries
    assert charged_iterations(journal.load()) == plan.iterations


# ------------------------------------------------- SIGKILL the driver at each phase, then resume


def _charged_within_reference(out: Path, state: dict) -> None:
    """Every trial's journal (what it charged) lies under the reference at every order."""
    ref = Reference.from_json(state["reference"])
    ref_curve = rdp_curve(ref.entries(), ref.orders)
    finite = np.isfinite(ref_curve)
    for journal in (out / "trials").glob("*/ledger.json"):
        curve = rdp_curve(PrivacyLedger.load(journal).entries, ref.orders)
        assert not (finite & (curve > ref_curve * (1 + 1e-9) + 1e-12)).any(), journal


def _kill_tagged(tag: str) -> None:
    from test_tune_e2e import _tagged_pids

    for _ in range(20):
        pids = _tagged_pids(tag)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _check_after_a_run(out: Path, raw: dict, markers: Path) -> None:
    """After any run of a K = 2 search, killed or not: the search's charge is within its budget, at most K
    trial folders exist, every trial's ledger lies under the reference, and a trial killed mid-way charged
    every iteration it executed (0 … t − 1)."""
    state = json.loads((out / "trials" / "search_state.json").read_text())
    assert PrivacyLedger.load(out / "ledger.json").epsilon(raw["delta"]) <= raw["epsilon"]  # charged before any trial
    folders = [p for p in (out / "trials").iterdir() if p.is_dir() and not p.name.startswith("ray_")]
    assert len(folders) <= state["num_trials"] == 2, [p.name for p in folders]
    _charged_within_reference(out, state)
    mid = markers / "mid_trial"
    if mid.exists():
        trial, t = mid.read_text().rsplit(":", 1)
        assert charged_iterations(PrivacyLedger.load(out / "trials" / trial / "ledger.json")) >= int(t)


def _released_charge_checked(out: Path, raw: dict) -> tuple[dict, int]:
    """A released K = 2 search's charge: the ledger's, within the budget, and recomputable from the report
    alone. Returns the search state and K."""
    import dp_accounting

    from test_tune_e2e import dp_event

    state = json.loads((out / "trials" / "search_state.json").read_text())
    k = state["num_trials"]
    assert k == 2
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    acc = dp_accounting.rdp.RdpAccountant(list(report["orders"]))
    acc.compose(dp_accounting.ComposedDpEvent([dp_event(e) for e in report["events"]]))
    assert acc.get_epsilon(raw["delta"]) == pytest.approx(report["epsilon"], rel=1e-9)
    assert report["epsilon"] <= raw["epsilon"]
    assert report["epsilon"] == pytest.approx(PrivacyLedger.load(out / "ledger.json").epsilon(raw["delta"]))
    return state, k


def _release_whole_and_unrewritten(out: Path, seen: dict | None) -> dict | None:
    """After a run: release/, where it exists, holds every release file and equals what an earlier run saw
    (written once, rule 17). Returns what this run saw, for the next."""
    if not (out / "release").exists():
        return seen
    assert sorted(p.name for p in (out / "release").iterdir()) == sorted(RELEASE_FILES)
    snap = _snapshot(out / "release")
    assert seen in (None, snap), "release/ was rewritten"
    return snap


def _run_tune(args: list[str], log: Path, timeout: float) -> int:
    """`python tune.py ARGS` to its end; whatever happens, none of its processes (Ray's included) outlives it."""
    from test_tune_e2e import _start

    tag = uuid.uuid4().hex
    proc = _start(args, log, tag)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        _kill_tagged(tag)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_of_the_driver_at_every_phase_then_resume_releases_once_within_k(tmp_path):
    """K = 2 in-process trials (TPE: a fixed K). The driver is SIGKILLed once at each phase — before the
    first trial, mid-trial, between trials, inside finish_search, while writing release/ — and resumed each
    time. After every run: the search's charge is on disk, each trial's journal lies under the reference and
    covers every iteration it executed, at most K trial folders exist, and release/ is absent or whole and
    never rewritten. At the end the interrupted trial has completed and the release is recomputable."""
    import dp_accounting

    from test_tune_e2e import _tail, dp_event

    raw = yaml.safe_load(TINY.read_text())
    raw.update(search="tpe", expected_trials=2)
    raw["trial"]["num_workers"] = 0  # in-process trials: no Train workers to start (CI time)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    os.environ[KILL_DRIVER_ENV] = ",".join(FAULT_PHASES) + f":{markers}"
    args = ["--search-space", str(space), "--out", str(out)]
    release_seen = None
    rc, log = None, None
    try:
        for run in range(len(FAULT_PHASES) + 2):
            log = tmp_path / f"run{run}.log"
            rc = _run_tune(args, log, 600)
            if (out / "trials" / "search_state.json").exists():
                _check_after_a_run(out, raw, markers)
            release_seen = _release_whole_and_unrewritten(out, release_seen)
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, f"run {run}: exit {rc}\n{_tail(log)}"
            args = ["--resume", str(out)]
    finally:
        os.environ.pop(KILL_DRIVER_ENV, None)
    assert rc == 0, _tail(log)
    assert sorted(p.name for p in markers.iterdir()) == sorted(FAULT_PHASES)
    assert sorted(p.name for p in (out / "release").iterdir()) == sorted(RELEASE_FILES)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    acc = dp_accounting.rdp.RdpAccountant(list(report["orders"]))  # recomputed from the report alone
    acc.compose(dp_accounting.ComposedDpEvent([dp_event(e) for e in report["events"]]))
    assert acc.get_epsilon(raw["delta"]) == pytest.approx(report["epsilon"], rel=1e-9)
    assert report["epsilon"] <= raw["epsilon"]
    assert report["epsilon"] == pytest.approx(PrivacyLedger.load(out / "ledger.json").epsilon(raw["delta"]))
    trials = sorted((out / "trials").glob("*/trial.json"))
    folders = [p for p in (out / "trials").iterdir() if p.is_dir() and not p.name.startswith("ray_")]
    assert len(trials) == len(folders) == 2, "every trial, the interrupted one included, completed"
    for path in trials:
        t = json.loads(path.read_text())
        assert t["iterations"] == t["iterations_planned"]
        assert t["epsilon_trial"] <= t["epsilon_reference"] * (1 + 1e-9)
    # one more resume: the release stays as it is
    rc = subprocess.run([sys.executable, "tune.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300).returncode
    assert rc == 0 and _snapshot(out / "release") == release_seen


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_of_the_driver_while_a_ray_train_trial_runs_then_resume_completes_it(tmp_path):
    """K = 2 trials (TPE: a fixed K), each trained by one Ray Train worker. The driver is SIGKILLed (by the
    first trial's rank-0 worker, DPAF_TEST_KILL_DRIVER_AT=mid_trial) before iteration checkpoint_every + 1, the
    first window charged and checkpointed, the second charged; the whole local Ray dies with it. `--resume`
    then finishes the search. After every run: the search's charge is on disk within the budget, the killed
    trial's journal covers every iteration it executed, every journal lies under the reference, at most K trial
    folders exist, release/ is absent or whole and never rewritten. At the end: Tune ran exactly K trials, the
    interrupted one completed on resume with its first attempt's plan (same noise, charged once), the release is
    the best trial's, byte for byte, and its ε is the ledger's, recomputable from the report, within the budget;
    one more resume touches nothing."""
    from test_tune_e2e import _tail

    raw = yaml.safe_load(TINY.read_text())
    raw.update(search="tpe", expected_trials=2)
    raw["trial"]["num_workers"] = 1  # the Ray Train path, not an in-process trial
    assert raw["fixed"]["checkpoint_every"] == 10 and raw.get("max_concurrent_trials", 1) == 1
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    os.environ[KILL_DRIVER_ENV] = f"mid_trial:{markers}"
    args = ["--search-space", str(space), "--out", str(out)]
    release_seen, rc, log, runs, rcs = None, None, None, 0, []
    t0 = time.time()
    try:
        for runs in range(1, 4):  # the killed search, its resume (and one spare)
            log = tmp_path / f"run{runs}.log"
            rc = _run_tune(args, log, 900)
            rcs.append(rc)
            assert (out / "trials" / "search_state.json").exists(), f"run {runs}: exit {rc}\n{_tail(log)}"
            _check_after_a_run(out, raw, markers)
            release_seen = _release_whole_and_unrewritten(out, release_seen)
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, f"run {runs}: exit {rc}\n{_tail(log)}"
            args = ["--resume", str(out)]
    finally:
        os.environ.pop(KILL_DRIVER_ENV, None)
    assert (markers / "mid_trial").exists(), f"the driver was never killed\n{_tail(log)}"
    assert rcs == [-signal.SIGKILL, 0], f"exits {rcs}\n{_tail(log)}"  # killed once, then one resume finished
    assert not (out / "release.tmp").exists()
    victim, kill_t = (markers / "mid_trial").read_text().rsplit(":", 1)
    assert int(kill_t) == raw["fixed"]["checkpoint_every"] + 1

    # the search's charge: the ledger's, within the budget, recomputable from the report alone
    state, k = _released_charge_checked(out, raw)

    # selection among ≤ K runs: Tune ran exactly K trials (the interrupted one was restarted, not replaced)
    trials = out / "trials"
    folders = sorted(p.name for p in trials.iterdir() if p.is_dir() and not p.name.startswith("ray_"))
    tune_trials = _tune_trials(out)
    assert len(tune_trials) == k and sorted(tune_trials) == folders and victim in folders, (sorted(tune_trials),
                                                                                            folders, victim)
    plans = {n: json.loads((trials / n / "plan.json").read_text()) for n in folders}
    journals = {n: PrivacyLedger.load(trials / n / "ledger.json") for n in folders}
    finished = {n: json.loads((trials / n / "trial.json").read_text()) for n in folders}  # every trial finished
    for name, t in finished.items():  # each charged exactly its plan, once, under the reference
        assert t["iterations"] == t["iterations_planned"] == plans[name]["iterations"], name
        assert charged_iterations(journals[name]) == t["iterations"], name
        assert t["noise_factor"] == plans[name]["noise_factor"], name  # the first attempt's plan, replayed
        assert t["epsilon_trial"] <= t["epsilon_reference"] * (1 + 1e-9)
    assert tune_trials[victim]["status"] == "TERMINATED", tune_trials[victim]["status"]

    # the release is the best trial, byte for byte
    best = max(finished.values(), key=lambda t: t["score"])
    assert json.loads((out / "release" / "score.json").read_text())["score"] == best["score"]
    for name in ("generator.pt", "synthetic.parquet"):
        assert (out / "release" / name).read_bytes() == (trials / best["trial"] / name).read_bytes()
    took = time.time() - t0
    # one more resume: the release stays as it is, and no "release:" line claims otherwise
    r = subprocess.run([sys.executable, "tune.py", "--resume", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "already released" in r.stdout and _snapshot(out / "release") == release_seen
    assert not any(line.startswith("release:") for line in r.stdout.splitlines()), r.stdout
    print(f"driver killed under Ray Train at {victim}:{kill_t}: {runs} run(s), {took:.0f}s")


# ------------------------------------------------- kill a Ray Train worker inside a trial


def _tune_trials(out: Path) -> dict[str, dict]:
    """Tune's own record of the search's trials (its experiment state on disk), by trial folder name."""
    trials: dict[str, dict] = {}
    for path in (out / "trials" / "ray_tune" / "search").glob("experiment_state*.json"):
        for entry in json.loads(path.read_text()).get("trial_data", []):
            trial = json.loads(entry[0])
            trials[f"{trial['trainable_name']}_{trial['trial_id']}"] = trial  # `run_trial`'s folder name
    return trials


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("workers,rank,driver_kill", [(1, 0, None), (2, 1, None), (1, 0, "finish_search")],
                         ids=["1-worker-rank0", "2-workers-rank1", "then-driver-killed-in-finish"])
def test_a_train_worker_killed_mid_trial_is_charged_and_the_search_releases_once_within_k(tmp_path, workers, rank,
                                                                                          driver_kill):
    """K = 2 trials (TPE: a fixed K), each trained by Ray Train workers on a real local Ray. In the first trial,
    one worker (rank 0, which writes the journal; or rank 1 of 2, which rank 0 waits on in the all-reduce) kills
    itself (`os._exit`, DPAF_TEST_FAIL_AT) mid-window, after the first checkpoint. The search (and a resume, if
    the first run did not end it) then: finishes; the whole search was charged on disk before any trial, within
    the budget, and every iteration the killed attempt executed is in its trial's journal, under the reference;
    it selects among at most K trial folders (Tune ran exactly K: the failed trial was not replaced); release/ is
    whole and never rewritten; and no attempt of the killed trial put its noise on other sums (rule 17): it
    either stayed a failed run with nothing trained after the kill, or a later attempt replayed its first plan.
    In the third case the driver is also SIGKILLed inside finish_search, and the resume must still count the
    failed trial as a run and finish."""
    from dpaf_ray.ray_train import FAIL_AT_ENV
    from test_tune_e2e import _tail

    raw = yaml.safe_load(TINY.read_text())
    raw.update(search="tpe", expected_trials=2)
    raw["trial"]["num_workers"] = workers
    assert raw["fixed"]["checkpoint_every"] == 10 and raw.get("max_concurrent_trials", 1) == 1  # trial 1 dies
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, marker = tmp_path / "run", tmp_path / "worker_died"
    kill_at = 12  # every trial runs ≥ 15 iterations; the window 10–19 is charged, 0–11 have run
    os.environ[FAIL_AT_ENV] = f"{kill_at}:{rank}:{marker}"  # once (the marker): trial 2 trains untouched
    if driver_kill:
        (tmp_path / "markers").mkdir()
        os.environ[KILL_DRIVER_ENV] = f"{driver_kill}:{tmp_path / 'markers'}"
    args = ["--search-space", str(space), "--out", str(out)]
    release_seen, rc, log, runs = None, None, None, 0
    t0 = time.time()
    try:
        for runs in range(1, 4):  # the search, then a resume if it did not end (and one after a driver kill)
            log = tmp_path / f"run{runs}.log"
            rc = _run_tune(args, log, 900)
            release_seen = _release_whole_and_unrewritten(out, release_seen)
            if rc == 0:
                break
            args = ["--resume", str(out)]
    finally:
        os.environ.pop(FAIL_AT_ENV, None)
        os.environ.pop(KILL_DRIVER_ENV, None)
    if driver_kill:
        assert (tmp_path / "markers" / driver_kill).exists(), f"the driver was never killed\n{_tail(log)}"
        assert runs >= 2
    assert marker.exists() and int(marker.read_text()) == kill_at, f"the worker was never killed\n{_tail(log)}"
    assert rc == 0, f"after {runs} run(s): exit {rc}\n{_tail(log)}"
    assert not (out / "release.tmp").exists()

    # the search's charge: on disk, within the budget, the report's, and recomputable from the report alone
    state, k = _released_charge_checked(out, raw)

    # selection among ≤ K runs: Tune ran exactly K trials (the failed one was not replaced), each has its folder
    folders = sorted(p.name for p in (out / "trials").iterdir() if p.is_dir() and not p.name.startswith("ray_"))
    tune_trials = _tune_trials(out)
    assert len(tune_trials) == k and sorted(tune_trials) == folders, (sorted(tune_trials), folders)
    _charged_within_reference(out, state)  # every trial's journal (all it charged) under the reference
    trials = out / "trials"
    plans = {n: json.loads((trials / n / "plan.json").read_text()) for n in folders}
    journals = {n: PrivacyLedger.load(trials / n / "ledger.json") for n in folders}
    finished = {n: json.loads((trials / n / "trial.json").read_text()) for n in folders
                if (trials / n / "trial.json").exists()}
    for name, t in finished.items():  # a finished trial charged exactly its plan, and stayed under the reference
        assert t["iterations"] == t["iterations_planned"] == plans[name]["iterations"]
        assert charged_iterations(journals[name]) == t["iterations"], name
        assert t["epsilon_trial"] <= t["epsilon_reference"] * (1 + 1e-9)
    # the killed trial is the first one Tune started (one trial at a time; the kill fires once)
    victim = next(n for n, t in tune_trials.items() if t["experiment_tag"].startswith("1_"))
    # every iteration its killed attempt executed (0 … kill_at − 1) was charged before it ran
    assert charged_iterations(journals[victim]) >= kill_at
    # rule 17: no attempt of the killed trial added its (trial secret, t) noise to other sums
    if victim in finished:  # a later attempt finished it: it replayed the first attempt's public plan, charged once
        assert finished[victim]["noise_factor"] == plans[victim]["noise_factor"]
        assert charged_iterations(journals[victim]) == plans[victim]["iterations"]
    else:  # a failed run, one of the K: Tune did not restart it, nothing trained past the killed window
        assert tune_trials[victim]["status"] == "ERROR", tune_trials[victim]["status"]
        assert kill_at <= charged_iterations(journals[victim]) <= (kill_at // 10 + 1) * 10
        assert len(finished) == k - 1
    # the release is the best finished trial, byte for byte
    assert finished, "the trial after the kill finished"
    best = max(finished.values(), key=lambda t: t["score"])
    assert json.loads((out / "release" / "score.json").read_text())["score"] == best["score"]
    for name in ("generator.pt", "synthetic.parquet"):
        assert (out / "release" / name).read_bytes() == (trials / best["trial"] / name).read_bytes()
    took = time.time() - t0
    # one more resume: the release stays as it is
    rc = subprocess.run([sys.executable, "tune.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300).returncode
    assert rc == 0 and _snapshot(out / "release") == release_seen
    print(f"worker kill ({workers} worker(s), rank {rank}): {runs} run(s), {took:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_search_whose_only_trial_loses_its_worker_fails_clearly_and_releases_no_generator(tmp_path):
    """K = 1 (TPE: a fixed K) and that trial's only Ray Train worker dies mid-window: no trial finished, but the
    trial touched the data, so the search's ε is spent. tune.py exits 1 naming the worker's death; release/ holds
    the privacy report and an empty score only (no generator, nothing selected), within the budget, and a resume
    touches nothing. The failed trial's journal covers what it executed, under the reference."""
    from dpaf_ray.ray_train import FAIL_AT_ENV
    from test_tune_e2e import _tail

    raw = yaml.safe_load(TINY.read_text())
    raw.update(search="tpe", expected_trials=1)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, marker, log = tmp_path / "run", tmp_path / "worker_died", tmp_path / "run.log"
    kill_at = 12
    os.environ[FAIL_AT_ENV] = f"{kill_at}:0:{marker}"
    try:
        rc = _run_tune(["--search-space", str(space), "--out", str(out)], log, 600)
    finally:
        os.environ.pop(FAIL_AT_ENV, None)
    text = log.read_text(errors="replace")
    assert marker.exists() and rc == 1, f"exit {rc}\n{_tail(log)}"
    assert "no trial finished (1 started)" in text and "worker" in text.split("no trial finished")[-1], _tail(log)
    assert "nothing usable was released" in text
    assert sorted(p.name for p in (out / "release").iterdir()) == ["privacy_report.json", "score.json"]
    assert json.loads((out / "release" / "score.json").read_text())["score"] is None
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["epsilon"] <= raw["epsilon"]
    assert report["epsilon"] == pytest.approx(PrivacyLedger.load(out / "ledger.json").epsilon(raw["delta"]))
    state = json.loads((out / "trials" / "search_state.json").read_text())
    folders = [p for p in (out / "trials").iterdir() if p.is_dir() and not p.name.startswith("ray_")]
    assert state["num_trials"] == 1 and len(folders) == 1 and not (folders[0] / "trial.json").exists()
    assert kill_at <= charged_iterations(PrivacyLedger.load(folders[0] / "ledger.json")) <= 20
    _charged_within_reference(out, state)
    before = _snapshot(out / "release")
    r = subprocess.run([sys.executable, "tune.py", "--resume", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "already released" in r.stderr and _snapshot(out / "release") == before
    assert r.stderr.startswith("error: the search failed")  # not read as a usable release
    assert "holds only the privacy report (no trial finished" in r.stderr and "release:" not in r.stdout
