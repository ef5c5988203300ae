"""Search-space files (YAML), validated once with errors that name the file, the key and the fix."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import ConfigError, TrainConfig
from .resources import check_declared_hardware, check_resource_keys, parse_hardware
from .search_space_error import SearchSpaceError, key_error

if TYPE_CHECKING:
    from ..privacy.subsample import SubsampleBudget

TOP_KEYS = {"dataset", "data_root", "num_classes", "epsilon", "delta", "search", "expected_trials", "trials_distribution",
            "tnb_shape", "reference", "score", "trial", "fixed", "params", "hardware", "subsample"}
REFERENCE_KEYS = {"batch_size", "classifier_steps"}
SUBSAMPLE_KEYS = {"fraction", "epsilon_share", "final_iterations"}
SCORE_KEYS = {"noise_multiplier", "classifier_epochs", "classifier_max_steps", "public_validation"}
TRIAL_KEYS = {"iterations", "time_budget_minutes", "num_synthetic", "num_workers",
              "use_gpu", "cpus_per_worker", "max_concurrent_trials", "gpus_per_worker"}
# Knobs a trial derives itself: never searched or fixed by the user.
DERIVED = {"epsilon", "delta", "dataset", "data_root", "num_classes", "iterations", "max_iterations", "seed",
           "time_budget_minutes", "extra_fixed_releases", "reproducible_noise"}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Param:
    name: str
    kind: str  # choice | int | float
    values: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    log: bool = False

    def optuna_distribution(self) -> Any:
        import optuna.distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.values)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log)
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def extremes(self) -> list[Any]:
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


@dataclass
class SearchSpace:
    path: str
    dataset: str = "mnist-5k"
    data_root: str | None = None
    num_classes: int | None = None  # public class count, for sources without metadata (Parquet)
    epsilon: float = 10.0
    delta: float = 1e-5
    search: str = "random"
    expected_trials: float = 2.0
    trials_distribution: str = "tnb"
    tnb_shape: float = 1.0
    reference_batch_size: int | None = None  # the planned trial's B (default: fixed.batch_size, else TrainConfig's)
    reference_classifier_steps: int | None = None  # its classifier phase (default: the longest the space can draw)
    score_noise: float = 20.0
    classifier_epochs: int = 2
    classifier_max_steps: int | None = 300
    public_validation: str | None = None
    trial_iterations: int | None = None  # T of every trial (default: the time budget's probe, else 900 at 28×28)
    time_budget_minutes: float | None = None
    num_synthetic: int = 4000
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_concurrent_trials: int = 1
    gpus_per_worker: float = 1.0  # a worker's (or an in-process trial's) share of a GPU; < 1 shares one
    hardware: dict[str, Any] | None = None  # what the file is sized for: {cpus, gpus, nodes, note}
    fixed: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    # issue #14: search on a Poisson subsample at rate γ, then one final run on all records
    subsample_fraction: float | None = None  # γ; None: the search runs on all records (no final run)
    subsample_epsilon_share: float | None = None  # the part of ε the amplified search may spend
    subsample_final_iterations: int | None = None  # the final run's T (None: a single run's default, as `train`)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def subsample_budget(self) -> "SubsampleBudget | None":
        """The split of (ε, δ) between the subsampled search and the final run; None without `subsample`."""
        if self.subsample_fraction is None:
            return None
        from ..privacy.subsample import SubsampleBudget

        return SubsampleBudget(self.epsilon, self.delta, self.subsample_fraction, self.subsample_epsilon_share)

    def search_target(self) -> tuple[float, float]:
        """(ε, δ) the search itself is calibrated to: the whole budget, or (ε_s, δ_s) on a subsample."""
        budget = self.subsample_budget()
        if budget is None:
            return self.epsilon, self.delta
        return budget.search_epsilon, budget.search_delta


_REPLACED = {
    "reference.noise_multiplier": "the reference's noise is now calibrated from the budget; drop the key",
    "trial.min_iterations": "trials now all run the planned T: use trial.iterations (or trial.time_budget_minutes)",
    "trial.max_iterations": "trials now all run the planned T: use trial.iterations (or trial.time_budget_minutes)",
}


def _unknown(path: str, section: str, got: dict, allowed: set[str]) -> None:
    for key in got:
        full = f"{section}.{key}" if section else key
        if full in _REPLACED:
            raise key_error(path, full, _REPLACED[full])
    extra = sorted(set(got) - allowed)
    if extra:
        where = f"{section}." if section else ""
        raise key_error(path, where + extra[0], f"unknown key; allowed keys here: {sorted(allowed)}")


def _number(path: str, key: str, v: Any, positive: bool = True) -> float:
    if isinstance(v, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise key_error(path, key, f"must be a number, got {v!r}")
    if positive and v <= 0:
        raise key_error(path, key, f"must be > 0, got {v}")
    return float(v)


def parse_param(path: str, name: str, spec: Any) -> Param:
    key = f"params.{name}"
    if name not in TRAIN_FIELDS or name in DERIVED:
        allowed = sorted(TRAIN_FIELDS - DERIVED)
        raise key_error(path, key, f"not a searchable knob; searchable: {allowed}")
    if not isinstance(spec, dict) or len(set(spec) & {"choice", "int", "float"}) != 1:
        raise key_error(path, key, "give exactly one of {choice: [a, b, ...]}, {int: [low, high]}, {float: [low, high]}"
                   " (optionally with log: true)")
    _unknown(path, key, spec, {"choice", "int", "float", "log"})
    log = bool(spec.get("log", False))
    if "choice" in spec:
        values = spec["choice"]
        if not isinstance(values, list) or not values:
            raise key_error(path, key, "choice must be a non-empty list of values")
        return Param(name, "choice", values=list(values))
    kind = "int" if "int" in spec else "float"
    rng = spec[kind]
    if not isinstance(rng, list) or len(rng) != 2:
        raise key_error(path, key, f"{kind} must be a list [low, high]")
    low, high = (_number(path, key, v, positive=False) for v in rng)
    if kind == "int" and (low != int(low) or high != int(high)):
        raise key_error(path, key, f"int range needs whole numbers, got {rng}")
    if not low < high:
        raise key_error(path, key, f"empty or inverted range [{rng[0]}, {rng[1]}]: low must be < high")
    if log and low <= 0:
        raise key_error(path, key, f"log scale needs low > 0, got {low}")
    return Param(name, kind, low=low, high=high, log=log)


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    p = str(path)
    if not path.exists():
        raise SearchSpaceError(f"{p}: search-space file not found; see search_spaces/ for examples")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{p}: not valid YAML ({e}); fix the syntax") from e
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{p}: the top level must be a mapping of keys to values")
    _unknown(p, "", raw, TOP_KEYS)
    ss = SearchSpace(path=p)
    for k in ("dataset", "data_root", "search", "trials_distribution"):
        if k in raw:
            setattr(ss, k, raw[k])
    if "num_classes" in raw:
        ss.num_classes = int(_number(p, "num_classes", raw["num_classes"]))
    for k in ("epsilon", "delta", "expected_trials", "tnb_shape"):
        if k in raw:
            setattr(ss, k, _number(p, k, raw[k]))
    sections = {"reference": REFERENCE_KEYS, "score": SCORE_KEYS, "trial": TRIAL_KEYS}
    for sec, allowed in sections.items():
        d = raw.get(sec, {}) or {}
        if not isinstance(d, dict):
            raise key_error(p, sec, "must be a mapping")
        _unknown(p, sec, d, allowed)
    ref, score, trial = (raw.get(s, {}) or {} for s in sections)
    if "batch_size" in ref:
        ss.reference_batch_size = int(_number(p, "reference.batch_size", ref["batch_size"]))
    if "classifier_steps" in ref:
        v = _number(p, "reference.classifier_steps", ref["classifier_steps"], positive=False)
        if v < 0 or v != int(v):
            raise key_error(p, "reference.classifier_steps", f"must be a whole number >= 0 (0: no classifier phase), got {v:g}")
        ss.reference_classifier_steps = int(v)
    if "noise_multiplier" in score:
        ss.score_noise = _number(p, "score.noise_multiplier", score["noise_multiplier"])
    if "classifier_epochs" in score:
        ss.classifier_epochs = int(_number(p, "score.classifier_epochs", score["classifier_epochs"]))
    if "classifier_max_steps" in score:
        v = score["classifier_max_steps"]
        ss.classifier_max_steps = None if v is None else int(_number(p, "score.classifier_max_steps", v))
    ss.public_validation = score.get("public_validation")
    for k in ("num_synthetic", "max_concurrent_trials"):
        if k in trial:
            setattr(ss, k, int(_number(p, f"trial.{k}", trial[k])))
    if trial.get("iterations") is not None:
        ss.trial_iterations = int(_number(p, "trial.iterations", trial["iterations"]))
    if "num_workers" in trial:
        ss.num_workers = int(_number(p, "trial.num_workers", trial["num_workers"], positive=False))
    if "time_budget_minutes" in trial:
        v = trial["time_budget_minutes"]
        ss.time_budget_minutes = None if v is None else _number(p, "trial.time_budget_minutes", v)
    if "cpus_per_worker" in trial:
        ss.cpus_per_worker = _number(p, "trial.cpus_per_worker", trial["cpus_per_worker"])
    ss.use_gpu = bool(trial.get("use_gpu", False))
    if "gpus_per_worker" in trial:
        ss.gpus_per_worker = _number(p, "trial.gpus_per_worker", trial["gpus_per_worker"])
    ss.hardware = parse_hardware(ss, raw.get("hardware"))
    parse_subsample(p, ss, raw.get("subsample"))
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        raise key_error(p, "fixed", "must be a mapping of knob: value")
    for k in fixed:
        if k not in TRAIN_FIELDS or k in DERIVED:
            raise key_error(p, f"fixed.{k}", f"not a knob that can be fixed; allowed: {sorted(TRAIN_FIELDS - DERIVED)}")
    ss.fixed = dict(fixed)
    params = raw.get("params", {}) or {}
    if not isinstance(params, dict):
        raise key_error(p, "params", "must be a mapping of knob: {choice|int|float: ...}")
    ss.params = [parse_param(p, k, v) for k, v in params.items()]
    both = sorted(set(ss.fixed) & {q.name for q in ss.params})
    if both:
        raise key_error(p, f"params.{both[0]}", "is also in `fixed`; keep it in one place")
    ss = validate_search_space(ss)
    check_declared_hardware(ss)  # the file as written fits the hardware it names (before Ray starts)
    return ss


def parse_subsample(path: str, ss: SearchSpace, section: Any) -> None:
    """`subsample: {fraction: γ, epsilon_share: s}` (both required, both strictly inside (0, 1))."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise key_error(path, "subsample", "must be a mapping like {fraction: 0.2, epsilon_share: 0.1}, or be left out "
                   "to search on all records")
    _unknown(path, "subsample", section, SUBSAMPLE_KEYS)
    for key, what in (("fraction", "the probability γ that a record joins the tuning subsample, e.g. 0.2"),
                      ("epsilon_share", "the part of the total ε the search may spend, e.g. 0.1")):
        if key not in section:
            raise key_error(path, f"subsample.{key}", f"missing; give {what}")
    ss.subsample_fraction = _number(path, "subsample.fraction", section["fraction"], positive=False)
    ss.subsample_epsilon_share = _number(path, "subsample.epsilon_share", section["epsilon_share"], positive=False)
    if "final_iterations" in section:
        v = _number(path, "subsample.final_iterations", section["final_iterations"])
        if v != int(v):
            raise key_error(path, "subsample.final_iterations", f"must be a whole number >= 1, got {v:g}")
        ss.subsample_final_iterations = int(v)


