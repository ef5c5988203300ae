"""Issue #13 screen: how good can the DP label classifier (G's teacher and the release's labeller) get
at a plan's noise? Trains `LabelClassifier` alone with the project's DP-SGD primitives (per-record
gradients, clip to C_c, Gaussian noise σ_c·C_c on the sum, ÷ B_c) on Poisson samples of the training
records, then prints its accuracy on the real test split. A benchmark: its noise comes from a seeded
generator (never the release's secret stream) and nothing it writes is a release; the ε it stands for
is the plan's, printed by `python -m dpaf_ray train` (ε = 10: σ_c = 1.333, q_c = 0.01896).

    python bench/classifier_screen.py --sigma 1.333 --steps 1000 --width 16 --hidden 32
        [--ema DECAY] [--save FILE.pt] [--out FILE.jsonl]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.data import load_dataset  # noqa: E402
from dpaf_ray.models.architecture import architecture_for  # noqa: E402
from dpaf_ray.models.label_classifier import LabelClassifier  # noqa: E402
from dpaf_ray.privacy.grad_sample import PerRecordGradients  # noqa: E402
from dpaf_ray.privacy.mechanisms import clip_and_sum_per_record  # noqa: E402
from dpaf_ray.training.label_teacher import record_loss  # noqa: E402
from classifier_accuracy import test_accuracy  # noqa: E402  (bench/ is on sys.path when a script runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--sigma", type=float, default=1.333)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--n-train", type=int, default=54000, help="records the trainer samples from (its split)")
    ap.add_argument("--clip", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=4.0)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.0, help="also test an EMA of the iterates with this decay")
    ap.add_argument("--save", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    pool = torch.randperm(len(train))[: args.n_train]
    x_all = train.as_float(pool)
    y_all = train.labels[pool]
    arch = architecture_for(tuple(x_all.shape[1:]))
    model = LabelClassifier(arch, int(train.labels.max()) + 1, args.width, args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    per_record = PerRecordGradients(model)
    q = args.batch / args.n_train
    noise = torch.Generator().manual_seed(10_000 + args.seed)
    ema = copy.deepcopy(model) if args.ema else None
    start, curve, ema_curve = time.time(), [], []
    for t in range(args.steps):
        chosen = (torch.rand(args.n_train) < q).nonzero().squeeze(1)
        grads = per_record((x_all[chosen],), record_loss, (y_all[chosen],))
        summed = clip_and_sum_per_record(grads, args.clip)
        for p, g in zip(per_record.params, summed):
            p.grad = (g + torch.randn(g.shape, generator=noise) * args.sigma * args.clip) / args.batch
        opt.step()
        if ema is not None:  # post-processing of the noisy iterates
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.mul_(args.ema).add_(p, alpha=1 - args.ema)
        if (t + 1) % max(1, args.steps // 5) == 0:
            curve.append((t + 1, round(test_accuracy(model, test), 4)))
            if ema is not None:
                ema_curve.append((t + 1, round(test_accuracy(ema, test), 4)))
            print(f"step {t + 1}: test accuracy {curve[-1][1]:.4f}"
                  f"{f' (EMA {ema_curve[-1][1]:.4f})' if ema_curve else ''} ({time.time() - start:.0f} s)", flush=True)
    row = {**vars(args), "test_accuracy": curve[-1][1], "curve": curve,
           **({"ema_test_accuracy": ema_curve[-1][1], "ema_curve": ema_curve} if ema_curve else {}),
           "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - start)}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.save:
        kept = ema if ema is not None else model  # with --ema the file holds the EMA
        torch.save({"width": args.width, "hidden": args.hidden, "state": kept.state_dict()}, args.save)


if __name__ == "__main__":
    main()
