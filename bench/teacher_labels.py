"""Issue #13 screen: does the DP label classifier, used at sampling time, move downstream accuracy?

Both the generator and the classifier of a run with a label-classifier phase are DP releases
(the classifier's DP-SGD steps are charged by the ledger before they run), so anything computed
from them alone is post-processing and costs no privacy. Variants of the 60k synthetic set:

    mix f    a fraction f of the images is drawn from G with a label embedding interpolated
             between two classes, e_λ = (1−λ)·e(y1) + λ·e(y2), λ ~ U(0, 1); every image is
             labelled by the classifier's argmax (data-free distillation's lesson: the student
             learns the teacher's boundary from images near it, not from those it is sure of).
             This is `release.sample_synthetic`, what a release ships. A variant
             that labelled each image between y1 and y2 with the better of those two only
             (bench/results/utility_14/pair_labels.jsonl) released 2 points less.

    --hard F a fraction F of the set is the classifier's least certain images (smallest gap between
             its two largest probabilities) out of a pool 3× that size, chosen per label so the
             classes stay even; the rest as above (active-learning's lesson: the boundary cases
             carry the labels a student gets wrong). `uncertain_fraction` of a release, off by
             default (bench/results/utility_15/uncertain_labels.jsonl; those rows drew the pool
             from seed + 7919, the release draws it after the rest of the set).

Same evaluation as `python -m dpaf_ray evaluate RUN` (60k images, seed 3, the fixed CNN 3 epochs,
tested on the real test split): downstream accuracy and the diversity ratio.

    python bench/teacher_labels.py RUN_DIR [RUN_DIR ...] --mix 0 0.3 0.5 --out FILE.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.models.generator import load_generator  # noqa: E402
from dpaf_ray.models.label_classifier import LabelClassifier  # noqa: E402
from dpaf_ray.training.checkpoint import LocalCheckpointSink  # noqa: E402
from dpaf_ray.release import generate  # noqa: E402
from screen import score_and_log  # noqa: E402  (bench/ is on sys.path when a script runs)


def load_classifier(run_dir: Path, generator) -> LabelClassifier | None:
    """The classifier of a run from its checkpoint (runs older than the release's labeller)."""
    state = LocalCheckpointSink(run_dir, True).latest()
    mods = state["trainer"]["modules"] if state else {}
    if "classifier" not in mods:
        return None
    model = LabelClassifier(generator.arch, generator.num_classes)
    model.load_state_dict(mods["classifier"])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--mix", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--hard", type=float, nargs="+", default=[0.0], help="fractions of least certain images")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--sample-seeds", type=int, nargs="+", default=[3], help="seeds of the synthetic draw")
    ap.add_argument("--num-synthetic", type=int, default=60_000)
    ap.add_argument("--out", default=None, help="append one JSON line per (run, mix) to this file")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                    help="scale of G's latent z at sampling time (post-processing of G)")
    ap.add_argument("--classifier", default=None,
                    help="label with this classifier instead of the run's (a bench/classifier_screen.py --save file)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test, train = load_dataset(args.dataset, "test"), load_dataset(args.dataset, "train")
    for run in args.runs:
        generator = load_generator(run)
        classifier = generator.labeller or load_classifier(Path(run), generator)
        if args.classifier:
            saved = torch.load(args.classifier)
            classifier = LabelClassifier(generator.arch, generator.num_classes, saved["width"], saved["hidden"])
            classifier.load_state_dict(saved["state"])
            classifier.eval()
        if classifier is None:
            print(json.dumps({"run": run, "skipped": "no label classifier in the checkpoint"}))
            continue
        for mix, hard, sample_seed, temp in [(m, h, s, t) for m in args.mix for h in args.hard
                                             for s in args.sample_seeds for t in args.temperature]:
            start = time.time()
            labelled = generator.with_labeller(classifier, mix, hard)
            if temp != 1.0:
                decode = labelled.decode
                labelled.decode = lambda z, codes, decode=decode, temp=temp: decode(z * temp, codes)
            synthetic = generate(labelled, args.num_synthetic, seed=sample_seed)
            score_and_log(synthetic, test, train, start, args.out, run=run, mix=mix, sample_seed=sample_seed,
                          labels="argmax", **({"hard": hard} if hard else {}),
                          **({"temperature": temp} if temp != 1.0 else {}),
                          **({"classifier": args.classifier} if args.classifier else {}))


if __name__ == "__main__":
    main()
