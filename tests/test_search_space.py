"""Search-space files (YAML) and tune.py's command line: every shipped file loads; every bad file is
refused once, up front, with a SearchSpaceError that names the file, the key and the fix; and an
impossible budget fails before anything runs (docs/design.md §6, rule 12)."""
from __future__ import annotations

import copy
import glob
import math
from pathlib import Path

import pytest
import yaml

from dpaf_ray.config import ConfigError
from dpaf_ray.tuning import cli
from dpaf_ray.tuning.search_space import SearchSpace, load_search_space
from dpaf_ray.tuning.search_space_error import SearchSpaceError

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted(glob.glob(str(ROOT / "search_spaces" / "*.yaml")) + glob.glob(str(ROOT / "search_spaces" / "*.yml")))
TINY = ROOT / "search_spaces" / "tiny.yaml"


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """Nothing here should start Ray; if something does, shut it down."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("a search-space/CLI check started Ray")


# ------------------------------------------------------------------------------ good files


def test_there_are_search_spaces_to_check():
    names = {Path(p).name for p in SPACES}
    assert {"default.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", SPACES, ids=[Path(p).name for p in SPACES])
def test_every_shipped_search_space_loads(path):
    ss = load_search_space(path)
    assert isinstance(ss, SearchSpace)
    assert ss.path == path
    assert ss.epsilon > 0 and 0 < ss.delta < 1
    assert ss.search in ("random", "tpe")
    assert ss.trial_iterations is None or ss.trial_iterations >= 1
    assert ss.params, "a search space with nothing to search"
    for p in ss.params:
        p.optuna_distribution()  # Optuna accepts every distribution
    # the command line accepts it too, without overrides
    args = cli.build_parser().parse_args(["--search-space", path])
    assert cli.search_space_from_args(args).params == ss.params


def test_tiny_is_seconds_sized():
    ss = load_search_space(TINY)
    assert ss.trial_iterations <= 50 and ss.num_synthetic <= 1000 and ss.expected_trials <= 2


# ------------------------------------------------------------------------------- bad files


def base() -> dict:
    return yaml.safe_load(TINY.read_text())


def write(tmp_path: Path, raw, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return p


def mutate(**changes):
    def f(raw: dict) -> dict:
        raw = copy.deepcopy(raw)
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            d = raw
            for k in parents:
                d = d.setdefault(k, {})
            d[last] = value
        return raw

    return f


# (id, mutation, key named in the message, a phrase of the fix)
BAD = [
    ("unknown-top-level-key", mutate(epsilom=3.0), "`epsilom`", "allowed keys here"),
    ("unknown-param-knob", mutate(params__sigma_foo={"choice": [1, 2]}), "`params.sigma_foo`", "searchable:"),
    ("derived-knob-searched", mutate(params__iterations={"int": [10, 20]}), "`params.iterations`", "searchable:"),
    ("unknown-param-spec-key", mutate(params__sigma_agg={"float": [1.0, 2.0], "logg": True}), "params.sigma_agg",
     "allowed keys here"),
    ("param-spec-not-a-mapping", mutate(params__sigma_agg=[1.0, 2.0]), "`params.sigma_agg`", "give exactly one of"),
    ("unknown-trial-key", mutate(trial__max_iteration=5), "`trial.max_iteration`", "allowed keys here"),
    ("unknown-reference-key", mutate(reference__sigma=1.0), "`reference.sigma`", "allowed keys here"),
    ("unknown-fixed-knob", mutate(fixed__sigma_foo=1.0), "`fixed.sigma_foo`", "allowed:"),
    ("empty-choice", mutate(params__batch_size={"choice": []}), "`params.batch_size`", "non-empty list"),
    ("inverted-range", mutate(params__sigma_agg={"float": [3, 1]}), "`params.sigma_agg`", "low must be < high"),
    ("equal-bounds", mutate(params__sigma_agg={"float": [2.0, 2.0]}), "`params.sigma_agg`", "low must be < high"),
    ("int-equal-bounds", mutate(params__batch_size={"int": [64, 64]}), "`params.batch_size`", "low must be < high"),
    ("log-low-zero", mutate(params__lr_d={"float": [0.0, 0.01], "log": True}), "`params.lr_d`", "log scale needs low > 0"),
    ("log-low-negative", mutate(params__kappa={"float": [-1.0, 1.0], "log": True}), "`params.kappa`",
     "log scale needs low > 0"),
    ("non-number-bound", mutate(params__sigma_agg={"float": ["one", 3.0]}), "`params.sigma_agg`", "must be a number"),
    ("range-not-a-pair", mutate(params__sigma_agg={"float": [1.0, 2.0, 3.0]}), "`params.sigma_agg`", "[low, high]"),
    ("int-range-fractional", mutate(params__batch_size={"int": [64.5, 128]}), "`params.batch_size`", "whole numbers"),
    ("param-also-fixed", mutate(fixed__sigma_agg=2.0), "`params.sigma_agg`", "keep it in one place"),
    ("sigma-agg-zero-in-choice", mutate(params__sigma_agg={"choice": [1.0, 0.0]}), "`params.sigma_agg`",
     "--sigma-agg: must be > 0"),
    ("epsilon-zero", mutate(epsilon=0), "`epsilon`", "must be > 0"),
    ("epsilon-negative", mutate(epsilon=-1.0), "`epsilon`", "must be > 0"),
    ("epsilon-not-a-number", mutate(epsilon="ten"), "`epsilon`", "must be a number"),
    ("epsilon-infinite", mutate(epsilon=math.inf), "`epsilon`", "must be a number"),
    ("delta-one", mutate(delta=1.0), "`delta`", "strictly between 0 and 1"),
    ("delta-above-one", mutate(delta=2.0), "`delta`", "strictly between 0 and 1"),
    ("search-unknown", mutate(search="grid"), "`search`", "'random' or 'tpe'"),
    ("distribution-unknown", mutate(trials_distribution="uniform"), "`trials_distribution`", "one of"),
    ("tnb-mean-one", mutate(expected_trials=1), "`expected_trials`", "mean > 1"),
    ("tpe-fractional-k", mutate(search="tpe", expected_trials=2.5), "`expected_trials`", "whole number"),
    ("old-min-iterations", mutate(trial__min_iterations=30), "`trial.min_iterations`", "trial.iterations"),
    ("old-reference-noise", mutate(reference__noise_multiplier=1.0), "`reference.noise_multiplier`",
     "calibrated from the budget"),
    ("iterations-zero", mutate(trial__iterations=0), "`trial.iterations`", "must be > 0"),
    ("reference-batch-zero", mutate(reference__batch_size=0), "`reference.batch_size`", "must be > 0"),
    ("reference-classifier-steps-negative", mutate(reference__classifier_steps=-5), "`reference.classifier_steps`",
     "whole number >= 0"),
    ("score-noise-negative", mutate(score__noise_multiplier=-1), "`score.noise_multiplier`", "must be > 0"),
    ("section-not-a-mapping", mutate(trial=[1, 2]), "`trial`", "must be a mapping"),
]


@pytest.mark.parametrize("mut,key,fix", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_search_space_names_file_key_and_fix(tmp_path, mut, key, fix):
    path = write(tmp_path, mut(base()))
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert key in msg, msg
    assert fix in msg, msg
    assert isinstance(info.value, ConfigError)  # the CLI turns it into exit 2


@pytest.mark.parametrize("mut,key", [
    (mutate(params__sigma_agg={"choice": [0.0, 1.0]}), "`params.sigma_agg`"),
    (mutate(params__sigma_sgd={"float": [0.0, 2.0]}), "`params.sigma_sgd`"),
    (mutate(fixed__sigma_sgd=0.0), "`fixed"),
], ids=["choice-first-value", "range-low", "fixed-value"])
def test_invalid_value_is_blamed_on_its_own_key(tmp_path, mut, key):
    path = write(tmp_path, mut(base()))
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    assert "--sigma-" in str(info.value)  # the cause is named ...
    assert key in str(info.value) and "params.batch_size" not in str(info.value), str(info.value)  # ... not its key


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "epsilon: [1.0, 2.0\nparams: {\n")
    with pytest.raises(SearchSpaceError, match="not valid YAML") as info:
        load_search_space(path)
    assert str(path) in str(info.value) and "fix the syntax" in str(info.value)


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- epsilon\n- delta\n")
    with pytest.raises(SearchSpaceError, match="top level must be a mapping") as info:
        load_search_space(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SearchSpaceError, match="not found") as info:
        load_search_space(path)
    assert str(path) in str(info.value) and "search_spaces/" in str(info.value)


def test_empty_file_is_all_defaults(tmp_path):
    ss = load_search_space(write(tmp_path, ""))
    assert ss.params == [] and ss.epsilon == 10.0


def test_poisson_mean_below_one_is_refused_up_front(tmp_path):
    path = write(tmp_path, mutate(trials_distribution="poisson", expected_trials=0.5)(base()))
    with pytest.raises(SearchSpaceError, match="expected_trials"):
        load_search_space(path)


def test_exponent_without_dot_is_a_number(tmp_path):
    raw = TINY.read_text().replace("delta: 1.0e-5", "delta: 1e-5")
    assert "delta: 1e-5" in raw
    assert load_search_space(write(tmp_path, raw)).delta == 1e-5


# ---------------------------------------------------------------------------- the CLI


def test_cli_bad_search_space_exits_2_with_the_message(tmp_path, capsys):
    path = write(tmp_path, mutate(params__sigma_agg={"float": [3, 1]})(base()))
    rc = cli.main(["--search-space", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(path) in err and "params.sigma_agg" in err and "low must be < high" in err
    assert not (tmp_path / "run").exists(), "a refused search space must not create the run directory"


def test_cli_missing_search_space_exits_2(tmp_path, capsys):
    rc = cli.main(["--search-space", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags,phrase", [
    (["--epsilon", "0"], "epsilon"),
    (["--epsilon", "-3"], "epsilon"),
    (["--delta", "1"], "delta"),
    (["--expected-trials", "1"], "expected_trials"),
    (["--search", "tpe", "--expected-trials", "1.5"], "whole number"),
])
def test_cli_bad_overrides_exit_2(tmp_path, capsys, flags, phrase):
    rc = cli.main(["--search-space", str(TINY), "--out", str(tmp_path / "run"), *flags])
    assert rc == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "run" / "release").exists()


def test_cli_impossible_budget_fails_before_any_trial(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["--search-space", str(TINY), "--epsilon", "1e-6", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "too small" in err and "raise --epsilon" in err, err
    assert not (out / "release").exists()
    assert not (out / "trials" / "search_state.json").exists(), "K must not be drawn for an impossible budget"
    assert not (out / "trials").exists() or not any((out / "trials").iterdir())


def test_cli_resume_without_state_exits_2(tmp_path, capsys):
    rc = cli.main(["--resume", str(tmp_path / "nothing")])
    assert rc == 2
    assert "no search state" in capsys.readouterr().err


def test_group_larger_than_some_batch_is_accepted_as_the_trial_clamps_it(tmp_path):
    raw = mutate(params__batch_size={"choice": [64, 256]}, params__group_size={"choice": [32, 128]})(base())
    raw["fixed"].pop("group_size")
    ss = load_search_space(write(tmp_path, raw))
    assert {p.name for p in ss.params} >= {"batch_size", "group_size"}


def test_a_space_that_cannot_run_fails_before_ray_naming_the_key_and_charges_nothing(tmp_path, capsys):
    """Issue #14: `batch_size: {choice: [64, 100000]}` used to start Ray and charge the whole ε."""
    import ray

    raw = mutate(params__batch_size={"choice": [64, 100000]})(base())
    out = tmp_path / "run"
    rc = cli.main(["--search-space", str(write(tmp_path, raw)), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "`params.batch_size`" in err and "100000" in err and "q = B/N > 1" in err, err
    assert not ray.is_initialized()
    assert not out.exists() or not any(out.rglob("*")), "nothing may be written (or charged) before the check"