def clamp_group(knobs: dict[str, Any]) -> dict[str, Any]:
    """A sampled group larger than the sampled batch becomes one group per batch (public rule)."""
    b, B = knobs.get("group_size", TrainConfig.group_size), knobs.get("batch_size", TrainConfig.batch_size)
    if isinstance(b, (int, float)) and isinstance(B, (int, float)) and b > B:
        return {**knobs, "group_size": B}
    return knobs


def check_run(path: str, key: str, knobs: dict[str, Any], prefix: str = "") -> None:
    try:
        TrainConfig.from_dict(clamp_group(knobs)).validate()
    except (ConfigError, TypeError) as e:
        raise key_error(path, key, f"{prefix}{e}") from e


def same_source(a: str, b: str) -> bool:
    """Two data-set specs that name the same data (a known name, or the same path)."""
    from pathlib import Path

    def norm(spec: str) -> str:
        spec = str(spec).strip()
        path = Path(spec).expanduser()
        return str(path.resolve()) if path.exists() else spec.lower()

    return norm(a) == norm(b)


def check_subsample(ss: SearchSpace) -> None:
    p = ss.path
    if ss.subsample_fraction is None or ss.subsample_epsilon_share is None:
        missing = "fraction" if ss.subsample_fraction is None else "epsilon_share"
        raise key_error(p, f"subsample.{missing}", "missing; give both subsample.fraction and subsample.epsilon_share "
                   "(on the command line: --subsample-fraction and --subsample-epsilon-share)")
    gamma, share = ss.subsample_fraction, ss.subsample_epsilon_share
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0 < gamma < 1):
        raise key_error(p, "subsample.fraction", f"must lie strictly between 0 and 1, got {gamma}; e.g. 0.2 (a record joins "
                   "the tuning subsample with probability 0.2), or drop the `subsample` section to search on all records")
    if not (isinstance(share, (int, float)) and math.isfinite(share) and 0 < share < 1):
        raise key_error(p, "subsample.epsilon_share", f"must lie strictly between 0 and 1, got {share}; e.g. 0.1 (the "
                   "search spends 10 % of ε after amplification, the final run on all records the rest)")


