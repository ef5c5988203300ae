"""`python -m dpaf_ray train` with an impossible option: exit code 2, a message that names the
option (or the offending data), and nothing written or overwritten in --out."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpaf_ray import cli

torch.set_num_threads(1)

SENTINEL = "precious.txt"


def _image_folder(root: Path, size: int, per_class: int = 12, classes: int = 3) -> Path:
    for k in range(classes):
        d = root / f"c{k}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (size, size), color=(17 * i + 60 * k) % 256).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("ok") / "data", 28)  # 36 images, 32 after validation


@pytest.fixture(scope="module")
def wrong_shape_data(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("bad") / "data", 20)


def _snapshot(d: Path) -> dict[str, str]:
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


CASES = {
    "epsilon_zero": (["--epsilon", "0"], ["--epsilon"]),
    "epsilon_negative": (["--epsilon", "-1"], ["--epsilon"]),
    "delta_one": (["--delta", "1"], ["--delta"]),
    "delta_zero": (["--delta", "0"], ["--delta"]),
    "sigma_agg_zero": (["--sigma-agg", "0"], ["--sigma-agg"]),
    "q_above_one": (["--batch-size", "100000", "DATA"], ["--batch-size"]),
    "group_larger_than_batch": (["--batch-size", "8", "--group-size", "16", "DATA"], ["--group-size"]),
    "epsilon_too_small_for_one_iteration": (["--epsilon", "1e-4", "--batch-size", "8", "--group-size", "4", "DATA"],
                                            ["--epsilon"]),
    "missing_dataset": (["--dataset", "MISSING"], ["MISSING"]),
    "wrong_image_shape": (["--dataset", "WRONG", "--batch-size", "8", "--group-size", "4"], ["20x20"]),
    "unknown_model": (["--model", "stylegan"], ["--model"]),
}


@pytest.mark.parametrize("fresh_out", [False, True], ids=["existing_out", "new_out"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_with_impossible_option_exits_2_and_writes_nothing(case, fresh_out, tmp_path, small_data,
                                                                  wrong_shape_data, capsys):
    args, must_mention = CASES[case]
    subst = {"DATA": ["--dataset", str(small_data)], "MISSING": [str(tmp_path / "no" / "such" / "dataset")],
             "WRONG": [str(wrong_shape_data)]}
    argv = [x for a in args for x in subst.get(a, [a])]
    must_mention = [subst[m][0] if m in subst else m for m in must_mention]
    # a fixed T unless the case is about deriving T from the budget
    fixed_t = [] if case == "epsilon_too_small_for_one_iteration" else ["--iterations", "2"]

    out = tmp_path / "out"
    if not fresh_out:
        out.mkdir()
        (out / SENTINEL).write_text("results of an earlier run\n")
    before = _snapshot(out)

    capsys.readouterr()
    rc = cli.main(["train", "--out", str(out), "--seed", "0", "--num-synthetic", "10", *fixed_t, *argv])
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err
    assert err.startswith("error:"), err
    for word in must_mention:
        assert word in err, f"{word!r} not named in: {err}"
    assert "Traceback" not in err
    # nothing written, nothing already there touched
    after = _snapshot(out)
    if fresh_out:  # run_train creates --out before validating: an empty folder is tolerated, files are not
        assert after == {}, f"partial output left behind: {after}"
    else:
        assert after == before
    assert not (out / "release").exists()


def test_missing_dataset_message_says_how_to_fix(tmp_path, capsys):
    rc = cli.main(["train", "--out", str(tmp_path / "o"), "--dataset", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "mnist-5k" in err or "image folder" in err  # lists what would work


@pytest.mark.smoke
def test_module_entry_point_exit_status_is_2(tmp_path):
    """The real `python -m dpaf_ray` process, not just `main()`'s return value."""
    import subprocess
    import sys

    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--out", str(out), "--delta", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert "--delta" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "release").exists() and not (out / "config.json").exists()


@pytest.mark.smoke
def test_a_one_class_data_set_gets_its_own_error(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", 28, classes=1)
    out = tmp_path / "o"
    rc = cli.main(["train", "--out", str(out), "--dataset", str(data), "--iterations", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "at least 2" in err and "--batch-size" not in err, err
    assert not (out / "ledger.json").exists()


def test_train_help_teaches_in_groups_and_help_all_lists_the_rest():
    """`train --help`: the common options in about 60 lines, in groups; `--help-all`: every option,
    each with a description; `--dataset` names the formats a newcomer's images may come in."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    short = subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=repo)
    full = subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--help-all"], capture_output=True, text=True,
                          timeout=120, cwd=repo)
    assert short.returncode == 0 and full.returncode == 0
    assert len(short.stdout.splitlines()) <= 70, len(short.stdout.splitlines())
    for group in ("budget:", "data:", "compute:", "model:"):
        assert group in short.stdout
    assert "advanced:" in full.stdout and "--sgd-every" in full.stdout and "--sgd-every" not in short.stdout
    import re

    text = re.sub(r"-\s+", "-", " ".join(short.stdout.split()))  # undo argparse's line wrapping
    for word in ("mnist-5k", "fashion-mnist", "IDX", "sub-folder per class", "Parquet"):
        assert word in text, word
    parser = cli.build_parser(full=True)
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    undocumented = [a.option_strings[0] for a in train._actions if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []
    # a hidden option is still accepted
    assert cli.build_parser().parse_args(["train", "--out", "x", "--sgd-every", "1"]).sgd_every == 1


def test_a_slow_run_shows_seconds_per_iteration_not_zero_it_per_second():
    from dpaf_ray.training.loop import _speed

    assert _speed(0.02) == "50.0 s/it" and _speed(3.0) == "3.0 it/s"
