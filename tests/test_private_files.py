"""Rule 18 (docs/design.md): no file of a run or a search outside `release/` is readable by other
users, and every secret-bearing file is 0600, whatever the operator's umask.

The walk checks effective access from OUT down: another user (the group class, or others) can
read a file only through folders it may traverse, and can list a folder it may read."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import dpaf_ray
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.tuning.search_space import load_search_space
from dpaf_ray.tuning.trial import TrialCheckpointSink
from dpaf_ray.tuning.tuner import SECRET_FILE, run_search

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"
CLASSES = {"group": (stat.S_IRGRP, stat.S_IXGRP), "others": (stat.S_IROTH, stat.S_IXOTH)}


@pytest.fixture
def open_umask():
    """The harshest umask: anything not made private on purpose is readable by everyone."""
    old = os.umask(0)
    yield
    os.umask(old)


def exposed(out: Path) -> list[str]:
    """Every path under OUT, outside OUT/release, that the group or others can read or list."""
    found = []

    def walk(folder: Path, reachable: dict[str, bool]) -> None:
        for path in sorted(folder.iterdir()):
            if path.parent == out and path.name == "release":
                continue
            mode = path.lstat().st_mode
            for who, (read, execute) in CLASSES.items():
                if reachable[who] and mode & (read | (execute if path.is_dir() else 0)):
                    found.append(f"{path.relative_to(out)} ({who}: {stat.filemode(mode)})")
            if path.is_dir() and not path.is_symlink():
                walk(path, {who: reachable[who] and bool(mode & execute) for who, (_, execute) in CLASSES.items()})

    top = out.stat().st_mode
    for who, (read, execute) in CLASSES.items():
        if top & read:
            found.append(f". ({who} can list OUT: {stat.filemode(top)})")
    walk(out, {who: bool(top & execute) for who, (_, execute) in CLASSES.items()})
    return found


def assert_secret_file(path: Path) -> None:
    assert path.exists(), path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path}: {stat.filemode(path.stat().st_mode)}"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent


def test_a_finished_train_run_and_its_evaluation_expose_nothing_but_the_release(tmp_path, open_umask, monkeypatch):
    import dpaf_ray.evaluation.run as evaluation_run

    monkeypatch.setattr(evaluation_run, "evaluate", lambda *a, **k: {"real_data_accuracy": 0.5})  # the files only
    evaluate_run = evaluation_run.evaluate_run
    out = tmp_path / "run"
    run = dpaf_ray.train("mnist-5k", epsilon=2.0, delta=1e-5, out=out, iterations=4, seed=3, batch_size=32,
                         group_size=16, feature_channels=4, num_threads=1, checkpoint_every=2, log_every=2,
                         num_synthetic=20, progress=None, force=True)  # a deliberately tiny plan
    assert (out / "release" / "privacy_report.json").exists() and run.metrics["iterations_executed"] == 4
    written = evaluate_run(out, "mnist-5k", num_synthetic=20)["written_to"]  # noiseless real-data statistics
    assert Path(written).parent == out / "evaluation"
    elsewhere = evaluate_run(out, "mnist-5k", num_synthetic=20, out=tmp_path / "eval.json")["written_to"]
    assert stat.S_IMODE(Path(elsewhere).stat().st_mode) == 0o600  # --out FILE: the operator's alone too
    assert {"checkpoint", "ledger.json", "config.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert exposed(out) == []
    assert_secret_file(out / "checkpoint" / "state.pt")  # it holds the run secret
    assert not list(out.rglob("*.tmp"))
    os.chmod(out, 0o711)  # the operator opens OUT so others can fetch release/: its secret folders stay closed
    assert not [p for p in exposed(out) if p.split(" ")[0].split("/")[0] in ("checkpoint", "evaluation")]


@pytest.mark.slow
def test_a_ray_train_run_exposes_nothing_but_its_release(tmp_path, open_umask):
    """Ray Train copies the secret-bearing checkpoints into OUT/ray_train with the umask: its folder holds."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        out = tmp_path / "run"
        dpaf_ray.train("mnist-5k", epsilon=2.0, delta=1e-5, out=out, iterations=4, seed=3, batch_size=32,
                       group_size=16, feature_channels=4, num_threads=1, checkpoint_every=2, log_every=2,
                       num_synthetic=20, num_workers=1, progress=None, force=True)  # a deliberately tiny plan
    finally:
        ray.shutdown()
    assert list((out / "ray_train").rglob("state.pt"))
    assert exposed(out) == []
    os.chmod(out, 0o711)  # OUT opened to share release/: Ray Train's storage stays closed
    assert not [p for p in exposed(out) if p.startswith("ray_train")]


class StopBeforeRay(Exception):
    """Raised where Ray would start: the search folder is then as a search leaves it before any trial."""


