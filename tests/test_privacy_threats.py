"""Tests that play the attacker (docs/design.md rules 13–16): someone who holds every file a run writes
outside its checkpoints, and the code, must not be able to replay the privacy randomness; one
record must not move others across the validation split; every executed release must be
charged on disk, even for a run killed before its first checkpoint; the release holds nothing
the ledger does not cover."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpaf_ray import cli
from dpaf_ray.config import TrainConfig
from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.data.splits import SPLIT_LABEL, held_out
from dpaf_ray.privacy.ledger import PrivacyLedger
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.release import RELEASE_FILES
from dpaf_ray.run import prepare, run_train
from dpaf_ray.training.loop import train_loop

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "32", "--group-size", "16", "--feature-channels", "4", "--num-threads", "1",
         "--checkpoint-every", "10", "--log-every", "5", "--num-synthetic", "100"]


def small_cfg(**kw) -> TrainConfig:
    base = dict(dataset="mnist-5k", epsilon=10, batch_size=32, group_size=16, feature_channels=4, num_threads=1,
                checkpoint_every=10, log_every=5, iterations=8)
    base.update(kw)
    return TrainConfig(**base)


def params(generator: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in generator.parameters()])


# ---------------------------------------------------------------- the secret never leaves the checkpoint


def derived_byte_strings(secret: RunSecret, iterations: int) -> dict[str, bytes]:
    """The secret and values derived from it that a leak would most likely expose."""
    keys = {"secret": secret.to_checkpoint()["key"],
            "split_key": secret.child(SPLIT_LABEL).to_checkpoint()["key"]}
    for t in range(iterations):
        for name in ("poisson", "noise/dpagg/real", "noise/dpsgd/conv2"):
            keys[f"{name}/{t}"] = secret.stream(name, t)._key
        keys[f"poisson-bytes/{t}"] = secret.stream("poisson", t).read(16)
    return keys


def encodings(b: bytes) -> list[bytes]:
    ints = [int.from_bytes(b[:8], "little"), int.from_bytes(b[:8], "big"), int.from_bytes(b[:8], "little") >> 1]
    return [b, b.hex().encode(), b.hex().upper().encode(), base64.b64encode(b), base64.urlsafe_b64encode(b),
            repr(b).encode()[2:-1], b.decode("latin1").encode("utf-8")]  \
        + [str(i).encode() for i in ints]  # latin1→UTF-8 is how pickle protocol 2 stores bytes


def files_outside_checkpoints(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any("checkpoint" in part for part in p.parts)]


def leaks(root: Path, strings: dict[str, bytes]) -> list[tuple[str, str]]:
    found = []
    for path in files_outside_checkpoints(root):
        data = path.read_bytes()
        for name, b in strings.items():
            if any(len(e) >= 8 and e in data for e in encodings(b)):
                found.append((str(path.relative_to(root)), name))
    return found


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """A real `train` run whose secret the test captures (the attacker does not have it)."""
    made: list[RunSecret] = []
    original = RunSecret.fresh

    def capture() -> RunSecret:
        s = original()
        made.append(s)
        return s

    out = tmp_path_factory.mktemp("private") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(RunSecret, "fresh", classmethod(lambda cls: capture()))
    try:
        run_train(small_cfg(seed=17), out, num_synthetic=100, progress=None)
    finally:
        mp.undo()
    assert len(made) == 1
    return out, made[0]


def test_no_byte_string_derived_from_the_secret_is_written_outside_the_checkpoint(private_run):
    out, secret = private_run
    strings = derived_byte_strings(secret, 8)
    assert leaks(out, strings) == []
    # the scan can find what it looks for: the checkpoint does hold the secret (and is private)
    state = (out / "checkpoint" / "state.pt").read_bytes()
    assert any(e in state for e in encodings(secret.to_checkpoint()["key"]))
    assert sorted(p.name for p in (out / "release").iterdir()) == sorted(RELEASE_FILES)
    for path in files_outside_checkpoints(out):  # nothing outside checkpoints even names the seed's role wrongly
        assert b"RunSecret(" not in path.read_bytes() or b"<redacted>" in path.read_bytes()


def test_the_secret_refuses_json_and_hides_in_repr():
    s = RunSecret.fresh()
    assert "redacted" in repr(s) and s.to_checkpoint()["key"].hex() not in repr(s) + str(s)
    with pytest.raises(TypeError):
        json.dumps({"s": s})
    assert RunSecret.fresh() != s  # 256 fresh bits each time


def test_same_public_seed_with_fresh_secrets_gives_other_noise_and_other_generators():
    ds = ImageDataset(torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)),
                      torch.arange(120) % 3, 3, "random")
    runs = {}
    for name, reproducible in (("a", False), ("b", False), ("c", True), ("d", True)):
        cfg = TrainConfig(batch_size=24, group_size=8, seed=5, iterations=4, feature_channels=4, num_threads=1,
                          epsilon=50, reproducible_noise=reproducible, log_every=2, checkpoint_every=2)
        from dpaf_ray.training.plan import plan_training

        runs[name] = params(train_loop(plan_training(cfg, len(ds)), ds, len(ds), progress=None).trainer.generator)
    assert not torch.equal(runs["a"], runs["b"])  # same public seed, fresh secrets
    assert torch.equal(runs["c"], runs["d"])  # --reproducible-noise: bit for bit


def test_a_scan_over_the_public_seed_space_does_not_replay_the_released_generator(private_run):
    """The seed-recovery attack of issue #11, shrunk: the attacker knows the code, the data (the
    strongest attacker), the public seed (config.json) and every file outside the checkpoint, and
    replays the run for candidate seeds with the only noise it can reproduce."""
    from dpaf_ray.models.generator import load_generator

    out, _ = private_run
    released = params(load_generator(out / "release" / "generator.pt"))
    public_seed = json.loads((out / "config.json").read_text())["seed"]
    assert public_seed == 17

    def replay(seed: int) -> torch.Tensor:
        cfg, data, plan, secret = prepare(small_cfg(seed=seed, reproducible_noise=True))
        res = train_loop(plan, data.train, len(data.train), progress=None, secret=secret)
        return params(res.trainer.generator)

    candidates = sorted({public_seed, *range(0, 6)})
    distances = {s: (replay(s) - released).abs().max().item() for s in candidates}
    assert min(distances.values()) > 1e-4, distances
    # ...while the same scan does find a run made with --reproducible-noise: the attack is real
    cfg, data, plan, secret = prepare(small_cfg(seed=3, reproducible_noise=True))
    target = params(train_loop(plan, data.train, len(data.train), progress=None, secret=secret).trainer.generator)
    assert min((replay(s) - target).abs().max().item() for s in range(0, 6)) == 0.0


# ---------------------------------------------------------------- rule 14: the split moves no one else


def test_adding_or_removing_one_record_moves_no_other_record_across_the_split():
    g = torch.Generator().manual_seed(1)
    n = 400
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    images[10:20] = images[0]  # duplicates
    labels = torch.randint(0, 10, (n,), generator=g)
    labels[10:20] = labels[0]
    ds = ImageDataset(images, labels, 10, "dups")
    key = RunSecret.fresh().child(SPLIT_LABEL)
    base = held_out(ds, 0.2, key)
    assert 40 < int(base.sum()) < 120  # about 20 % held out
    assert len(set(base[[0, *range(10, 20)]].tolist())) == 1  # identical records, same side
    for i in (0, 1, 15, 199, n - 1):  # remove record i
        keep = torch.tensor([j for j in range(n) if j != i])
        assert torch.equal(held_out(ds.subset(keep), 0.2, key), base[keep]), i
    for pos in (0, 57, n):  # add a new record, and a duplicate of record 3, at several positions
        for new_img, new_lbl in ((torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8, generator=g),
                                  torch.tensor([4])), (images[3:4], labels[3:4])):
            grown = ImageDataset(torch.cat([images[:pos], new_img, images[pos:]]),
                                 torch.cat([labels[:pos], new_lbl, labels[pos:]]), 10, "grown")
            mask = held_out(grown, 0.2, key)
            assert torch.equal(torch.cat([mask[:pos], mask[pos + 1:]]), base), pos
    # a different key gives a different split (the side is not a public function of the record)
    assert not torch.equal(held_out(ds, 0.2, RunSecret.fresh().child(SPLIT_LABEL)), base)


def test_the_score_divides_by_the_public_expected_validation_size():
    from dpaf_ray.tuning.scoring import score_trial

    ds = ImageDataset(torch.zeros(30, 1, 28, 28, dtype=torch.uint8), torch.arange(30) % 3, 3, "v")
    secret = RunSecret.from_public_seed(0)
    ledger = PrivacyLedger()
    a = score_trial(ds, ds, ledger, 1e-9, 1, 1, expected_validation=50.0, secret=secret)
    b = score_trial(ds, ds.subset(torch.arange(20)), PrivacyLedger(), 1e-9, 1, 1, expected_validation=50.0,
                    secret=secret)
    assert a.expected_validation == 50.0 and a.value * 50.0 == pytest.approx(round(a.value * 50.0), abs=1e-6)
    assert a.value <= 30 / 50 and b.value <= 20 / 50  # a realised-count divisor would give up to 1.0
    assert len(ledger.entries) == 1  # charged


def test_private_streams_are_uniform_normal_and_never_oversample():
    s = RunSecret.from_public_seed(7)
    z = s.stream("noise/x", 0).normal(200_000)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert abs(((z ** 4).mean()) - 3.0) < 0.1  # Gaussian kurtosis, not a sum of few uniforms
    q = 0.0123
    hits = s.stream("poisson", 0).bernoulli(400_000, q)
    assert hits.mean() == pytest.approx(q, rel=0.05)
    assert s.stream("poisson", 0).bernoulli(10, 0.0).sum() == 0 and s.stream("poisson", 0).bernoulli(10, 1.0).all()
    a, b, c = (s.stream("poisson", 0).uniform(64), s.stream("poisson", 1).uniform(64),
               s.stream("noise", 0).uniform(64))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, s.stream("poisson", 0).uniform(64))  # keyed: recomputable from the secret


# ---------------------------------------------------------------- rule 16: the ledger is write-ahead


def test_a_crash_before_the_first_checkpoint_leaves_its_charges_on_disk(tmp_path, monkeypatch):
    from dpaf_ray.training.dpaf import DPAFTrainer

    original = DPAFTrainer.d_iteration
    ran: list[int] = []

    def dying(self, t):
        if t == 7:
            raise KeyboardInterrupt  # killed inside the first window (checkpoint_every 10)
        ran.append(t)
        return original(self, t)

    monkeypatch.setattr(DPAFTrainer, "d_iteration", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_train(small_cfg(seed=1, iterations=None, max_iterations=30), out, progress=None)
    assert not (out / "checkpoint" / "state.pt").exists()
    first = PrivacyLedger.load(out / "ledger.json")
    assert sum(e.count for e in first.entries) >= len(ran) == 7
    # the restart carries the spend forward, plans the rest of the budget, and never starts from zero
    monkeypatch.setattr(DPAFTrainer, "d_iteration", original)
    metrics = run_train(small_cfg(seed=1, iterations=None, max_iterations=30), out, progress=None)
    final = PrivacyLedger.load(out / "ledger.json")
    assert sum(e.count for e in final.entries) >= 7 + metrics["iterations_executed"]
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(final.epsilon(1e-5)) and report["epsilon"] <= 10.0 + 1e-9
    assert report["epsilon"] > first.epsilon(1e-5)


def _executed(stdout: str) -> int:
    return sum(1 for line in stdout.splitlines() if line.startswith("iter "))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 14, 27])
def test_sigkill_at_random_points_never_leaves_an_executed_release_uncharged(tmp_path, kill_after):
    """`train` killed with SIGKILL (before its first checkpoint, inside a later window) and
    restarted in the same --out: OUT/ledger.json charges at least every iteration both
    attempts executed (each prints one line per iteration, after running it)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "dpaf_ray", "train", "--epsilon", "10", "--max-iterations", "40",
           "--seed", "2", "--out", str(out), *SMALL, "--log-every", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter ") and _executed("".join(lines)) >= kill_after:
            time.sleep(random.uniform(0, 0.3))  # somewhere inside the next iteration
            os.kill(proc.pid, signal.SIGKILL)
            break
    rest = proc.stdout.read()
    proc.wait(60)
    first = _executed("".join(lines) + rest)
    assert first >= kill_after
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    ledger = PrivacyLedger.load(out / "ledger.json")
    assert sum(e.count for e in ledger.entries) >= first + _executed(second.stdout)
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(ledger.epsilon(1e-5))


