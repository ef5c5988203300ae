"""The Python API (issue #16): train → load → sample → recompute, and the command line as a thin
layer over it; every flag an error message names exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import dpaf_ray
from dpaf_ray import cli
from dpaf_ray.tuning import cli as tune_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.smoke
def test_train_load_sample_and_recompute_round_trip(tmp_path):
    run = dpaf_ray.train("mnist-5k", epsilon=2.0, delta=1e-5, out=tmp_path / "run", iterations=6, seed=3,
                         batch_size=32, group_size=16, feature_channels=4, num_threads=1, checkpoint_every=3,
                         log_every=3, num_synthetic=50, progress=None, force=True)  # tiny on purpose
    assert isinstance(run, dpaf_ray.Run)
    assert 0.99 * 2.0 <= run.epsilon <= 2.0 and run.delta == 1e-5  # the planner spends the budget in 6 it.
    assert run.metrics["iterations_executed"] == 6
    g = dpaf_ray.load_generator(run.release_path / "generator.pt")
    images, labels = g.sample(12, labels=torch.arange(12) % 10, seed=1)
    assert images.shape == (12, 1, 28, 28) and labels.tolist() == (torch.arange(12) % 10).tolist()
    assert images.min() >= -1 and images.max() <= 1
    again, _ = run.sample(labels=torch.arange(12) % 10, seed=1)
    assert torch.equal(again, images)  # sampling is a function of the released generator and a public seed
    report = dpaf_ray.privacy_report(run.path)
    assert report["epsilon"] == pytest.approx(run.epsilon, rel=1e-12) and report["private"]
    assert report["assumptions"]["data_set_size_public"] == 4000
    with pytest.raises(ValueError, match="labels"):
        g.sample(labels=[11])


def test_unknown_knob_is_a_clear_error(tmp_path):
    from dpaf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="bach_size"):
        dpaf_ray.train(out=tmp_path / "x", bach_size=64)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------- every flag named in an error exists


def _option_strings(parser) -> set[str]:
    import argparse

    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


# Flags of other programs that messages legitimately quote.
FOREIGN = {"--address", "--resources", "--head", "--no-sandbox", "--num-cpus", "--num-gpus", "--port"}


def _flags_in_string_literals(path: Path) -> set[str]:
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            flags |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)", node.value))
    return flags


def test_every_flag_named_in_the_code_exists_in_a_parser():
    known = _option_strings(cli.build_parser()) | _option_strings(tune_cli.build_parser()) | FOREIGN
    missing, seen = {}, set()
    for path in (ROOT / "dpaf_ray").rglob("*.py"):
        seen |= _flags_in_string_literals(path)
        for flag in _flags_in_string_literals(path):
            if flag not in known and not flag.startswith("--no-"):
                missing.setdefault(flag, []).append(str(path.relative_to(ROOT)))
            elif flag.startswith("--no-") and "--" + flag[5:] not in known and flag not in known:
                missing.setdefault(flag, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"messages name flags that no parser has: {missing}"
    assert {"--epsilon", "--num-classes", "--noise-split"} <= seen and len(seen) > 30  # the scan does see them
