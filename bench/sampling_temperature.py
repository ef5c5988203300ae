"""Issue #13 screen: does the spread of G's input codes at sampling time move downstream accuracy?

Sampling is post-processing of a released generator (no privacy cost): codes z ~ N(0, t²·I)
instead of N(0, I). t < 1 is the truncation trick (typical images, less variety); t > 1 asks
for more variety. Same evaluation as `python -m dpaf_ray evaluate RUN` (60k synthetic images,
seed 3, the fixed CNN 3 epochs, tested on the real test split), downstream accuracy and the
diversity ratio only (no FID, to save time).

    python bench/sampling_temperature.py RUN_DIR [RUN_DIR ...] --temperatures 0.7 1 1.4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.models.generator import load_generator  # noqa: E402
from dpaf_ray.release import RELEASE_DIR  # noqa: E402
from dpaf_ray.release import generate  # noqa: E402
from screen import score_and_log  # noqa: E402  (bench/ is on sys.path when a script runs)


def at_temperature(generator, t: float):
    """Every image, of one class or (a released labeller) between two, is decoded from z·t."""
    decode = generator.decode
    generator.decode = lambda z, label_codes: decode(z * t, label_codes)
    return generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.4])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--num-synthetic", type=int, default=60_000)
    ap.add_argument("--out", default=None, help="append one JSON line per (run, t) to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test, train = load_dataset(args.dataset, "test"), load_dataset(args.dataset, "train")
    for run in args.runs:
        path = Path(run)
        path = path / RELEASE_DIR if (path / RELEASE_DIR).is_dir() else path
        for t in args.temperatures:
            start = time.time()
            generator = at_temperature(load_generator(path / "generator.pt"), t)
            synthetic = generate(generator, args.num_synthetic, seed=3)
            score_and_log(synthetic, test, train, start, args.out, run=run, temperature=t)


if __name__ == "__main__":
    main()
