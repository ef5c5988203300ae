"""The release bundle: only what the (ε, δ) of the whole search covers.

`release/` holds exactly generator.pt, synthetic.parquet, samples.png, score.json and
privacy_report.json. The realised number of trials, the other trials and anything
computed from raw private data stay in `trials/`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RELEASE_FILES = ("generator.pt", "synthetic.parquet", "samples.png", "score.json", "privacy_report.json")


def write_release(out: Path, best_trial_dir: Path | None, score: dict[str, Any] | None,
                  privacy_report: dict[str, Any]) -> Path:
    release = out / "release"
    tmp = out / "release.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if best_trial_dir is not None:
        for name in ("generator.pt", "synthetic.parquet", "samples.png"):
            shutil.copy2(best_trial_dir / name, tmp / name)
    (tmp / "score.json").write_text(json.dumps(score or {"score": None, "note": "no trial ran"}, indent=1))
    (tmp / "privacy_report.json").write_text(json.dumps(privacy_report, indent=1))
    if release.exists():
        shutil.rmtree(release)
    tmp.replace(release)  # the bundle appears whole or not at all
    return release
