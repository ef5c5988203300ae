"""The Python API: the same code as the command line, as functions and result objects.

    import dpaf_ray

    run = dpaf_ray.train("mnist-5k", epsilon=1.0, delta=1e-5, out="runs/m1", iterations=300)
    run.epsilon                      # from the ledger of what ran
    images, labels = run.sample(16)  # post-processing: no privacy cost

    search = dpaf_ray.tune("search_spaces/tiny.yaml", out="runs/s1")
    search.get_best_result().score   # the released trial's noisy score
    search.epsilon                   # the whole search, training + scoring + the search itself

    g = dpaf_ray.load_generator("runs/m1/release/generator.pt")
    dpaf_ray.privacy_report("runs/m1/release/privacy_report.json")["epsilon"]   # recomputed

Names follow the ecosystem: a training `Run` is like Ray Train's `Result` (its path, its
metrics), a `Search` like Ray Tune's `ResultGrid` (trials, `get_best_result()`); privacy
follows Opacus (ε, δ from the accountant of what ran, never from a plan).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .models.generator import ConditionalGenerator
from .models.generator import load_generator as _load_generator
from .privacy.report import recompute
from .release import RELEASE_DIR

Progress = Callable[[str], None] | None


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ConditionalGenerator:
    """A released generator (a generator.pt, a release/ folder or a run directory); `.sample(n, labels)`."""
    return _load_generator(path, device)


def privacy_report(path: str | Path, delta: float | None = None) -> dict[str, Any]:
    """ε recomputed from a privacy_report.json's events alone (or a release/ or run folder's report)."""
    path = Path(path)
    if path.is_dir():
        path = path / RELEASE_DIR / "privacy_report.json" if (path / RELEASE_DIR).is_dir() \
            else path / "privacy_report.json"
    report = json.loads(path.read_text())
    return {**recompute(report, delta), "target_epsilon": report.get("target_epsilon"),
            "assumptions": report.get("assumptions", {})}


@dataclass
class Run:
    """A finished training run: its directory, metrics and privacy report."""

    path: Path
    metrics: dict[str, Any]
    report: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        return cls(path, json.loads((path / "metrics.json").read_text()),
                   json.loads((path / RELEASE_DIR / "privacy_report.json").read_text()))

    @property
    def epsilon(self) -> float:
        return float(self.report["epsilon"])

    @property
    def delta(self) -> float:
        return float(self.report["delta"])

    @property
    def release_path(self) -> Path:
        return self.path / RELEASE_DIR

    def generator(self, device: str | torch.device = "cpu") -> ConditionalGenerator:
        return load_generator(self.release_path / "generator.pt", device)

    def sample(self, n: int | None = None, labels: Any = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator().sample(n, labels, seed)

    def evaluate(self, test_data: str, **kwargs: Any) -> dict[str, Any]:
        """Benchmark metrics on real data (not private; written under the run, never into release/)."""
        from .evaluation.run import evaluate_run

        return evaluate_run(self.path, test_data, **kwargs)


def train(dataset: str = "mnist-5k", epsilon: float = 10.0, delta: float = 1e-5, out: str | Path | None = None, *,
          num_workers: int = 0, use_gpu: bool = False, address: str | None = None, num_synthetic: int = 10_000,
          resume: bool = True, progress: Progress = print, cpus_per_worker: float = 1.0,
          gpus_per_worker: float = 1.0, force: bool = False, **knobs: Any) -> Run:
    """Train one private generator; `knobs` are `TrainConfig` fields (iterations, epochs,
    time_budget_minutes, noise_split, batch_size, seed, ...). Writes OUT/release/.
    `cpus_per_worker`/`gpus_per_worker`: what Ray reserves per worker when `num_workers` > 0.
    A plan measured not to learn is refused before anything is charged (`force=True` trains it anyway);
    a finished OUT is returned as it is, never retrained."""
    from .run import run_train

    unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        from .config import ConfigError

        raise ConfigError(f"unknown option(s) {unknown}; see `python -m dpaf_ray train --help`")
    cfg = TrainConfig(dataset=dataset, epsilon=epsilon, delta=delta, **knobs)
    out = Path(out) if out is not None else _default_out("train")
    run_train(cfg, out, num_synthetic, num_workers, use_gpu, address, resume=resume, progress=progress,
              gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, force=force)
    return Run.load(out)


class Search:
    """A finished private search: its trials (like a `ResultGrid`), its release and its ε."""

    def __init__(self, path: str | Path) -> None:
        from .tuning.results import SearchResults

        self.path = Path(path)
        self.results = SearchResults(self.path)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i: int):
        return self.results[i]

    def get_best_result(self):
        return self.results.get_best_result()

    @property
    def release_path(self) -> Path:
        return self.path / RELEASE_DIR

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.release_path / "privacy_report.json").read_text())

    @property
    def epsilon(self) -> float:
        return float(self.report["epsilon"])

    def generator(self, device: str | torch.device = "cpu") -> ConditionalGenerator:
        return load_generator(self.release_path / "generator.pt", device)

    def table(self) -> str:
        return self.results.table()


def tune(search_space: str | Path | None = None, out: str | Path | None = None, *, resume: bool = False,
         address: str | None = None, storage_path: str | None = None, progress: Callable[[str], None] = print,
         **overrides: Any) -> Search:
    """Run (or `resume`) a private search; `overrides` are search-space fields (dataset, epsilon,
    delta, expected_trials, num_workers, use_gpu, ...). Raises on a search where no trial finished."""
    from .tuning.cli import DEFAULT_SPACE
    from .tuning.search_space import SearchSpace, load_search_space, validate_search_space
    from .tuning.tuner import run_search

    out = Path(out) if out is not None else _default_out("search")
    if resume:
        saved = json.loads((out / "trials" / "search_state.json").read_text())["search_space"]
        from .tuning.search_space import Param

        ss = validate_search_space(SearchSpace(**{**saved, "params": [Param(**q) for q in saved["params"]]}))
    else:
        ss = load_search_space(search_space or DEFAULT_SPACE)
        ss = validate_search_space(dataclasses.replace(ss, **overrides))
    run_search(ss, out, resume=resume, address=address, storage_path=storage_path, progress=progress)
    return Search(out)


def _default_out(kind: str) -> Path:
    import time

    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["Run", "Search", "load_generator", "privacy_report", "train", "tune"]
