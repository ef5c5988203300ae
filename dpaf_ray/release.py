"""The release: the only files that may be published, written in this one place (DESIGN rule 15).

    OUT/release/
      generator.pt         the class-conditional generator; after a DP label-classifier phase also
                           that classifier, which labels synthetic.parquet (a release the ledger charged)
      synthetic.parquet    labelled synthetic images
      samples.png          10 samples per class
      score.json           the noisy validation score (tune.py), or why there is none (train)
      privacy_report.json  ε from the ledger, the events to recompute it, the assumptions

Everything else a run writes (configuration and seeds, timings, curves, the ledger file,
checkpoints, which hold the run secret, trial records, evaluation results) stays outside
`release/`. The folder appears whole or not at all, and nothing writes into it afterwards:
`is_release_dir` lets other commands refuse to.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from .privacy.report import write_report

RELEASE_DIR = "release"
ARTEFACT_FILES = ("generator.pt", "synthetic.parquet", "samples.png")
RELEASE_FILES = ARTEFACT_FILES + ("score.json", "privacy_report.json")


def is_release_dir(path: str | Path) -> bool:
    """A folder written by `write_release` (or named like one)."""
    path = Path(path).resolve()
    return path.name == RELEASE_DIR or (path / "privacy_report.json").exists() and (path / "score.json").exists()


def write_release(out: Path, artefacts: Path | Callable[[Path], Any] | None, score: dict[str, Any] | None,
                  privacy_report: dict[str, Any]) -> Path:
    """Write OUT/release atomically: `artefacts` is a folder holding the three artefact files
    (a trial's) or a function that writes them into the folder it is given."""
    release = out / RELEASE_DIR
    tmp = out / (RELEASE_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if callable(artefacts):
        artefacts(tmp)
    elif artefacts is not None:
        for name in ARTEFACT_FILES:
            shutil.copy2(Path(artefacts) / name, tmp / name)
    extra = sorted(p.name for p in tmp.iterdir() if p.name not in ARTEFACT_FILES)
    if extra:
        raise RuntimeError(f"refusing to release files outside the release set: {extra}")
    (tmp / "score.json").write_text(json.dumps(score if score is not None else {"score": None}, indent=1))
    write_report(tmp / "privacy_report.json", privacy_report)
    if release.exists():
        shutil.rmtree(release)
    tmp.replace(release)
    return release