def prepare_search(out: Path, monkeypatch, resume: bool = False) -> None:
    """`run_search` (or its resume) on OUT up to the moment Ray would start."""
    import dpaf_ray.ray_train

    def stop(*args, **kwargs):
        raise StopBeforeRay

    monkeypatch.setattr(dpaf_ray.ray_train, "ensure_ray", stop)
    with pytest.raises(StopBeforeRay):
        run_search(load_search_space(TINY), out, resume=resume, progress=lambda _: None)


def test_a_prepared_search_exposes_nothing_and_its_secrets_are_0600(tmp_path, open_umask, monkeypatch):
    """`run_search` up to the moment Ray would start: K, the secret and the charged ledger are on disk."""
    out = tmp_path / "search"
    prepare_search(out, monkeypatch)
    assert (out / "trials" / "search_state.json").exists() and (out / "ledger.json").exists()
    trial = out / "trials" / "trial_0"
    trial.mkdir()  # as a trial makes it, then its checkpoint (the trial's secret)
    TrialCheckpointSink(trial).save({"ledger": [], "secret": RunSecret.fresh().to_checkpoint()}, {})
    assert exposed(out) == []
    assert_secret_file(out / "checkpoint" / SECRET_FILE)
    assert_secret_file(trial / "checkpoint" / "state.pt")
    assert "secret" in torch.load(trial / "checkpoint" / "state.pt", weights_only=False)


def test_resuming_a_search_made_before_rule_18_held_locks_its_folder(tmp_path, open_umask, monkeypatch):
    """An older search folder (0777 under this umask) is tightened when it is resumed, before any trial."""
    out = tmp_path / "search"
    prepare_search(out, monkeypatch)
    for path in [out, *out.rglob("*")]:  # as an older version with an open umask left it
        os.chmod(path, 0o777 if path.is_dir() else 0o666)
    assert exposed(out)
    prepare_search(out, monkeypatch, resume=True)
    assert exposed(out) == []


def test_the_walk_sees_an_exposed_file_and_honours_a_closed_folder(tmp_path):
    out = tmp_path / "run"
    (out / "release").mkdir(parents=True)
    (out / "inner").mkdir()
    (out / "inner" / "secret").write_text("x")
    (out / "release" / "public").write_text("x")
    for path, mode in [(out, 0o755), (out / "inner", 0o755), (out / "inner" / "secret", 0o644),
                       (out / "release", 0o755), (out / "release" / "public", 0o644)]:
        os.chmod(path, mode)
    assert exposed(out) == [". (group can list OUT: drwxr-xr-x)", ". (others can list OUT: drwxr-xr-x)",
                            "inner (group: drwxr-xr-x)", "inner (others: drwxr-xr-x)",
                            "inner/secret (group: -rw-r--r--)", "inner/secret (others: -rw-r--r--)"]
    os.chmod(out / "inner", 0o700)
    os.chmod(out, 0o711)
    assert exposed(out) == []  # a 0644 file in a 0700 folder is not readable by others; release/ is not walked


def test_an_out_the_operator_cannot_lock_is_refused_with_exit_2_before_anything_is_written(tmp_path, monkeypatch,
                                                                                              capsys):
    """E.g. another user's folder: chmod fails, and nothing is charged or written there."""
    import dpaf_ray.run_dir
    from dpaf_ray import cli

    out = tmp_path / "theirs"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(dpaf_ray.run_dir.os, "chmod", refuse)
    rc = cli.main(["train", "--dataset", "mnist-5k", "--epsilon", "2", "--iterations", "2", "--batch-size", "32",
                   "--group-size", "16", "--num-threads", "1", "--force", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(out) in err and "0700" in err and "--out" in err
    assert list(out.iterdir()) == []


def test_an_existing_folder_that_is_not_a_run_is_refused_not_closed(tmp_path, capsys):
    """`--out .` or `--out ~`: making it 0700 would close the operator's own folder to other users behind their
    back, so it is refused with exit 2 (its files and mode untouched); an empty folder or a run folder is tightened."""
    from dpaf_ray import cli
    from dpaf_ray.run_dir import own_run_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (shared / "notes.txt").write_text("mine")
    rc = cli.main(["train", "--dataset", "mnist-5k", "--epsilon", "2", "--iterations", "2", "--batch-size", "32",
                   "--group-size", "16", "--num-threads", "1", "--force", "--out", str(shared)])
    assert rc == 2
    assert "new folder for --out" in capsys.readouterr().err
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and sorted(p.name for p in shared.iterdir()) == ["notes.txt"]
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    run.mkdir()
    (run / "ledger.json").write_text("{}")  # an interrupted run of ours
    for folder in (empty, run):
        os.chmod(folder, 0o755)
        assert stat.S_IMODE(own_run_dir(folder).stat().st_mode) == 0o700
