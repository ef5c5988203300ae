"""Give a run trained before the release carried its DP label classifier the generator.pt it would
release today, so that `python -m dpaf_ray evaluate` and `bench/epsilon_curve.py --existing-only`
measure it as such. Training is unchanged by that feature (only the release's synthetic set is), so
the result is what the current code releases for the same training: G's weights and the frozen
classifier from the run's checkpoint, `ConditionalGenerator.with_labeller`. A benchmark tool: the
new folder is the operator's, never a publication.

    python bench/attach_labeller.py RUN_DIR NEW_DIR [--between-class-fraction F] [--uncertain-fraction U]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.models.generator import RELEASE_KNOBS, load_generator  # noqa: E402
from dpaf_ray.release import RELEASE_DIR  # noqa: E402
from teacher_labels import load_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("new")
    ap.add_argument("--between-class-fraction", type=float, default=0.5)
    ap.add_argument("--uncertain-fraction", type=float, default=0.0)
    args = ap.parse_args()
    run, new = Path(args.run), Path(args.new)
    generator = load_generator(run)
    classifier = load_classifier(run, generator)
    if classifier is None:
        raise SystemExit(f"{run}: no label classifier in its checkpoint (a run without the phase is unchanged)")
    if new.exists():
        raise SystemExit(f"{new} exists; choose a new folder")
    (new / RELEASE_DIR).mkdir(parents=True)
    for name in ("config.json", "metrics.json", "ledger.json"):
        if (run / name).exists():
            shutil.copy2(run / name, new / name)
    for name in ("privacy_report.json", "score.json"):
        shutil.copy2(run / RELEASE_DIR / name, new / RELEASE_DIR / name)
    knobs = {name: getattr(args, name) for name in RELEASE_KNOBS}
    generator.with_labeller(classifier, **knobs).save(new / RELEASE_DIR / "generator.pt")
    (new / "ATTACHED_FROM").write_text(f"{run.resolve()} with " + ", ".join(f"{k} {v}" for k, v in knobs.items()) + "\n")
    print(new)


if __name__ == "__main__":
    main()
