"""A finished (or interrupted) search, as the operator sees it: one record per trial.

Reads the trusted run directory only (trials/*/trial.json, Tune's trial folders for errors)
and writes nothing into `release/`. `python -m dpaf_ray results RUN` prints the table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

STATE_FILE = "search_state.json"


@dataclass
class TrialResult:
    """One trial, in the spirit of Ray's `Result`: its knobs, its noisy score and what it cost."""

    name: str
    status: str  # "finished" | "error" | "unfinished"
    score: float | None = None
    epsilon: float | None = None  # the trial's own ledger, standalone
    epsilon_reference: float | None = None
    iterations: int | None = None
    seconds: float | None = None
    sampled: dict[str, Any] = field(default_factory=dict)
    knobs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    path: Path | None = None
    iterations_planned: int | None = None
    stopped_early: bool = False  # stopped by its time cap: spent less than its share of the budget

    @property
    def sigmas(self) -> tuple[float | None, float | None]:
        return self.knobs.get("sigma_agg"), self.knobs.get("sigma_sgd")


class SearchResults:
    """All trials of a search (like Ray's `ResultGrid`); the best is the one the release holds."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        state_path = self.path / "trials" / STATE_FILE
        if not state_path.exists():
            raise FileNotFoundError(f"{self.path}: no search there (no trials/{STATE_FILE}); pass the --out of tune.py")
        self.state = json.loads(state_path.read_text())
        self.trials = load_trials(self.path)

    def __len__(self) -> int:
        return len(self.trials)

    def __iter__(self) -> Iterator[TrialResult]:
        return iter(self.trials)

    def __getitem__(self, i: int) -> TrialResult:
        return self.trials[i]

    @property
    def finished(self) -> list[TrialResult]:
        return [t for t in self.trials if t.status == "finished"]

    @property
    def errors(self) -> list[TrialResult]:
        return [t for t in self.trials if t.status == "error"]

    def get_best_result(self) -> TrialResult | None:
        """The finished trial with the highest noisy score (the released one)."""
        done = self.finished
        return max(done, key=lambda t: t.score) if done else None

    @property
    def release_path(self) -> Path:
        return self.path / "release"

    def table(self) -> str:
        return format_table(self.trials, self.state)


def _tune_trial_dirs(out: Path) -> list[Path]:
    root = out / "trials" / "ray_tune" / "search"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _first_error(trial_dir: Path) -> str:
    err = trial_dir / "error.txt"
    if not err.exists():
        return "unknown error (see the Ray logs)"
    lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def load_trials(out: Path) -> list[TrialResult]:
    """Finished trials from their trial.json; errored or unfinished ones from Tune's folders."""
    out = Path(out)
    trials: dict[str, TrialResult] = {}
    for path in sorted((out / "trials").glob("*/trial.json")):
        t = json.loads(path.read_text())
        trials[t["trial"]] = TrialResult(
            t["trial"], "finished", t["score"], t.get("epsilon_trial"), t.get("epsilon_reference"),
            t.get("iterations"), t.get("seconds"), t.get("sampled", {}), t.get("knobs", {}), path=path.parent,
            iterations_planned=t.get("iterations_planned"), stopped_early=bool(t.get("stopped_early")))
    for d in _tune_trial_dirs(out):
        name = next((n for n in trials if d.name.startswith(n) or n in d.name), None)
        if name is not None:
            continue
        sampled = {}
        params = d / "params.json"
        if params.exists():
            sampled = {k: v for k, v in json.loads(params.read_text()).items() if not k.startswith("_")}
        status = "error" if (d / "error.txt").exists() else "unfinished"
        trials[d.name] = TrialResult(d.name, status, sampled=sampled,
                                     error=_first_error(d) if status == "error" else None, path=d)
    return list(trials.values())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def format_table(trials: list[TrialResult], state: dict[str, Any] | None = None) -> str:
    """The operator's view: knobs, σ after fitting, trial ε, noisy score, time, status."""
    knobs = sorted({k for t in trials for k in t.sampled})
    head = ["trial", "status", *knobs, "σ_agg", "σ_sgd", "T", "ε trial", "ε ref", "noisy score", "time"]
    rows = []
    best = max((t for t in trials if t.status == "finished"), key=lambda t: t.score, default=None)
    for t in trials:
        s_agg, s_sgd = t.sigmas
        rows.append([t.name + (" *" if t is best else ""), t.status, *(_fmt(t.sampled.get(k)) for k in knobs),
                     _fmt(s_agg), _fmt(s_sgd),
                     f"{t.iterations}/{t.iterations_planned}" if t.stopped_early else _fmt(t.iterations),
                     _fmt(t.epsilon), _fmt(t.epsilon_reference),
                     _fmt(t.score), "-" if t.seconds is None else f"{t.seconds / 60:.1f} min"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for t in trials:
        if t.error:
            lines.append(f"{t.name}: error: {t.error}")
        if t.stopped_early:
            lines.append(f"{t.name}: stopped by its time cap after {t.iterations} of {t.iterations_planned} "
                         f"iterations: its own ledger holds ε {_fmt(t.epsilon)} of the {_fmt(t.epsilon_reference)} "
                         "it was fitted to (the search is charged for the full reference all the same)")
    if state is not None:
        lines.append(f"K = {state.get('num_trials')} trials were drawn (private to this run directory); "
                     "* marks the released trial")
    return "\n".join(lines)


def plot_trials(trials: list[TrialResult], path: Path) -> Path | None:
    """Noisy scores against each searched knob (for the operator; kept in trials/)."""
    done = [t for t in trials if t.status == "finished"]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = sorted({k for t in done for k in t.sampled}) or ["iterations"]
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3), squeeze=False)
    for ax, k in zip(axes[0], knobs):
        xs = [t.sampled.get(k, t.iterations) for t in done]
        ax.scatter(xs, [t.score for t in done])
        ax.set_xlabel(k)
        ax.set_ylabel("noisy validation score")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