# ---------------------------------------------------------------- rule 15: the release stays clean


def test_evaluate_refuses_to_write_into_a_release_folder(private_run, tmp_path, capsys):
    out, _ = private_run
    release = out / "release"
    before = {p.name: p.read_bytes() for p in release.iterdir()}
    assert cli.main(["evaluate", str(release), "--test-data", "mnist-5k", "--num-synthetic", "50"]) == 2
    assert "release folder" in capsys.readouterr().err
    assert cli.main(["evaluate", str(out), "--test-data", "mnist-5k", "--num-synthetic", "50",
                     "--out", str(release / "e.json")]) == 2
    assert {p.name: p.read_bytes() for p in release.iterdir()} == before


def test_public_validation_that_names_the_private_data_is_refused(tmp_path, capsys):
    from dpaf_ray.tuning import cli as tune_cli

    rc = tune_cli.main(["--dataset", "mnist-5k", "--public-validation", "MNIST-5k", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "public_validation" in err and "private data set itself" in err
    assert not (tmp_path / "o").exists()


def test_reproducible_noise_is_marked_not_private_and_refused_by_tune(tmp_path, capsys):
    from dpaf_ray.tuning import cli as tune_cli

    out = tmp_path / "r"
    assert cli.main(["train", "--reproducible-noise", "--seed", "4", "--iterations", "3", "--out", str(out),
                     *SMALL]) == 0
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert report["reproducible_noise"] is True and report["private"] is False and "NOT PRIVATE" in report["warning"]
    capsys.readouterr()
    assert cli.main(["privacy", str(out / "release" / "privacy_report.json")]) == 0
    assert "NOT PRIVATE" in capsys.readouterr().err
    assert cli.main(["train", "--reproducible-noise", "--out", str(tmp_path / "x"), *SMALL]) == 2  # needs --seed
    assert tune_cli.main(["--reproducible-noise", "--out", str(tmp_path / "t")]) == 2
    assert "refused by tune.py" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


import time  # noqa: E402  (used by the slow SIGKILL test)