def validate_search_space(ss: SearchSpace) -> SearchSpace:
    """Checks that need the values together: each extreme of each range must be a valid run."""
    p = ss.path
    if ss.search not in ("random", "tpe"):
        raise key_error(p, "search", f"must be 'random' or 'tpe', got {ss.search!r}")
    if ss.trials_distribution not in ("tnb", "logarithmic", "geometric", "poisson"):
        raise key_error(p, "trials_distribution", "must be one of tnb, logarithmic, geometric, poisson")
    if not (0 < ss.delta < 1):
        raise key_error(p, "delta", f"must lie strictly between 0 and 1, got {ss.delta}")
    if ss.search == "tpe" and ss.expected_trials != int(ss.expected_trials):
        raise key_error(p, "expected_trials", "TPE runs a fixed number of trials: give a whole number")
    if ss.search == "random" and ss.expected_trials <= 1 and ss.trials_distribution != "poisson":
        raise key_error(p, "expected_trials", "the truncated negative binomial needs a mean > 1, e.g. 2")
    if ss.expected_trials < 1:
        raise key_error(p, "expected_trials", f"must be >= 1 (the repeat-and-select bound needs it), got {ss.expected_trials}")
    if ss.public_validation is not None and same_source(ss.public_validation, ss.dataset):
        raise key_error(p, "score.public_validation",
                   f"{ss.public_validation!r} is the private data set itself: scoring trials on it without noise "
                   "would select on private data for free; drop --public-validation (trials are then scored on "
                   "the private validation split, with noise, charged) or name a different, public data set")
    if ss.subsample_fraction is not None or ss.subsample_epsilon_share is not None:
        check_subsample(ss)
    elif ss.subsample_final_iterations is not None:
        raise key_error(p, "subsample.final_iterations", "sets the final run of a search on a subsample, but there is none: "
                   "add subsample.fraction and subsample.epsilon_share (--subsample-fraction, "
                   "--subsample-epsilon-share), or drop it")
    if ss.subsample_final_iterations is not None and (ss.subsample_final_iterations != int(ss.subsample_final_iterations)
                                                      or ss.subsample_final_iterations < 1):
        raise key_error(p, "subsample.final_iterations", f"must be a whole number >= 1, got {ss.subsample_final_iterations}")
    if ss.trial_iterations is not None and (ss.trial_iterations != int(ss.trial_iterations) or ss.trial_iterations < 1):
        raise key_error(p, "trial.iterations", f"must be a whole number >= 1, got {ss.trial_iterations}")
    check_resource_keys(ss)
    # `fixed` alone, then each extreme of each range against `fixed`, then all first values
    # together. A group larger than the batch is clamped to it, as a trial does.
    check_run(p, "fixed", ss.fixed)
    for param in ss.params:
        for v in param.extremes():
            check_run(p, f"params.{param.name}", {**ss.fixed, param.name: v}, f"value {v!r} is not a valid run: ")
    check_run(p, "params", {**ss.fixed, **{q.name: q.extremes()[0] for q in ss.params}},
              "the first values together are not a valid run: ")
    return ss
